package engine

import (
	"archive/tar"
	"bytes"
	"errors"
	"testing"
	"time"
)

// A fallback cache whose layers a live volume of another cache uses is in
// use: deleting it, or evicting it, is refused until that volume is gone.
// Before, only volumes of the cache itself counted, and the branch's
// commit then failed with ENOENT on every retry.
func TestFallbackUsersKeepTheirCache(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	main := Key{Namespace: "ns", Name: "main"}
	branch := Key{Namespace: "ns", Name: "feature"}
	commitTree(t, s, main, dir, func(mnt string) { writeTree(t, mnt, tree{"dep": "1"}) })

	if _, err := s.CreateVolume("b1", branch, VolumeOptions{Writable: true, From: []Key{main}}); err != nil {
		t.Fatal(err)
	}
	info, err := s.Inspect(main)
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Volumes) != 1 || info.Volumes[0] != "b1" {
		t.Errorf("Inspect(main).Volumes = %v, want the branch's volume b1 that reads main's layers", info.Volumes)
	}
	if err := s.DeleteCache(main); !errors.Is(err, ErrInUse) {
		t.Fatalf("deleting main under the branch's volume: %v, want ErrInUse", err)
	}
	if err := s.EvictIfIdle(main, 0); !errors.Is(err, ErrInUse) {
		t.Fatalf("evicting main under the branch's volume: %v, want ErrInUse", err)
	}
	writeTree(t, s.upperDir("b1"), tree{"b": "branch"})
	if _, err := s.Commit("b1"); err != nil {
		t.Fatalf("the branch's commit: %v", err)
	}
	assertTree(t, "the branch", view(t, s, branch, dir), tree{"dep": "1", "b": "branch"})
	if err := s.DeleteCache(main); err != nil {
		t.Fatalf("deleting main once nothing uses it: %v", err)
	}
	assertNoOrphans(t, s)
}

// Eviction judges idleness under the cache's lock: a cache used since the
// caller looked is not evicted.
func TestEvictIfIdle(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	if err := s.EvictIfIdle(testKey, time.Hour); !errors.Is(err, ErrInUse) {
		t.Fatalf("evicting a cache used a moment ago with a ttl of an hour: %v, want ErrInUse", err)
	}
	if _, err := s.CreateVolume("v1", testKey, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.EvictIfIdle(testKey, 0); !errors.Is(err, ErrInUse) {
		t.Fatalf("evicting a cache with a volume: %v, want ErrInUse", err)
	}
	must(t, s.Discard("v1"))
	if err := s.EvictIfIdle(testKey, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Inspect(testKey); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after the eviction: %v, want ErrNotFound", err)
	}
}

// stageTar stages a one-file layer for an import.
func stageTar(t *testing.T, s *Store, name, body string) *StagedLayer {
	t.Helper()
	l, err := s.ImportLayer(bytes.NewReader(tarOf(t, entry{h: tar.Header{Name: name}, body: body})), ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// An import of content committed before the head was refuses to publish,
// with ErrStale (a conflict, not an error to retry): a prefetch that began
// before a local commit never puts the older content back. Before, the
// head went back to the import and the local commit was never pushed.
func TestImportNeverReplacesANewerCommit(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	older := time.Now().Add(-time.Minute)
	staged := stageTar(t, s, "state", "imported")
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"state": "local"}) })
	head, _, err := s.head(testKey)
	if err != nil {
		t.Fatal(err)
	}

	_, err = s.PublishLayers(testKey, []*StagedLayer{staged}, PublishOptions{ContentTime: older})
	if !errors.Is(err, ErrStale) || !errors.Is(err, ErrConflict) {
		t.Fatalf("publishing an import older than the head: %v, want ErrStale", err)
	}
	after, _, err := s.head(testKey)
	if err != nil {
		t.Fatal(err)
	}
	if after.Number != head.Number || after.ID() != head.ID() {
		t.Fatalf("the head moved from %d (%s) to %d (%s)", head.Number, head.ID(), after.Number, after.ID())
	}
	assertTree(t, "the cache", view(t, s, testKey, dir), tree{"state": "local"})

	// A newer import does replace it (last writer wins).
	newer := stageTar(t, s, "state", "remote")
	g, err := s.PublishLayers(testKey, []*StagedLayer{newer}, PublishOptions{ContentTime: time.Now().Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if g.ID() == head.ID() {
		t.Errorf("the import has the identity %s of the commit it replaced", g.ID())
	}
	assertTree(t, "the cache", view(t, s, testKey, dir), tree{"state": "remote"})
	must(t, gcOnly(s))
	assertNoOrphans(t, s)
}

func gcOnly(s *Store) error { _, err := s.GC(); return err }

// A generation's identity never comes back: after the cache is deleted,
// the next commit is generation 1 again, with another identity, and what
// was recorded as pushed went with the cache.
func TestGenerationIdentityNeverComesBack(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	first := commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	if first.ID == "" || first.Generation != 1 {
		t.Fatalf("first commit = %+v, want generation 1 with an identity", first)
	}
	must(t, s.RecordPush(testKey, PushRecord{ID: first.ID, Ref: "registry/ns/project@sha256:1"}))
	if info, err := s.Inspect(testKey); err != nil || info.Pushed == nil || info.Pushed.ID != first.ID {
		t.Fatalf("Inspect = %+v, %v", info, err)
	}
	// A compaction keeps the identity: the content is the same.
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"b": "2"}) })
	second, _, _ := s.head(testKey)
	res, err := s.Compact(testKey)
	if err != nil || !res.Compacted {
		t.Fatalf("compact: %+v, %v", res, err)
	}
	compacted, _, _ := s.head(testKey)
	if compacted.ID() != second.ID() {
		t.Errorf("compaction changed the identity from %s to %s", second.ID(), compacted.ID())
	}

	must(t, s.DeleteCache(testKey))
	again := commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"c": "3"}) })
	if again.Generation != 1 || again.ID == first.ID || again.ID == "" {
		t.Fatalf("after the deletion: %+v; the first commit was %+v", again, first)
	}
	if info, err := s.Inspect(testKey); err != nil || info.Pushed != nil {
		t.Fatalf("after the deletion Inspect().Pushed = %+v, %v, want nothing", info.Pushed, err)
	}
	if err := s.RecordPush(Key{Namespace: "ns", Name: "gone"}, PushRecord{ID: "x"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("recording a push of a cache the node does not hold: %v, want ErrNotFound", err)
	}
}
