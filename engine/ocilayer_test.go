package engine

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// exportChain writes every layer of k's head as an OCI layer tar.
func exportChain(t *testing.T, s *Store, k Key) [][]byte {
	t.Helper()
	head, ok, err := s.head(k)
	if err != nil || !ok {
		t.Fatalf("head of %s: %v", k, err)
	}
	var out [][]byte
	for _, id := range head.Layers {
		var buf bytes.Buffer
		if err := s.WriteLayerTar(k, id, &buf); err != nil {
			t.Fatal(err)
		}
		out = append(out, buf.Bytes())
	}
	return out
}

// A cache's layers, written as OCI layer tars and imported into another
// store, give the same content: files, modes, owners, mtimes, symlinks
// (even ones pointing out of the cache), hard links, a file deleted in a
// later layer (whiteout) and a directory replaced in a later one (opaque).
// Writing the same layer twice gives the same bytes. Both formats of
// imported layers hold the same.
func TestLayerTarRoundTrip(t *testing.T) {
	forEachFormat(t, testLayerTarRoundTrip)
}

// forEachFormat runs a test once for each format of imported layers.
func forEachFormat(t *testing.T, test func(*testing.T, LayerFormat)) {
	for _, f := range []LayerFormat{LayerFormatDir, LayerFormatImage} {
		t.Run(string(f), func(t *testing.T) { test(t, f) })
	}
}

func testLayerTarRoundTrip(t *testing.T, format LayerFormat) {
	src, dir := newTestStore(t, Options{})
	stamp := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	commitTree(t, src, testKey, dir, func(mnt string) {
		writeTree(t, mnt, tree{"keep": "k", "gone": "g", "old/": "", "old/a": "a", "bin/": "", "bin/tool": "#!/bin/sh"})
		must(t, unix.Chmod(filepath.Join(mnt, "bin/tool"), 0o4755))
		must(t, os.Chown(filepath.Join(mnt, "keep"), 1234, 5678))
		must(t, os.Symlink("../../../etc/passwd", filepath.Join(mnt, "escape")))
		must(t, os.Link(filepath.Join(mnt, "keep"), filepath.Join(mnt, "keep-link")))
		must(t, os.Chtimes(filepath.Join(mnt, "keep"), stamp, stamp))
	})
	commitTree(t, src, testKey, dir, func(mnt string) {
		must(t, os.Remove(filepath.Join(mnt, "gone")))
		must(t, os.RemoveAll(filepath.Join(mnt, "old")))
		writeTree(t, mnt, tree{"old/": "", "old/b": "b", "new": "n"})
	})
	want := view(t, src, testKey, dir)
	tars := exportChain(t, src, testKey)
	if again := exportChain(t, src, testKey); !bytes.Equal(again[1], tars[1]) {
		t.Fatal("writing the same layer twice gave different bytes")
	}
	var names []string
	tr := tar.NewReader(bytes.NewReader(tars[1]))
	for h, err := tr.Next(); err == nil; h, err = tr.Next() {
		names = append(names, h.Name)
	}
	for _, wh := range []string{".wh.gone", "old/.wh..wh..opq"} {
		if !strings.Contains(strings.Join(names, " "), wh) {
			t.Errorf("the second layer's tar lacks %s: %v", wh, names)
		}
	}

	dst, dir2 := newTestStore(t, Options{LayerFormat: format})
	var staged []*StagedLayer
	for _, b := range tars {
		l, err := dst.ImportLayer(bytes.NewReader(b), ImportOptions{MaxBytes: 1 << 20, MaxEntries: 100})
		if err != nil {
			t.Fatal(err)
		}
		staged = append(staged, l)
	}
	g, err := dst.PublishLayers(testKey, staged, PublishOptions{Labels: map[string]string{"from": "registry"}})
	if err != nil || len(g.Layers) != 2 || g.Source != "import" {
		t.Fatalf("publish: %+v, %v", g, err)
	}
	assertTree(t, "the imported cache", view(t, dst, testKey, dir2), want)
	info, err := dst.Inspect(testKey)
	must(t, err)
	for _, l := range info.Layers {
		if l.Format != format {
			t.Errorf("layer %s kept as %s, want %s", l.ID, l.Format, format)
		}
	}

	// Metadata the tree comparison does not see.
	mnt := filepath.Join(dir2, "check")
	if _, err := dst.CreateVolume("check", testKey, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	must(t, dst.Mount("check", mnt))
	defer dst.Unmount("check")
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(mnt, "keep"), &st))
	if st.Uid != 1234 || st.Gid != 5678 || st.Nlink != 2 || st.Mtim.Nano() != stamp.UnixNano() {
		t.Errorf("keep: uid %d gid %d nlink %d mtime %v", st.Uid, st.Gid, st.Nlink, time.Unix(0, st.Mtim.Nano()).UTC())
	}
	must(t, unix.Lstat(filepath.Join(mnt, "bin/tool"), &st))
	if st.Mode&0o7777 != 0o4755 {
		t.Errorf("bin/tool mode %o", st.Mode&0o7777)
	}
	if target, err := os.Readlink(filepath.Join(mnt, "escape")); err != nil || target != "../../../etc/passwd" {
		t.Errorf("escape -> %q, %v", target, err)
	}
	must(t, dst.Unmount("check"))
	must(t, dst.Discard("check"))
	if _, err := dst.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, dst)
}

type entry struct {
	h    tar.Header
	body string
}

func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.h
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		must(t, tw.WriteHeader(&h))
		if e.body != "" {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	must(t, tw.Close())
	return buf.Bytes()
}

// A hostile or broken archive is refused and leaves nothing behind: it
// never writes outside its layer, never follows a symlink, never makes a
// device, never grows past its bounds.
func TestImportLayerRefusesHostileArchives(t *testing.T) {
	forEachFormat(t, testImportLayerRefusesHostileArchives)
}

func testImportLayerRefusesHostileArchives(t *testing.T, format LayerFormat) {
	s, dir := newTestStore(t, Options{LayerFormat: format})
	outside := filepath.Join(dir, "outside")
	must(t, os.Mkdir(outside, 0o755))
	reg := func(name, body string) entry { return entry{h: tar.Header{Name: name}, body: body} }
	tests := []struct {
		name string
		tar  []byte
		want string
	}{
		{"dot-dot", tarOf(t, reg("../escaped", "x")), "leaves the layer"},
		{"dot-dot inside", tarOf(t, reg("a/../../escaped", "x")), "leaves the layer"},
		{"absolute", tarOf(t, reg("/etc/evil", "x")), "an absolute path"},
		{"through a symlink", tarOf(t,
			entry{h: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: outside}},
			reg("link/evil", "x")), "its directory"},
		{"hard link out of the layer", tarOf(t, entry{h: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "../../etc/passwd"}}), "outside the layer"},
		{"hard link to a symlink", tarOf(t,
			entry{h: tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}},
			entry{h: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "s"}}), "not a regular file"},
		{"device", tarOf(t, entry{h: tar.Header{Name: "sda", Typeflag: tar.TypeBlock, Devmajor: 8}}), "a device file"},
		{"char device", tarOf(t, entry{h: tar.Header{Name: "null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}), "a device file"},
		{"too large", tarOf(t, reg("big", strings.Repeat("x", 2048))), "more than 1024 bytes"},
		{"too many entries", tarOf(t, reg("1", ""), reg("2", ""), reg("3", ""), reg("4", ""), reg("5", "")), "more than 4 entries"},
		{"empty whiteout", tarOf(t, reg(".wh.", "")), "a whiteout of nothing"},
		{"under a file", tarOf(t, reg("f", "x"), reg("f/g", "y")), "its directory"},
		{"hard link to itself", tarOf(t, entry{h: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "l"}}), "hard link"},
		{"truncated", tarOf(t, reg("f", strings.Repeat("x", 1000)))[:1024], "unexpected EOF"},
		{"not a tar", []byte(strings.Repeat("garbage!", 200)), "reading the archive"},
	}
	for _, tt := range tests {
		_, err := s.ImportLayer(bytes.NewReader(tt.tar), ImportOptions{MaxBytes: 1024, MaxEntries: 4})
		if !errors.Is(err, ErrUnsafeLayer) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want ErrUnsafeLayer mentioning %q", tt.name, err, tt.want)
		}
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("an import wrote outside its layer: %v", entries)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.Root(), dirTmp)); len(entries) != 0 {
		t.Errorf("refused imports left %d entries in tmp/", len(entries))
	}
	// A staged layer that is never published goes with Discard.
	l, err := s.ImportLayer(bytes.NewReader(tarOf(t, reg("ok", "fine"))), ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Bytes != 4 || l.Entries != 1 {
		t.Errorf("staged %d bytes in %d entries", l.Bytes, l.Entries)
	}
	l.Discard(s)
	if entries, _ := os.ReadDir(filepath.Join(s.Root(), dirTmp)); len(entries) != 0 {
		t.Errorf("a discarded layer left %d entries in tmp/", len(entries))
	}
}

// The digest of a layer's tar is what a registry would store it under: two
// stores holding the same content give the same digest.
func TestLayerTarDigestIsStable(t *testing.T) {
	digest := func() [32]byte {
		s, dir := newTestStore(t, Options{})
		commitTree(t, s, testKey, dir, func(mnt string) {
			writeTree(t, mnt, tree{"z": "1", "a/": "", "a/b": "2"})
			stamp := time.Unix(1_700_000_000, 0)
			for _, p := range []string{"z", "a/b", "a"} {
				must(t, os.Chtimes(filepath.Join(mnt, p), stamp, stamp))
			}
		})
		return sha256.Sum256(exportChain(t, s, testKey)[0])
	}
	if a, b := digest(), digest(); a != b {
		t.Fatal("the same content gave two digests")
	}
}

// FuzzImportLayer feeds arbitrary archives to ImportLayer: whatever it
// accepts or refuses, nothing is written outside the store, and nothing is
// left in tmp/ once the layer is discarded.
func FuzzImportLayer(f *testing.F) {
	f.Add(tarOf(f, entry{h: tar.Header{Name: "a/b", Typeflag: tar.TypeReg}, body: "x"}))
	f.Add(tarOf(f, entry{h: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "/tmp"}},
		entry{h: tar.Header{Name: "link/x", Typeflag: tar.TypeReg}, body: "x"}))
	f.Add(tarOf(f, entry{h: tar.Header{Name: "d/", Typeflag: tar.TypeDir}},
		entry{h: tar.Header{Name: "d/.wh..wh..opq", Typeflag: tar.TypeReg}},
		entry{h: tar.Header{Name: ".wh.gone", Typeflag: tar.TypeReg}},
		entry{h: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "d/../../x"}}))
	s, dir := newTestStore(f, Options{})
	outside := filepath.Join(dir, "outside")
	must(f, os.Mkdir(outside, 0o755))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := s.ImportLayer(bytes.NewReader(data), ImportOptions{MaxBytes: 1 << 20, MaxEntries: 1000})
		if err == nil {
			l.Discard(s)
		}
		if entries, _ := os.ReadDir(outside); len(entries) != 0 {
			t.Fatalf("an import wrote outside the store: %v", entries)
		}
		if entries, _ := os.ReadDir(filepath.Join(s.Root(), dirTmp)); len(entries) != 0 {
			t.Fatalf("an import left %d entries in tmp/", len(entries))
		}
	})
}
