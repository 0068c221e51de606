package main

import (
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// root writes a small image root: a binary-like file, a directory, a symlink.
func root(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "etc", "ssl"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tool"), []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("tool", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The same root gives the same digest, whenever and wherever it was
// written; other content, another digest.
func TestImagesAreReproducible(t *testing.T) {
	digest := func(dir string) string {
		img, err := platformImage(dir, "arm64", []string{"/tool"})
		if err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		return d.String()
	}
	a, b := root(t, "v1"), root(t, "v1")
	if err := os.Chtimes(filepath.Join(b, "tool"), time0.AddDate(30, 0, 0), time0.AddDate(30, 0, 0)); err != nil {
		t.Fatal(err)
	}
	if da, db := digest(a), digest(b); da != db {
		t.Errorf("the same content gave %s and %s", da, db)
	}
	if da, dc := digest(a), digest(root(t, "v2")); da == dc {
		t.Errorf("other content gave the same digest %s", da)
	}
}

// The index lists one manifest per platform, each with its platform, and
// each image's config says its architecture.
func TestIndexNamesEveryPlatform(t *testing.T) {
	var entries []platformEntry
	for _, arch := range []string{"amd64", "arm64"} {
		img, err := platformImage(root(t, arch), arch, []string{"/tool"})
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, platformEntry{arch: arch, image: img})
	}
	m, err := index(entries).IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 2 {
		t.Fatalf("index of %d manifests, want 2", len(m.Manifests))
	}
	for i, d := range m.Manifests {
		cfg, err := entries[i].image.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != entries[i].arch || cfg.Architecture != entries[i].arch {
			t.Errorf("manifest %d: platform %+v, config architecture %q, want linux/%s", i, d.Platform, cfg.Architecture, entries[i].arch)
		}
	}
}

// Bad flags are refused, naming the flag.
func TestFlagsAreChecked(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"--version", "1.0.0", "--registry", "r.example/p", "--image", "x=amd64:" + dir + ":b"},
		{"--version", "v1.0.0", "--registry", "nohost", "--image", "x=amd64:" + dir + ":b"},
		{"--version", "v1.0.0", "--registry", "r.example/p"},
		{"--version", "v1.0.0", "--registry", "r.example/p", "--image", "x=amd64:/nonexistent:b"},
		{"--version", "v1.0.0", "--registry", "r.example/p", "--image", "x=amd64"},
	} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
	if _, err := parseFlags([]string{"--version", "v1.0.0-rc.1", "--registry", "r.example:5000/p", "--image", "x=amd64:" + dir + ":b,arm64:" + dir + ":b"}); err != nil {
		t.Errorf("good flags refused: %v", err)
	}
}

var time0 = time.Unix(0, 0)

// A pushed release reads back from a registry (go-containerregistry's own,
// over HTTP) with every platform, each with its SBOM among its referrers;
// asking for a platform that was not pushed fails, naming it.
func TestPushedIndexReadsBack(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	o := &options{version: "v0.1.0", registry: host + "/p", out: t.TempDir(), created: "2026-01-01T00:00:00Z", insecure: true}
	self, err := os.Executable() // a Go binary, for the SBOM's build information
	if err != nil {
		t.Fatal(err)
	}
	img := imageFlag{name: "tool"}
	for _, arch := range []string{"amd64", "arm64"} {
		img.platforms = append(img.platforms, platformFlag{arch: arch, root: root(t, arch), binary: self})
	}
	if err := os.MkdirAll(filepath.Join(o.out, "sbom"), 0o755); err != nil {
		t.Fatal(err)
	}
	ref, err := release(o, img)
	if err != nil {
		t.Fatal(err)
	}
	d, err := name.NewDigest(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	ropts := []remote.Option{remote.WithReferrersTagFallback(true)}
	lines, err := inspect(d, []string{"amd64", "arm64"}, ropts)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "linux/amd64 sha256:") || !strings.HasPrefix(lines[1], "linux/arm64 sha256:") ||
		!strings.Contains(lines[1], " sbom sha256:") {
		t.Errorf("read back %q", lines)
	}
	if _, err := inspect(d, []string{"amd64", "riscv64"}, ropts); err == nil || !strings.Contains(err.Error(), "linux/riscv64") {
		t.Errorf("a missing platform: %v", err)
	}
}
