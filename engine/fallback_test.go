package engine

import (
	"os"
	"path/filepath"
	"testing"
)

// A cache with nothing yet starts from a fallback cache's head (a branch's
// first build from main's cache); its commit goes to its own cache, which
// gets its own copy of the base, and the fallback is never written.
func TestFallbackVolume(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	main := Key{Namespace: "ns", Name: "main"}
	branch := Key{Namespace: "ns", Name: "feature"}
	empty := Key{Namespace: "ns", Name: "nothing-yet"}
	commitTree(t, s, main, dir, func(mnt string) { writeTree(t, mnt, tree{"dep": "1", "d/": "", "d/gone": "x", "link": "-> dep"}) })
	commitTree(t, s, main, dir, func(mnt string) {
		if err := os.Remove(filepath.Join(mnt, "d/gone")); err != nil {
			t.Fatal(err)
		}
		writeTree(t, mnt, tree{"m2": "2"})
	})
	mainContent := tree{"dep": "1", "d/": "", "link": "-> dep", "m2": "2"}
	mainHead, _, err := s.head(main)
	if err != nil {
		t.Fatal(err)
	}

	// The first fallback has nothing: the second one is used.
	v, err := s.CreateVolume("b1", branch, VolumeOptions{Writable: true, From: []Key{empty, main}})
	if err != nil {
		t.Fatal(err)
	}
	if v.From == nil || *v.From != main || v.Generation != mainHead.Number || len(v.Layers) != 2 {
		t.Fatalf("volume = %+v, want main's generation %d (2 layers) as its base", v, mainHead.Number)
	}
	mnt := filepath.Join(dir, "b1")
	if err := s.Mount("b1", mnt); err != nil {
		t.Fatal(err)
	}
	assertTree(t, "the branch's first volume", readTree(t, mnt), mainContent)

	writeTree(t, mnt, tree{"b": "branch"})
	if err := os.Remove(filepath.Join(mnt, "dep")); err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount("b1"); err != nil {
		t.Fatal(err)
	}
	// While the volume waits for its commit, main moves on and is compacted
	// and collected: the volume's base stays.
	commitTree(t, s, main, dir, func(mnt string) { writeTree(t, mnt, tree{"m3": "3"}) })
	if _, err := s.Compact(main); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	res, err := s.Commit("b1")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Committed || res.Generation != 1 || res.ChainLength != 2 {
		t.Fatalf("branch commit = %+v, want the branch's generation 1: main's base merged + the branch's layer", res)
	}
	branchContent := tree{"d/": "", "link": "-> dep", "m2": "2", "b": "branch"}
	assertTree(t, "the branch after its commit", view(t, s, branch, dir), branchContent)
	assertTree(t, "main after the branch's commit", view(t, s, main, dir),
		tree{"dep": "1", "d/": "", "link": "-> dep", "m2": "2", "m3": "3"})

	// The branch has content now: its fallback is not used any more, and
	// main's collection leaves the branch's copy alone.
	v, err = s.CreateVolume("b2", branch, VolumeOptions{From: []Key{main}})
	if err != nil {
		t.Fatal(err)
	}
	if v.From != nil || v.Generation != 1 {
		t.Fatalf("second branch volume = %+v, want the branch's own generation 1", v)
	}
	if err := s.Discard("b2"); err != nil {
		t.Fatal(err)
	}
	commitTree(t, s, main, dir, func(mnt string) { writeTree(t, mnt, tree{"m4": "4"}) })
	if _, err := s.Compact(main); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertTree(t, "the branch after main's next compaction and GC", view(t, s, branch, dir), branchContent)
	assertNoOrphans(t, s)
}

// Nothing to fall back to: the volume starts empty on its own cache; a
// read-only volume of a fallback is discarded without writing anything.
func TestFallbackWithNothing(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	branch := Key{Namespace: "ns", Name: "feature"}
	v, err := s.CreateVolume("b1", branch, VolumeOptions{From: []Key{{Namespace: "ns", Name: "main"}, branch}})
	if err != nil {
		t.Fatal(err)
	}
	if v.From != nil || v.Generation != 0 || len(v.Layers) != 0 {
		t.Fatalf("volume = %+v, want an empty start", v)
	}
	if err := s.Discard("b1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("b2", branch, VolumeOptions{From: []Key{{Namespace: "ns", Name: "Bad_Name"}}}); err == nil {
		t.Fatal("a fallback with an invalid name was accepted")
	}
	main := Key{Namespace: "ns", Name: "main"}
	commitTree(t, s, main, dir, func(mnt string) { writeTree(t, mnt, tree{"dep": "1"}) })
	v, err = s.CreateVolume("b3", branch, VolumeOptions{From: []Key{main}})
	if err != nil || v.From == nil {
		t.Fatalf("read-only volume from main: %+v, %v", v, err)
	}
	if _, err := s.Commit("b3"); err == nil {
		t.Fatal("a read-only volume started from a fallback was committed")
	}
	if err := s.Discard("b3"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}
