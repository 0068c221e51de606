package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/testenv"
)

// A cache made with the CLI is pushed to a real registry and pulled into
// other stores, as image layers and as directories, with the node agent's
// code: what was committed reads back the same, and inspect shows how each
// layer is kept.
func TestCLIPushAndPull(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	dir := t.TempDir()
	src, mnt := filepath.Join(dir, "src"), filepath.Join(dir, "mnt")
	testenv.UnmountBelow(t, dir) // the volumes, and the stores' image layers
	if r := lc(t, src, "mount", "ci/demo", mnt, "--write"); r.code != 0 {
		t.Fatalf("mount: %+v", r)
	}
	must(t, os.MkdirAll(filepath.Join(mnt, "deps/lib"), 0o755))
	must(t, os.WriteFile(filepath.Join(mnt, "deps/lib/a.jar"), []byte("jar"), 0o644))
	if r := lc(t, src, "umount", mnt, "--commit"); r.code != 0 {
		t.Fatalf("umount --commit: %+v", r)
	}
	ref := reg.Addr + "/ci/demo:seed"
	if r := lc(t, src, "push", "ci/demo", ref, "--registry-insecure"); r.code != 0 || !strings.Contains(r.stdout, "1 of 1 layers sent") {
		t.Fatalf("push: %+v", r)
	}
	for _, format := range []string{"erofs", "dir"} {
		dst := filepath.Join(dir, "dst-"+format)
		if r := lc(t, dst, "pull", ref, "team/seeded", "--registry-insecure", "--layer-format", format); r.code != 0 || !strings.Contains(r.stdout, "kept as "+format) {
			t.Fatalf("pull --layer-format %s: %+v", format, r)
		}
		r := lc(t, dst, "inspect", "team/seeded", "-o", "json")
		var info struct {
			Layers []engine.LayerInfo `json:"layers"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &info); err != nil || len(info.Layers) != 1 || string(info.Layers[0].Format) != format {
			t.Fatalf("inspect after a pull as %s: %s (%v)", format, r.stdout, err)
		}
		view := filepath.Join(dir, "view-"+format)
		if r := lc(t, dst, "mount", "team/seeded", view); r.code != 0 {
			t.Fatalf("mount of the pulled cache: %+v", r)
		}
		if b, err := os.ReadFile(filepath.Join(view, "deps/lib/a.jar")); err != nil || string(b) != "jar" {
			t.Errorf("the pulled cache (%s) holds %q, %v", format, b, err)
		}
		if r := lc(t, dst, "umount", view); r.code != 0 {
			t.Fatalf("umount: %+v", r)
		}
		// The same image again is no newer than the head: refused, named.
		if r := lc(t, dst, "pull", ref, "team/seeded", "--registry-insecure"); r.code != 1 || !strings.Contains(r.stderr, "older than the cache's head") {
			t.Errorf("a second pull of the same image: %+v", r)
		}
	}
	if r := lc(t, src, "pull", "not a ref", "team/x"); r.code != 2 || !strings.Contains(r.stderr, "image reference") {
		t.Errorf("a bad reference: %+v", r)
	}
	if r := lc(t, src, "push", "ci/demo", reg.Addr+"/ci/demo@sha256:"+strings.Repeat("0", 64), "--registry-insecure"); r.code != 2 || !strings.Contains(r.stderr, "want a tag") {
		t.Errorf("a push to a digest: %+v", r)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
