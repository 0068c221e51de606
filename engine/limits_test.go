package engine

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// writeVolume creates a writable volume of k holding files, unmounted.
func writeVolume(t *testing.T, s *Store, k Key, dir string, files tree) string {
	t.Helper()
	return writtenVolume(t, s, k, dir, func(mnt string) { writeTree(t, mnt, files) })
}

// A commit that would make the cache larger than its bound is refused,
// counting what the build inherited as well as what it wrote, and the
// cache does not change.
func TestCommitBeyondMaxBytesIsRefused(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"base": strings.Repeat("b", 64<<10)}) })
	before := view(t, s, testKey, dir)

	id := writeVolume(t, s, testKey, dir, tree{"big": strings.Repeat("x", 96<<10)})
	_, err := s.CommitWith(id, CommitOptions{MaxBytes: 128 << 10})
	var size *SizeError
	if !errors.Is(err, ErrTooLarge) || !errors.As(err, &size) {
		t.Fatalf("commit over the bound: err = %v, want a SizeError", err)
	}
	if size.Bytes <= 160<<10 || size.MaxBytes != 128<<10 {
		t.Errorf("size error = %+v: want the base (64 KiB) and the new file (96 KiB) counted", size)
	}
	assertTree(t, "the cache after a refused commit", view(t, s, testKey, dir), before)
	// The volume is left as it was: the caller discards it.
	if err := s.Discard(id); err != nil {
		t.Fatal(err)
	}

	id = writeVolume(t, s, testKey, dir, tree{"small": "s"})
	if res, err := s.CommitWith(id, CommitOptions{MaxBytes: 1 << 20}); err != nil || !res.Committed {
		t.Fatalf("commit within the bound: %+v, %v", res, err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}

// A volume forbidden to commit (it outgrew its size, say) is never
// committed, and can only be discarded.
func TestForbiddenVolumeNeverCommits(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	id := writeVolume(t, s, testKey, dir, tree{"f": "1"})
	if err := s.ForbidCommit(id, "it outgrew its size"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(id); !errors.Is(err, ErrNotWritable) || !strings.Contains(err.Error(), "it outgrew its size") {
		t.Fatalf("commit of a forbidden volume: %v", err)
	}
	if _, err := s.Inspect(testKey); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the cache exists after a forbidden commit: %v", err)
	}
	if err := s.Discard(id); err != nil {
		t.Fatal(err)
	}
}

// The generation a volume committed can be found again by the volume's ID.
func TestCommittedBy(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	id := writeVolume(t, s, testKey, dir, tree{"f": "1"})
	res, err := s.Commit(id)
	if err != nil {
		t.Fatal(err)
	}
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"g": "2"}) })
	g, err := s.CommittedBy(testKey, id)
	if err != nil || g == nil || g.Number != res.Generation {
		t.Fatalf("CommittedBy = %+v, %v; want generation %d", g, err, res.Generation)
	}
	if g, err := s.CommittedBy(testKey, "never-committed"); err != nil || g != nil {
		t.Fatalf("CommittedBy of another volume = %+v, %v", g, err)
	}
}

// A cache's first commit makes every new directory durable before the
// head is written: the cache directory itself (which holds the layers and
// generations directories), its namespace directory and caches/. (The
// fsync that makes the head durable would make them durable too, but
// nothing orders the two without an fsync before the head's rename.)
func TestFirstCommitSyncsNewDirectoriesBeforeTheHead(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	id := writeVolume(t, s, testKey, dir, tree{"f": "1"})
	var events []string
	syncDirHook = func(path string) { events = append(events, "sync "+path) }
	failpointHook = func(name string) { events = append(events, name) }
	defer func() { syncDirHook, failpointHook = nil, nil }()
	if _, err := s.Commit(id); err != nil {
		t.Fatal(err)
	}
	head := slices.Index(events, "write/"+fileHead+"/renamed")
	if head < 0 {
		t.Fatalf("no head written: %v", events)
	}
	cacheDir := s.cacheDir(testKey)
	for _, want := range []string{cacheDir, filepath.Dir(cacheDir), filepath.Join(s.Root(), dirCaches),
		filepath.Join(cacheDir, dirLayers), filepath.Join(cacheDir, dirGenerations)} {
		if !slices.Contains(events[:head], "sync "+want) {
			t.Errorf("%s was not fsynced before the head was written (events: %v)", want, events)
		}
	}
	if _, err := os.Stat(filepath.Join(cacheDir, fileHead)); err != nil {
		t.Fatal(err)
	}
}

// Long deletes run outside the cache's lock: a discarded volume, a deleted
// cache and the layers GC drops are renamed away under it, and deleted
// after it is released, so that one pod's 300,000 files stall no other
// volume of the cache. On main, they were deleted under the lock.
func TestLongDeletesRunOutsideTheCacheLock(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	var deletes, underLock int
	failpointHook = func(name string) {
		if name != "trash/deleting" {
			return
		}
		deletes++
		f, err := os.Open(filepath.Join(s.Root(), dirLocks, testKey.Namespace+"."+testKey.Name+".lock"))
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			underLock++
			return
		}
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	}
	defer func() { failpointHook = nil }()

	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"b": "2"}) })
	if err := s.Discard(writeVolume(t, s, testKey, dir, tree{"big": "x"})); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil { // drops the first generation's layer
		t.Fatal(err)
	}
	if err := s.DeleteCache(testKey); err != nil {
		t.Fatal(err)
	}
	if deletes < 3 || underLock > 0 {
		t.Fatalf("%d deletes, %d of them under the cache's lock: want at least 3, none under it", deletes, underLock)
	}
	assertNoOrphans(t, s)
}
