package engine

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
)

// Eight volumes of one cache are mounted, written and committed at once.
// Each sees only its own writes; the final head is exactly one writer's
// output on top of the shared base, never a mix.
func TestParallelVolumesOnOneCache(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	base := tree{"base": "b", "shared/": "", "shared/common": "c"}
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, base) })

	const writers = 8
	own := func(i int) tree {
		return tree{
			"owner": strconv.Itoa(i), fmt.Sprintf("w%d/", i): "",
			fmt.Sprintf("w%d/out", i): strconv.Itoa(i), "shared/common": "changed by " + strconv.Itoa(i),
		}
	}
	expect := func(i int) tree {
		want := tree{}
		for k, v := range base {
			want[k] = v
		}
		for k, v := range own(i) {
			want[k] = v
		}
		return want
	}
	// Three phases with barriers between them, so that all eight volumes
	// start from the same generation and are all mounted at once.
	var created, mounted, wg sync.WaitGroup
	created.Add(writers)
	mounted.Add(writers)
	errs := make(chan error, 2*writers)
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("w%d", i)
			_, err := s.CreateVolume(id, testKey, VolumeOptions{Writable: true})
			created.Done()
			created.Wait()
			mnt := filepath.Join(dir, id)
			if err == nil {
				err = s.Mount(id, mnt)
			}
			if err == nil {
				writeTree(t, mnt, own(i))
			}
			mounted.Done()
			mounted.Wait()
			if err != nil {
				errs <- err
				return
			}
			got := readTree(t, mnt)
			if err := s.Unmount(id); err != nil {
				errs <- err
				return
			}
			if _, err := s.Commit(id); err != nil {
				errs <- err
				return
			}
			assertTree(t, "writer "+id+"'s own view", got, expect(i))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got := view(t, s, testKey, dir)
	winner, err := strconv.Atoi(got["owner"])
	if err != nil {
		t.Fatalf("final content has no single owner: %v", got)
	}
	assertTree(t, "final content (writer "+got["owner"]+" won)", got, expect(winner))
	info, _ := s.Inspect(testKey)
	if info.Head.Number != writers+1 {
		t.Errorf("head = generation %d, want %d (one per commit)", info.Head.Number, writers+1)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}

// Two hundred commits in a row, compacting after each as the node agent
// does: every mounted chain stays under the threshold, far from the
// kernel's 500 lower layers, and nothing is lost.
func TestLongCommitChainStaysShort(t *testing.T) {
	const threshold, commits = 8, 200
	s, dir := newTestStore(t, Options{CompactThreshold: threshold})
	longest := 0
	for i := range commits {
		id := fmt.Sprintf("c%d", i)
		v, err := s.CreateVolume(id, testKey, VolumeOptions{Writable: true})
		if err != nil {
			t.Fatal(err)
		}
		longest = max(longest, len(v.Layers))
		mnt := filepath.Join(dir, "mnt")
		must(t, s.Mount(id, mnt))
		writeTree(t, mnt, tree{fmt.Sprintf("files/%03d", i): "x", "counter": strconv.Itoa(i)})
		if i > 0 && i%10 == 0 {
			must(t, os.Remove(filepath.Join(mnt, "files", fmt.Sprintf("%03d", i-10))))
		}
		must(t, s.Unmount(id))
		if _, err := s.Commit(id); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CompactIfNeeded(testKey); err != nil {
			t.Fatal(err)
		}
		if i%25 == 0 {
			if _, err := s.GC(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if longest >= threshold {
		t.Errorf("a volume mounted a chain of %d layers, want fewer than %d", longest, threshold)
	}
	got := view(t, s, testKey, dir)
	if got["counter"] != strconv.Itoa(commits-1) {
		t.Errorf("counter = %q, want %d", got["counter"], commits-1)
	}
	files := 0
	for i := range commits {
		_, ok := got[fmt.Sprintf("files/%03d", i)]
		deleted := i%10 == 0 && i+10 < commits
		if ok == deleted {
			t.Errorf("files/%03d present=%v, want %v", i, ok, !deleted)
		}
		if ok {
			files++
		}
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
	layers, _ := os.ReadDir(filepath.Join(s.cacheDir(testKey), dirLayers))
	if len(layers) >= threshold {
		t.Errorf("%d layers on disk after GC, want fewer than %d", len(layers), threshold)
	}
	t.Logf("%d commits: longest mounted chain %d, %d files, %d layers on disk", commits, longest, files, len(layers))
}

// GC running while writers create temporary entries never takes an entry
// between its creation and its writer's lock, and never removes one while
// its writer does (both were seen when pulls ran beside GC).
func TestGCAndTemporaryEntriesAtOnce(t *testing.T) {
	s, _ := newTestStore(t, Options{})
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 300; i++ {
			if _, err := s.GC(); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for i := 0; i < 300; i++ {
		d, err := s.newTempDir("test")
		if err != nil {
			t.Fatalf("creating a temporary entry while GC runs: %v", err)
		}
		if err := os.Mkdir(filepath.Join(d.path, "x"), 0o700); err != nil {
			t.Fatalf("writing into a temporary entry while GC runs: %v", err)
		}
		d.done(s)
	}
	if err := <-done; err != nil {
		t.Fatalf("GC while temporary entries come and go: %v", err)
	}
}
