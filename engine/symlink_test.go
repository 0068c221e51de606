package engine

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A build may write any symlink into its cache. Compaction, GC, usage and
// deletion must not follow one out of the store.
func TestSymlinksNeverLeadOutOfTheStore(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	outside := filepath.Join(dir, "outside")
	writeTree(t, outside, tree{"precious": "keep me", "sub/": "", "sub/deep": string(make([]byte, 4<<20))})
	old := time.Unix(1_000_000, 0)
	must(t, os.Chtimes(outside, old, old))
	before := readTree(t, outside)

	evil := tree{
		"to-root": "-> /", "up": "-> ../../../../../../..", "abs": "-> " + outside,
		"sub-link": "-> " + filepath.Join(outside, "sub"),
		"d/":       "", "d/x": "1",
	}
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, evil) })
	commitTree(t, s, testKey, dir, func(mnt string) {
		// Replace symlinks with dirs and a dir with a symlink: compaction
		// must remove the link itself, never what it points to.
		must(t, os.Remove(filepath.Join(mnt, "abs")))
		writeTree(t, mnt, tree{"abs/inner": "2"})
		must(t, os.RemoveAll(filepath.Join(mnt, "d")))
		must(t, os.Symlink(outside, filepath.Join(mnt, "d")))
		must(t, os.Remove(filepath.Join(mnt, "sub-link")))
	})

	u, err := s.Usage(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if u.Bytes > 1<<20 {
		t.Errorf("usage counted %d bytes: it followed a symlink out of the store", u.Bytes)
	}
	if _, err := s.Compact(testKey); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	want := tree{"to-root": "-> /", "up": "-> ../../../../../../..", "abs/": "", "abs/inner": "2", "d": "-> " + outside}
	info, _ := s.Inspect(testKey)
	assertTree(t, "merged layer", readTree(t, s.layerPath(testKey, info.Head.Layers[0])), want)
	must(t, s.DeleteCache(testKey))

	assertTree(t, "outside the store", readTree(t, outside), before)
	if st, err := os.Stat(outside); err != nil || !st.ModTime().Equal(old) {
		t.Errorf("outside dir was touched: %v %v", st.ModTime(), err)
	}
}

// A layer directory replaced by a symlink (tampering with the store itself)
// is refused, not followed.
func TestTamperedLayerSymlinkIsRefused(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"b": "2"}) })
	outside := filepath.Join(dir, "outside")
	writeTree(t, outside, tree{"big": string(make([]byte, 4<<20))})
	info, _ := s.Inspect(testKey)
	layer := s.layerPath(testKey, info.Head.Layers[0])
	must(t, os.RemoveAll(layer))
	must(t, os.Symlink(outside, layer))

	if _, err := s.Usage(testKey); err == nil {
		t.Error("usage followed a layer that is a symlink")
	}
	if _, err := s.Compact(testKey); err == nil {
		t.Error("compaction followed a layer that is a symlink")
	}
	assertTree(t, "outside the store", readTree(t, outside), tree{"big": string(make([]byte, 4<<20))})
}
