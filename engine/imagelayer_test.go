package engine

import (
	"archive/tar"
	"bytes"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// importImages publishes tars as image layers of k, bottom first.
func importImages(t testing.TB, s *Store, k Key, when time.Time, tars ...[]byte) Generation {
	t.Helper()
	var staged []*StagedLayer
	for _, b := range tars {
		l, err := s.ImportLayer(bytes.NewReader(b), ImportOptions{})
		must(t, err)
		if !l.image {
			t.Fatalf("imported as a directory with LayerFormat %s", s.opts.LayerFormat)
		}
		staged = append(staged, l)
	}
	g, err := s.PublishLayers(k, staged, PublishOptions{ContentTime: when})
	must(t, err)
	return g
}

func imageTars(t testing.TB) [][]byte {
	reg := func(name, body string) entry {
		return entry{h: tar.Header{Name: name, Mode: 0o644, ModTime: time.Unix(1_700_000_000, 5), Format: tar.FormatPAX}, body: body}
	}
	dir := func(name string) entry {
		return entry{h: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755}}
	}
	return [][]byte{
		tarOf(t, reg("a", "1"), dir("d/"), reg("d/x", "x"), reg("f", "file"), reg("gone", "g")),
		tarOf(t, reg(".wh.gone", ""), reg("b", "2")),
	}
}

// erofsMountsBelow counts the EROFS mounts below dir.
func erofsMountsBelow(t testing.TB, dir string) int {
	t.Helper()
	mounts, err := readMountInfo()
	must(t, err)
	n := 0
	for _, m := range mounts {
		if m.FSType == "erofs" && strings.HasPrefix(m.MountPoint, dir+"/") {
			n++
		}
	}
	return n
}

// After a reboot (or in an agent's new mount namespace) an image layer's
// mount point is an empty directory: the store mounts the image again
// before anything reads it, at start (MountImageLayers) or when a volume
// is mounted.
func TestImageLayersAreMountedAgainAfterAReboot(t *testing.T) {
	s, dir := newTestStore(t, Options{LayerFormat: LayerFormatImage})
	importImages(t, s, testKey, time.Now(), imageTars(t)...)
	want := tree{"a": "1", "b": "2", "d/": "", "d/x": "x", "f": "file"}
	assertTree(t, "imported", view(t, s, testKey, dir), want)
	if n := erofsMountsBelow(t, s.Root()); n != 2 {
		t.Fatalf("%d EROFS mounts after a read, want 2", n)
	}
	reboot := func() *Store {
		unmountBelow(t, s.Root())
		again, err := Open(s.Root(), Options{LayerFormat: LayerFormatImage})
		must(t, err)
		return again
	}
	s = reboot()
	n, err := s.MountImageLayers()
	if err != nil || n != 2 {
		t.Fatalf("MountImageLayers: %d, %v; want 2", n, err)
	}
	if n, _ := s.MountImageLayers(); n != 0 {
		t.Errorf("MountImageLayers mounted %d layers already mounted", n)
	}
	assertTree(t, "after a reboot", view(t, s, testKey, dir), want)
	s = reboot()
	assertTree(t, "after a reboot, mounted by the volume", view(t, s, testKey, dir), want)
	info, err := s.Inspect(testKey)
	must(t, err)
	for _, l := range info.Layers {
		if l.Format != LayerFormatImage || !l.Mounted {
			t.Errorf("inspect: layer %+v", l)
		}
	}
	assertNoOrphans(t, s)
}

// GC and deletion unmount an image layer before they remove it, and usage
// counts the image file.
func TestImageLayersAreUnmountedBeforeRemoval(t *testing.T) {
	s, dir := newTestStore(t, Options{LayerFormat: LayerFormatImage})
	tars := imageTars(t)
	g1 := importImages(t, s, testKey, time.Now().Add(-time.Hour), tars...)
	view(t, s, testKey, dir)
	u, err := s.Usage(testKey)
	must(t, err)
	if len(u.Layers) != 2 || u.Bytes < 2*erofsBlockSize || u.Inodes != 2 {
		t.Errorf("usage of two image layers: %+v", u)
	}
	// A newer import replaces the chain: GC removes the old images.
	importImages(t, s, testKey, time.Now(), tarOf(t, entry{h: tar.Header{Name: "new", Mode: 0o644}, body: "n"}))
	view(t, s, testKey, dir)
	res, err := s.GC()
	must(t, err)
	if res.Layers != 2 {
		t.Errorf("GC removed %d layers, want the 2 of the old chain", res.Layers)
	}
	for _, id := range g1.Layers {
		if ok, _ := s.layerExists(testKey, id); ok {
			t.Errorf("layer %s still there after GC", id)
		}
	}
	assertNoOrphans(t, s)
	if n := erofsMountsBelow(t, s.Root()); n != 1 {
		t.Errorf("%d EROFS mounts after GC, want the new layer's only", n)
	}
	must(t, s.DeleteCache(testKey))
	if n := erofsMountsBelow(t, s.Root()); n != 0 {
		t.Errorf("%d EROFS mounts after the cache was deleted", n)
	}
	assertNoOrphans(t, s)
}

// Compaction never copies a pulled image: it merges the commits on top of
// the images into one directory layer that keeps their whiteouts, so that
// the images' deleted or replaced names stay hidden.
func TestCompactionKeepsImageLayers(t *testing.T) {
	s, dir := newTestStore(t, Options{LayerFormat: LayerFormatImage, CompactThreshold: 4})
	g := importImages(t, s, testKey, time.Now().Add(-time.Hour), imageTars(t)...)
	commitTree(t, s, testKey, dir, func(mnt string) {
		must(t, os.Remove(filepath.Join(mnt, "a")))
		writeTree(t, mnt, tree{"c": "3"})
	})
	commitTree(t, s, testKey, dir, func(mnt string) {
		must(t, os.RemoveAll(filepath.Join(mnt, "d")))
		must(t, os.Remove(filepath.Join(mnt, "f")))
		writeTree(t, mnt, tree{"d/": "", "d/y": "y", "f/": "", "f/z": "z"})
	})
	want := view(t, s, testKey, dir)
	assertTree(t, "before compaction", want, tree{"b": "2", "c": "3", "d/": "", "d/y": "y", "f/": "", "f/z": "z"})
	res, err := s.CompactIfNeeded(testKey)
	must(t, err)
	if !res.Compacted || res.ChainLength != 3 {
		t.Fatalf("compaction: %+v, want the 2 images and 1 merged layer", res)
	}
	head, _, err := s.head(testKey)
	must(t, err)
	if head.Layers[0] != g.Layers[0] || head.Layers[1] != g.Layers[1] {
		t.Errorf("the images were not kept at the bottom: %v, was %v", head.Layers, g.Layers)
	}
	assertTree(t, "after compaction", view(t, s, testKey, dir), want)
	// Images and one commit: nothing to merge, even at the threshold.
	gone, err := s.Compact(testKey)
	if err != nil || gone.Compacted {
		t.Errorf("compaction of images + 1 layer: %+v, %v", gone, err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}

// A volume started from a cache of image layers commits into another
// cache: its base is merged, the images' files copied (they are on
// another file system), with their metadata.
func TestFallbackFromImageLayersCommits(t *testing.T) {
	s, dir := newTestStore(t, Options{LayerFormat: LayerFormatImage})
	importImages(t, s, testKey, time.Now(), imageTars(t)...)
	branch := Key{Namespace: testKey.Namespace, Name: "branch"}
	id := "fallback"
	if _, err := s.CreateVolume(id, branch, VolumeOptions{Writable: true, From: []Key{testKey}}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt-fallback")
	must(t, s.Mount(id, mnt))
	writeTree(t, mnt, tree{"mine": "m"})
	must(t, s.Unmount(id))
	if _, err := s.Commit(id); err != nil {
		t.Fatal(err)
	}
	assertTree(t, "the branch", view(t, s, branch, dir), tree{"a": "1", "b": "2", "d/": "", "d/x": "x", "f": "file", "mine": "m"})
	head, _, err := s.head(branch)
	must(t, err)
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(s.layerPath(branch, head.Layers[0]), "a"), &st))
	if st.Mtim.Sec != 1_700_000_000 || st.Mtim.Nsec != 5 || st.Mode&0o7777 != 0o644 {
		t.Errorf("copied file: mtime %v, mode %o", st.Mtim, st.Mode&0o7777)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
}

// LayerFormatDir never writes an image; an unknown format is refused.
func TestLayerFormatOption(t *testing.T) {
	s, _ := newTestStore(t, Options{LayerFormat: LayerFormatDir})
	l, err := s.ImportLayer(bytes.NewReader(imageTars(t)[0]), ImportOptions{})
	must(t, err)
	if l.image {
		t.Error("LayerFormatDir imported an image")
	}
	l.Discard(s)
	if f, err := s.ImportFormat(); f != LayerFormatDir || err != nil {
		t.Errorf("ImportFormat: %s, %v", f, err)
	}
	auto, _ := newTestStore(t, Options{})
	if f, err := auto.ImportFormat(); f != LayerFormatImage || err != nil {
		t.Errorf("auto on a kernel with file-backed EROFS mounts: %s, %v", f, err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "s"), Options{LayerFormat: "squashfs"}); err == nil {
		t.Error("an unknown layer format was accepted")
	}
}

// listing describes every entry below root without opening FIFOs: type,
// mode, owner, link count, content or target, and the mtime of what is not
// a directory (directories the archive did not name get the import's
// time).
func listing(t testing.TB, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		st := fi.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("%o %d:%d", st.Mode, st.Uid, st.Gid)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if rel == "." {
				return nil
			}
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" -> %q %d.%09d", target, st.Mtim.Sec, st.Mtim.Nsec)
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" n%d %q %d.%09d", st.Nlink, b, st.Mtim.Sec, st.Mtim.Nsec)
		default:
			desc += fmt.Sprintf(" %d.%09d", st.Mtim.Sec, st.Mtim.Nsec)
		}
		out[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatalf("listing %s: %v", root, err)
	}
	return out
}

// FuzzImageLayer feeds the same archive to both formats of import: they
// accept or refuse it alike, and what they accept reads back the same
// through a volume, the image mounted by the kernel. So the writer's
// output is always an image the kernel mounts, and it never holds what a
// directory import would have refused.
func FuzzImageLayer(f *testing.F) {
	reg := func(name, body string, mode int64) entry {
		return entry{h: tar.Header{Name: name, Mode: mode, Uid: 7, Gid: 8, ModTime: time.Unix(1_600_000_000, 123), Format: tar.FormatPAX}, body: body}
	}
	f.Add(tarOf(f, reg("a/b", "x", 0o644), reg("c", "", 0o4755)))
	f.Add(tarOf(f, entry{h: tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o750}},
		reg("d/.wh..wh..opq", "", 0), reg(".wh.gone", "", 0), reg("d/f", "data", 0o600),
		entry{h: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "d/f"}},
		entry{h: tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: "../../etc"}},
		entry{h: tar.Header{Name: "p", Typeflag: tar.TypeFifo, Mode: 0o666}}))
	f.Add(tarOf(f, reg("x", string(bytes.Repeat([]byte("y"), 3*erofsBlockSize+5)), 0o644), reg("x/y", "", 0)))
	dirs, dir := newTestStore(f, Options{LayerFormat: LayerFormatDir})
	images, _ := newTestStore(f, Options{LayerFormat: LayerFormatImage})
	n := 0
	f.Fuzz(func(t *testing.T, data []byte) {
		n++
		k := Key{Namespace: "fuzz", Name: fmt.Sprintf("c%d", n)}
		opts := ImportOptions{MaxBytes: 1 << 20, MaxEntries: 1000}
		ld, errDir := dirs.ImportLayer(bytes.NewReader(data), opts)
		li, errImage := images.ImportLayer(bytes.NewReader(data), opts)
		if (errDir == nil) != (errImage == nil) {
			t.Fatalf("the formats disagree: directory %v, image %v", errDir, errImage)
		}
		if errDir != nil {
			return
		}
		_, err := dirs.PublishLayers(k, []*StagedLayer{ld}, PublishOptions{})
		must(t, err)
		_, err = images.PublishLayers(k, []*StagedLayer{li}, PublishOptions{})
		must(t, err)
		got, want := viewListing(t, images, k, dir), viewListing(t, dirs, k, dir)
		if !maps.Equal(got, want) {
			t.Fatalf("the image reads back\n%v\nthe directory\n%v", got, want)
		}
		must(t, images.DeleteCache(k))
		must(t, dirs.DeleteCache(k))
	})
}

func viewListing(t testing.TB, s *Store, k Key, dir string) map[string]string {
	t.Helper()
	id := "view" + randomID()
	_, err := s.CreateVolume(id, k, VolumeOptions{})
	must(t, err)
	mnt := filepath.Join(dir, "mnt-"+id)
	must(t, s.Mount(id, mnt))
	defer func() {
		must(t, s.Unmount(id))
		must(t, s.Discard(id))
		os.Remove(mnt)
	}()
	return listing(t, mnt)
}
