package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestReproducibleLayout(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin", "tool"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	os.Symlink("tool", filepath.Join(root, "bin", "alias"))
	out := t.TempDir()
	o := options{ref: "localhost/test/tool:dev", rootfs: root, entrypoint: []string{"/bin/tool"}}

	o.out = filepath.Join(out, "a.tar")
	d1, err := write(o)
	if err != nil {
		t.Fatal(err)
	}
	// Touch everything: times must not matter.
	later := time.Now().Add(time.Hour)
	os.Chtimes(filepath.Join(root, "bin", "tool"), later, later)
	o.out = filepath.Join(out, "b.tar")
	d2, err := write(o)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(filepath.Join(out, "a.tar"))
	b, _ := os.ReadFile(filepath.Join(out, "b.tar"))
	if d1 != d2 || !bytes.Equal(a, b) {
		t.Fatalf("two builds of the same rootfs differ: %s vs %s", d1, d2)
	}

	// The layout is well formed: index -> manifest -> config, whose diff_id
	// is the uncompressed layer's digest.
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(a))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	blob := func(d string) []byte { return files["blobs/sha256/"+d[len("sha256:"):]] }
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	must(t, json.Unmarshal(files["index.json"], &index))
	if len(index.Manifests) != 1 || index.Manifests[0].Digest != d1 ||
		index.Manifests[0].Annotations["io.containerd.image.name"] != o.ref {
		t.Fatalf("index = %+v", index)
	}
	var manifest struct {
		Config descriptor   `json:"config"`
		Layers []descriptor `json:"layers"`
	}
	must(t, json.Unmarshal(blob(d1), &manifest))
	var config struct {
		Config imageConfig `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	must(t, json.Unmarshal(blob(manifest.Config.Digest), &config))
	zr, err := gzip.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	must(t, err)
	layer, _ := io.ReadAll(zr)
	sum := sha256.Sum256(layer)
	if config.RootFS.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Fatal("diff_id does not match the layer")
	}
	if config.Config.Entrypoint[0] != "/bin/tool" {
		t.Fatalf("entrypoint = %v", config.Config.Entrypoint)
	}
	var names []string
	lr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := lr.Next()
		if err != nil {
			break
		}
		if h.Uid != 0 || !h.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("%s: uid %d mtime %v", h.Name, h.Uid, h.ModTime)
		}
		names = append(names, h.Name)
	}
	want := []string{"bin/", "bin/alias", "bin/tool"}
	if len(names) != 3 || names[0] != want[0] || names[1] != want[1] || names[2] != want[2] {
		t.Fatalf("layer entries = %v, want %v", names, want)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
