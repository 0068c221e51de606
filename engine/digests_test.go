package engine

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A compaction keeps what its head's content is: the labels and the time
// of the commit it carries on.
func TestCompactionKeepsContentTimeAndLabels(t *testing.T) {
	requireRoot(t)
	s, dir := newTestStore(t, Options{CompactThreshold: 2})
	for _, name := range []string{"a", "b"} {
		commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{name: "x"}) })
	}
	before, err := s.Inspect(testKey)
	must(t, err)
	last := before.Head.Created
	time.Sleep(10 * time.Millisecond)
	res, err := s.Compact(testKey)
	if err != nil || !res.Compacted {
		t.Fatalf("compact: %+v, %v", res, err)
	}
	after, err := s.Inspect(testKey)
	must(t, err)
	h := after.Head
	if h.Source != "compact" || !h.Committed().Equal(last) || h.Created.Equal(last) {
		t.Errorf("compacted head: source %s, committed %v, created %v; the last commit was at %v", h.Source, h.Committed(), h.Created, last)
	}
}

// Layers pulled before are found by their digest and reused in a new
// generation; the records go with their layers.
func TestLayerDigestsAndReuse(t *testing.T) {
	requireRoot(t)
	src, dir := newTestStore(t, Options{})
	commitTree(t, src, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"base": "1"}) })
	info, _ := src.Inspect(testKey)
	var tarball bytes.Buffer
	must(t, src.WriteLayerTar(testKey, info.Head.Layers[0], &tarball))

	dst, dir2 := newTestStore(t, Options{})
	l, err := dst.ImportLayer(bytes.NewReader(tarball.Bytes()), ImportOptions{})
	must(t, err)
	when := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	g1, err := dst.PublishLayers(testKey, []*StagedLayer{l}, PublishOptions{ContentTime: when})
	must(t, err)
	if !g1.Committed().Equal(when) {
		t.Errorf("imported generation committed at %v, want %v", g1.Committed(), when)
	}
	rec := LayerDigest{Digest: "sha256:aa", DiffID: "sha256:bb", Size: 3, MediaType: "gzip"}
	must(t, dst.SetLayerDigest(testKey, g1.Layers[0], rec))
	if got, ok, err := dst.LayerDigest(testKey, g1.Layers[0]); err != nil || !ok || got != rec {
		t.Fatalf("LayerDigest: %+v %v %v", got, ok, err)
	}
	id, ok, err := dst.LayerWithDigest(testKey, "sha256:aa")
	if err != nil || !ok || id != g1.Layers[0] {
		t.Fatalf("LayerWithDigest: %q %v %v", id, ok, err)
	}
	if _, ok, _ := dst.LayerWithDigest(testKey, "sha256:cc"); ok {
		t.Error("found a layer for a digest never recorded")
	}

	// A second generation: the recorded layer again, plus a new one.
	var top bytes.Buffer
	commitTree(t, src, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"top": "2"}) })
	info, _ = src.Inspect(testKey)
	must(t, src.WriteLayerTar(testKey, info.Head.Layers[1], &top))
	l2, err := dst.ImportLayer(bytes.NewReader(top.Bytes()), ImportOptions{})
	must(t, err)
	g2, err := dst.PublishLayers(testKey, []*StagedLayer{Reuse(id), l2}, PublishOptions{})
	must(t, err)
	if len(g2.Layers) != 2 || g2.Layers[0] != id {
		t.Fatalf("second generation %v does not reuse %s", g2.Layers, id)
	}
	assertTree(t, "the second import", view(t, dst, testKey, dir2), tree{"base": "1", "top": "2"})
	if _, err := dst.PublishLayers(testKey, []*StagedLayer{Reuse("nosuchlayer")}, PublishOptions{}); err == nil {
		t.Error("published a generation with a layer the cache does not have")
	}

	// Once no generation uses the layer, GC removes it and its record.
	l3, err := dst.ImportLayer(bytes.NewReader(top.Bytes()), ImportOptions{})
	must(t, err)
	_, err = dst.PublishLayers(testKey, []*StagedLayer{l3}, PublishOptions{})
	must(t, err)
	if _, err := dst.GC(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dst.digestsDir(testKey), id+".json")); !os.IsNotExist(err) {
		t.Errorf("the record of a collected layer is still there: %v", err)
	}
	if _, ok, _ := dst.LayerWithDigest(testKey, "sha256:aa"); ok {
		t.Error("a collected layer is still found by its digest")
	}
	assertNoOrphans(t, dst)
}
