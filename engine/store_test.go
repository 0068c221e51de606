package engine

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCommitRoundTrip(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	want := tree{"a": "1", "d/": "", "d/b": "2", "link": "-> d/b"}
	res := commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, want) })
	if !res.Committed || res.Generation != 1 || res.ChainLength != 1 {
		t.Fatalf("commit = %+v, want generation 1 with 1 layer", res)
	}
	assertTree(t, "next volume", view(t, s, testKey, dir), want)

	info, err := s.Inspect(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if info.Head == nil || info.Head.Number != 1 || len(info.Volumes) != 0 {
		t.Fatalf("inspect = %+v, want head 1 and no volumes", info)
	}
	assertNoOrphans(t, s)
}

func TestEmptyUpperCommitsNothing(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	res := commitTree(t, s, testKey, dir, func(string) {})
	if res.Committed {
		t.Fatalf("empty volume committed: %+v", res)
	}
	if _, err := s.Inspect(testKey); !errors.Is(err, ErrNotFound) {
		t.Fatalf("inspect after empty commit: err = %v, want ErrNotFound", err)
	}
	if vols, _ := s.Volumes(); len(vols) != 0 {
		t.Fatalf("volume left after empty commit: %v", vols)
	}
}

// A volume keeps the generation it started with, however many commits
// follow; its own commit replaces the head (last writer wins).
func TestSnapshotIsolation(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"v": "1"}) })

	if _, err := s.CreateVolume("a", testKey, VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mntA := filepath.Join(dir, "a")
	if err := s.Mount("a", mntA); err != nil {
		t.Fatal(err)
	}
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"v": "2", "b-only": "b"}) })

	assertTree(t, "volume A after B's commit", readTree(t, mntA), tree{"v": "1"})
	assertTree(t, "new volume after B's commit", view(t, s, testKey, dir), tree{"v": "2", "b-only": "b"})

	writeTree(t, mntA, tree{"a-only": "a"})
	if err := s.Unmount("a"); err != nil {
		t.Fatal(err)
	}
	res, err := s.Commit("a")
	if err != nil {
		t.Fatal(err)
	}
	if res.Generation != 3 || res.ChainLength != 2 {
		t.Fatalf("A's commit = %+v, want generation 3 = A's base layer + A's layer", res)
	}
	assertTree(t, "after A's commit", view(t, s, testKey, dir), tree{"v": "1", "a-only": "a"})
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}

func TestWhiteoutsAndOpaqueDirsSurviveCommitAndCompaction(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) {
		writeTree(t, mnt, tree{
			"gone": "x", "kept": "k",
			"replaced/": "", "replaced/old1": "o", "replaced/sub/old2": "o",
			"pruned/": "", "pruned/drop": "d", "pruned/stay": "s",
			"type-change": "was a file",
		})
	})
	commitTree(t, s, testKey, dir, func(mnt string) {
		must(t, os.Remove(filepath.Join(mnt, "gone")))
		// rm -rf and mkdir of a lower dir: overlay makes it opaque.
		must(t, os.RemoveAll(filepath.Join(mnt, "replaced")))
		writeTree(t, mnt, tree{"replaced/new": "n"})
		must(t, os.Remove(filepath.Join(mnt, "pruned/drop")))
		must(t, os.Remove(filepath.Join(mnt, "type-change")))
		writeTree(t, mnt, tree{"type-change/inside": "now a dir"})
	})
	want := tree{
		"kept": "k", "replaced/": "", "replaced/new": "n",
		"pruned/": "", "pruned/stay": "s", "type-change/": "", "type-change/inside": "now a dir",
	}
	info, _ := s.Inspect(testKey)
	top := s.layerPath(testKey, info.Head.Layers[1])
	if !isWhiteout(t, filepath.Join(top, "gone")) || !hasOpaque(t, filepath.Join(top, "replaced")) {
		t.Fatal("the committed layer should carry a whiteout for gone and an opaque replaced/ (is this overlayfs?)")
	}
	assertTree(t, "after commit", view(t, s, testKey, dir), want)

	res, err := s.Compact(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Compacted || res.ChainLength != 1 {
		t.Fatalf("compact = %+v, want one layer", res)
	}
	assertTree(t, "after compaction", view(t, s, testKey, dir), want)
	info, _ = s.Inspect(testKey)
	merged := s.layerPath(testKey, info.Head.Layers[0])
	assertTree(t, "merged layer on disk", readTree(t, merged), want)
	if hasOpaque(t, filepath.Join(merged, "replaced")) {
		t.Error("merged layer carries overlay's opaque xattr")
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
	assertTree(t, "after GC", view(t, s, testKey, dir), want)
}

func TestCompactionKeepsMountedVolumesAndConcurrentCommits(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	for i := range 4 {
		commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"n": string(rune('0' + i))}) })
	}
	if _, err := s.CreateVolume("old", testKey, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "old")
	must(t, s.Mount("old", mnt))
	if _, err := s.Compact(testKey); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	// The old chain is still there for the mounted volume.
	assertTree(t, "mounted volume after compaction and GC", readTree(t, mnt), tree{"n": "3"})

	// Even with its metadata lost, GC keeps what a live mount uses: the
	// mount table is the source of truth.
	info, _ := s.Inspect(testKey)
	must(t, os.Remove(filepath.Join(s.volumeDir("old"), fileVolume)))
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertTree(t, "mounted volume after losing its metadata", readTree(t, mnt), tree{"n": "3"})
	if info.Head.Number <= 4 {
		t.Fatalf("head after compaction = %d, want a new generation", info.Head.Number)
	}
	must(t, unix.Unmount(mnt, 0))
}

func TestCommitAndDiscardRules(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	if _, err := s.CreateVolume("ro", testKey, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit("ro"); !errors.Is(err, ErrNotWritable) {
		t.Fatalf("commit of a read-only volume: err = %v, want ErrNotWritable", err)
	}
	if _, err := s.CreateVolume("rw", testKey, VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "rw")
	must(t, s.Mount("rw", mnt))
	must(t, s.Mount("rw", mnt)) // idempotent
	if points, _ := s.MountPoints("rw"); len(points) != 1 {
		t.Fatalf("mounted twice at the same target: %v", points)
	}
	if id, err := s.VolumeAt(mnt); err != nil || id != "rw" {
		t.Fatalf("VolumeAt = %q, %v", id, err)
	}
	writeTree(t, mnt, tree{"x": "1"})
	if _, err := s.Commit("rw"); !errors.Is(err, ErrMounted) {
		t.Fatalf("commit of a mounted volume: err = %v, want ErrMounted", err)
	}
	if err := s.Discard("rw"); !errors.Is(err, ErrMounted) {
		t.Fatalf("discard of a mounted volume: err = %v, want ErrMounted", err)
	}
	if err := s.DeleteCache(testKey); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete of a cache with no commit: err = %v, want ErrNotFound", err)
	}
	must(t, s.Unmount("rw"))
	must(t, s.Unmount("rw")) // idempotent
	if _, err := s.CreateVolume("rw", Key{Namespace: "other", Name: "x"}, VolumeOptions{}); !errors.Is(err, ErrConflict) {
		t.Fatalf("re-creating a volume on another cache: err = %v, want ErrConflict", err)
	}
	if _, err := s.Commit("rw"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteCache(testKey); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete of a cache with a volume: err = %v, want ErrInUse", err)
	}
	must(t, s.Discard("ro"))
	must(t, s.Discard("ro")) // idempotent
	must(t, s.DeleteCache(testKey))
	if _, err := os.Stat(s.cacheDir(testKey)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cache dir after delete: %v", err)
	}
	if _, err := s.Volume("../x"); err == nil {
		t.Fatal("a volume ID with .. was accepted")
	}
}

// Caches of the same name in two namespaces share nothing.
func TestNamespacesAreIsolated(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	a, b := Key{Namespace: "team-a", Name: "x"}, Key{Namespace: "team-b", Name: "x"}
	commitTree(t, s, a, dir, func(mnt string) { writeTree(t, mnt, tree{"owner": "a"}) })
	assertTree(t, "team-b/x", view(t, s, b, dir), tree{})
	commitTree(t, s, b, dir, func(mnt string) { writeTree(t, mnt, tree{"owner": "b"}) })
	assertTree(t, "team-a/x", view(t, s, a, dir), tree{"owner": "a"})
	assertTree(t, "team-b/x", view(t, s, b, dir), tree{"owner": "b"})
}

func TestUsage(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	big := string(make([]byte, 1<<20))
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"big": big}) })
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"small": "s"}) })
	u, err := s.Usage(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Layers) != 2 || u.Bytes < 1<<20 || u.Bytes > 2<<20 {
		t.Fatalf("usage = %+v, want 2 layers and about 1 MiB", u)
	}
	// Compaction links files: the merged layer and the old ones share the
	// big file's inode, which is counted once.
	if _, err := s.Compact(testKey); err != nil {
		t.Fatal(err)
	}
	u2, err := s.Usage(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if len(u2.Layers) != 3 || u2.Bytes > u.Bytes+64<<10 {
		t.Fatalf("usage after compaction = %+v, want 3 layers sharing the big file (before: %d bytes)", u2, u.Bytes)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func isWhiteout(t testing.TB, path string) bool {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

func hasOpaque(t testing.TB, path string) bool {
	buf := make([]byte, 4)
	n, err := unix.Lgetxattr(path, xattrOpaque, buf)
	return err == nil && n == 1 && buf[0] == 'y'
}
