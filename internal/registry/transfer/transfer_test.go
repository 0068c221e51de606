package transfer

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/testenv"
)

var key = engine.Key{Namespace: "team", Name: "go"}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("commits mount overlays: run as root")
	}
}

func newStore(t *testing.T) *engine.Store {
	t.Helper()
	dir := t.TempDir()
	testenv.UnmountBelow(t, dir)
	s, err := engine.Open(filepath.Join(dir, "store"), engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newClient(t *testing.T, reg *testenv.Registry, keep int) *registry.Client {
	t.Helper()
	c, err := registry.New(registry.Config{Prefix: reg.Addr + "/caches", Insecure: true, Keep: keep})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// commit writes through a volume of k with fn and commits it.
func commit(t *testing.T, s *engine.Store, k engine.Key, fn func(mnt string)) engine.Generation {
	t.Helper()
	id := "v" + strings.ReplaceAll(time.Now().Format("150405.000000000"), ".", "")
	if _, err := s.CreateVolume(id, k, engine.VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := s.Mount(id, mnt); err != nil {
		t.Fatal(err)
	}
	fn(mnt)
	if err := s.Unmount(id); err != nil {
		t.Fatal(err)
	}
	res, err := s.Commit(id)
	if err != nil || !res.Committed {
		t.Fatalf("commit: %+v, %v", res, err)
	}
	info, err := s.Inspect(k)
	if err != nil {
		t.Fatal(err)
	}
	return *info.Head
}

// view returns what a volume of k's head shows: path -> kind, mode,
// owner, mtime and content or target.
func view(t *testing.T, s *engine.Store, k engine.Key) map[string]string {
	t.Helper()
	id := "view" + strings.ReplaceAll(time.Now().Format("150405.000000000"), ".", "")
	if _, err := s.CreateVolume(id, k, engine.VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := s.Mount(id, mnt); err != nil {
		t.Fatal(err)
	}
	defer func() {
		s.Unmount(id)
		s.Discard(id)
	}()
	got := map[string]string{}
	err := filepath.Walk(mnt, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == mnt {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		rel, _ := filepath.Rel(mnt, p)
		desc := []string{fi.Mode().String(), itoa(st.Uid), itoa(st.Gid), itoa(uint32(st.Nlink))}
		if !fi.IsDir() {
			desc = append(desc, fi.ModTime().UTC().Format(time.RFC3339Nano))
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc = append(desc, "-> "+target)
		case fi.Mode().IsRegular():
			data, _ := os.ReadFile(p)
			desc = append(desc, string(data))
		}
		got[rel] = strings.Join(desc, " ")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func itoa(n uint32) string { return strconv.FormatUint(uint64(n), 10) }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// What a build sees on another node is what was committed: symlinks, hard
// links, modes, owners and mtimes, and a file deleted (a directory
// replaced) in a later generation stays deleted (replaced).
func TestPushThenPullOnAnotherNode(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	c := newClient(t, reg, 0)
	a, b := newStore(t), newStore(t)
	stamp := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	commit(t, a, key, func(mnt string) {
		must(t, os.MkdirAll(filepath.Join(mnt, "pkg/old"), 0o750))
		must(t, os.WriteFile(filepath.Join(mnt, "pkg/old/stale"), []byte("stale"), 0o600))
		must(t, os.WriteFile(filepath.Join(mnt, "gone"), []byte("gone"), 0o644))
		must(t, os.WriteFile(filepath.Join(mnt, "tool"), []byte("#!/bin/sh\n"), 0o4755))
		must(t, os.Chmod(filepath.Join(mnt, "tool"), 0o4755))
		must(t, os.Link(filepath.Join(mnt, "tool"), filepath.Join(mnt, "tool-link")))
		must(t, os.Symlink("pkg/old/stale", filepath.Join(mnt, "link")))
		must(t, os.Chown(filepath.Join(mnt, "gone"), 1234, 5678))
		must(t, os.Chtimes(filepath.Join(mnt, "tool"), stamp, stamp))
	})
	head := commit(t, a, key, func(mnt string) {
		must(t, os.Remove(filepath.Join(mnt, "gone")))
		must(t, os.RemoveAll(filepath.Join(mnt, "pkg/old")))
		must(t, os.MkdirAll(filepath.Join(mnt, "pkg/old"), 0o755))
		must(t, os.WriteFile(filepath.Join(mnt, "pkg/old/new"), []byte("new"), 0o644))
	})
	want := view(t, a, key)
	if _, ok := want["gone"]; ok {
		t.Fatal("the committed view still has the deleted file")
	}

	ctx := context.Background()
	p, err := Push(ctx, c, a, key, head, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	if p.Layers != 2 || p.LayersSent != 2 || p.Bytes == 0 {
		t.Errorf("first push: %+v", p)
	}
	pulled, err := Pull(ctx, c, b, key, p.Digest, PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pulled.LayersFetched != 2 || !pulled.Generation.Committed().Equal(head.Committed()) || pulled.Generation.Labels[LabelDigest] != p.Digest {
		t.Errorf("pull: %+v; the commit was at %v", pulled, head.Committed())
	}
	got := view(t, b, key)
	for path, w := range want {
		if got[path] != w {
			t.Errorf("%s: got %q, want %q", path, got[path], w)
		}
	}
	for path := range got {
		if _, ok := want[path]; !ok {
			t.Errorf("%s: on the pulling node only (%q)", path, got[path])
		}
	}

	// Pushing the same generation again sends nothing but the manifest.
	again, err := Push(ctx, c, a, key, head, "node-a")
	if err != nil || again.Digest != p.Digest || again.Bytes != 0 {
		t.Errorf("second push of the same generation: %+v, %v", again, err)
	}
}

// A commit that adds a little to a large cache pushes about that little,
// and a node that has the rest fetches only the new layer.
func TestPushAndPullAreIncremental(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	c := newClient(t, reg, 0)
	a, b := newStore(t), newStore(t)
	big := make([]byte, 8<<20)
	rand.Read(big)
	g1 := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "big"), big, 0o644)) })
	ctx := context.Background()
	p1, err := Push(ctx, c, a, key, g1, "a")
	must(t, err)
	_, err = Pull(ctx, c, b, key, p1.Digest, PullOptions{})
	must(t, err)

	small := bytes.Repeat([]byte("x"), 64<<10)
	g2 := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "small"), small, 0o644)) })
	p2, err := Push(ctx, c, a, key, g2, "a")
	must(t, err)
	if p2.LayersSent != 1 || p2.Bytes > 64<<10 || p1.Bytes < 8<<20 {
		t.Errorf("incremental push sent %d bytes in %d layers (the first push: %d bytes)", p2.Bytes, p2.LayersSent, p1.Bytes)
	}
	pulled, err := Pull(ctx, c, b, key, p2.Digest, PullOptions{})
	must(t, err)
	if pulled.LayersFetched != 1 || pulled.Bytes > 64<<10 {
		t.Errorf("incremental pull fetched %d bytes in %d layers", pulled.Bytes, pulled.LayersFetched)
	}
	if len(pulled.Generation.Layers) != 2 {
		t.Errorf("pulled generation has layers %v", pulled.Generation.Layers)
	}
}

// A blob altered in the registry's storage is detected, and the node keeps
// nothing of it.
func TestTamperedBlobIsRejected(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	c := newClient(t, reg, 0)
	a, b := newStore(t), newStore(t)
	g := commit(t, a, key, func(mnt string) {
		must(t, os.WriteFile(filepath.Join(mnt, "data"), bytes.Repeat([]byte("cache "), 10000), 0o644))
	})
	ctx := context.Background()
	p, err := Push(ctx, c, a, key, g, "a")
	must(t, err)
	d, ok, err := a.LayerDigest(key, g.Layers[0])
	if err != nil || !ok {
		t.Fatalf("no recorded digest: %v", err)
	}
	hex := strings.TrimPrefix(d.Digest, "sha256:")
	blob := filepath.Join(reg.Storage, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data")
	data, err := os.ReadFile(blob)
	must(t, err)
	data[len(data)/2] ^= 0xff
	must(t, os.WriteFile(blob, data, 0o644))

	_, err = Pull(ctx, c, b, key, p.Digest, PullOptions{})
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("pulling a tampered blob: %v, want ErrCorrupt", err)
	}
	if info, err := b.Inspect(key); err == nil && info.Head != nil {
		t.Errorf("the node published generation %d from a tampered blob", info.Head.Number)
	}
	if entries, _ := os.ReadDir(filepath.Join(b.Root(), "tmp")); len(entries) != 0 {
		t.Errorf("left in the store's tmp: %v", entries)
	}
}

// With the registry down, pushes and pulls fail within their context, and
// work again once it is back.
func TestRegistryDown(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	c := newClient(t, reg, 0)
	a, b := newStore(t), newStore(t)
	g := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "f"), []byte("1"), 0o644)) })
	reg.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := Push(ctx, c, a, key, g, "a"); err == nil {
		t.Fatal("pushed to a stopped registry")
	}
	if _, err := Pull(ctx, c, b, key, "sha256:"+strings.Repeat("0", 64), PullOptions{}); err == nil {
		t.Fatal("pulled from a stopped registry")
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("failing took %s, past the context's 5 s", d)
	}
	reg.Start()
	p, err := Push(context.Background(), c, a, key, g, "a")
	must(t, err)
	_, err = Pull(context.Background(), c, b, key, p.Digest, PullOptions{})
	must(t, err)
}

// Old generations are pruned down to Keep, never the one in use; deleting
// the cache deletes every manifest.
func TestPruneAndDelete(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	c := newClient(t, reg, 2)
	a := newStore(t)
	ctx := context.Background()
	var digests []string
	for i := range 4 {
		g := commit(t, a, key, func(mnt string) {
			must(t, os.WriteFile(filepath.Join(mnt, "f"), []byte{byte('0' + i)}, 0o644))
		})
		p, err := Push(ctx, c, a, key, g, "a")
		must(t, err)
		digests = append(digests, p.Digest)
	}
	n, err := c.Prune(ctx, registry.Cache(key), digests[0])
	must(t, err)
	tags, err := c.Tags(ctx, registry.Cache(key))
	must(t, err)
	if n != 1 || len(tags) != 3 {
		t.Errorf("pruned %d, kept tags %v; want 1 pruned and the oldest kept as in use", n, tags)
	}
	b := newStore(t)
	if _, err := Pull(ctx, c, b, key, digests[1], PullOptions{}); err == nil {
		t.Error("pulled a pruned generation")
	}
	if _, err := Pull(ctx, c, b, key, digests[0], PullOptions{}); err != nil {
		t.Errorf("the generation in use was pruned: %v", err)
	}

	n, err = c.DeleteCache(ctx, registry.Cache(key))
	must(t, err)
	tags, err = c.Tags(ctx, registry.Cache(key))
	must(t, err)
	if n != 3 || len(tags) != 0 {
		t.Errorf("deleted %d manifests, tags left %v", n, tags)
	}
	if _, err := Pull(ctx, c, newStore(t), key, digests[3], PullOptions{}); err == nil {
		t.Error("pulled a generation of a deleted cache")
	}
	if n, err := c.DeleteCache(ctx, registry.Cache{Namespace: "team", Name: "never-pushed"}); n != 0 || err != nil {
		t.Errorf("deleting a cache never pushed: %d, %v", n, err)
	}
}

// Credentials come from a .dockerconfigjson file, read at each request:
// without it, or with a wrong password, the registry refuses.
func TestCredentialsFromDockerConfigJSON(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t, "builder", "s3cret")
	a := newStore(t)
	g := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "f"), []byte("1"), 0o644)) })
	ctx := context.Background()

	anonymous := newClient(t, reg, 0)
	if _, err := Push(ctx, anonymous, a, key, g, "a"); err == nil {
		t.Fatal("pushed without credentials")
	}
	auth := filepath.Join(t.TempDir(), ".dockerconfigjson")
	write := func(user, pass string) {
		cred := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		must(t, os.WriteFile(auth, []byte(`{"auths":{"`+reg.Addr+`":{"auth":"`+cred+`"}}}`), 0o600))
	}
	write("builder", "wrong")
	c, err := registry.New(registry.Config{Prefix: reg.Addr + "/caches", Insecure: true, AuthFile: auth})
	must(t, err)
	if _, err := Push(ctx, c, a, key, g, "a"); err == nil {
		t.Fatal("pushed with a wrong password")
	}
	write("builder", "s3cret") // the Secret was fixed: no restart needed
	p, err := Push(ctx, c, a, key, g, "a")
	must(t, err)
	if _, err := Pull(ctx, c, newStore(t), key, p.Digest, PullOptions{}); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []registry.Config{
		{Prefix: "http://" + reg.Addr},
		{Prefix: ""},
		{Prefix: reg.Addr + "/UPPER"},
		{Prefix: reg.Addr, AuthFile: filepath.Join(t.TempDir(), "missing")},
		{Prefix: reg.Addr, Keep: -1},
	} {
		if _, err := registry.New(bad); err == nil {
			t.Errorf("New(%+v) accepted a bad configuration", bad)
		}
	}
}

// hostileRegistry serves the given manifests by digest, and nothing else
// (a request for a config or a layer fails the test).
func hostileRegistry(t *testing.T, manifests map[string][]byte) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		_, digest, ok := strings.Cut(r.URL.Path, "/manifests/")
		raw, found := manifests[digest]
		if !ok || !found {
			t.Errorf("the pull asked the registry for %s %s", r.Method, r.URL.Path)
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
		w.Header().Set("Docker-Content-Digest", digest)
		_, _ = w.Write(raw)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// A hostile registry's image past a cache image's bounds is refused from
// its manifest, before its config or any layer is fetched: too many layers
// (past the kernel's 500 lowers every mount of the cache would fail; a
// cache's chain is compacted at 8), a huge config (every agent that
// prefetched it would hold it in memory), layers past the cache's size in
// all. On main, each was fetched.
func TestOversizedImagesAreRefused(t *testing.T) {
	requireRoot(t)
	s := newStore(t)
	blob := func(size int64, i int) v1.Descriptor {
		return v1.Descriptor{MediaType: types.OCILayer, Size: size, Digest: v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", i+1)}}
	}
	layers := func(n int, size int64) []v1.Descriptor {
		var out []v1.Descriptor
		for i := range n {
			out = append(out, blob(size, i))
		}
		return out
	}
	tests := []struct {
		name     string
		config   v1.Descriptor
		layers   []v1.Descriptor
		maxBytes int64
	}{
		{"501 layers", blob(100, 1000), layers(501, 10), 0},
		{"a 1 GiB config", blob(1<<30, 1000), layers(1, 10), 0},
		{"layers past the cache's size", blob(100, 1000), layers(4, 1<<30), 2 << 30},
	}
	manifests := map[string][]byte{}
	digests := make([]string, len(tests))
	for i, tt := range tests {
		raw, err := json.Marshal(v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, Config: tt.config, Layers: tt.layers})
		must(t, err)
		digests[i] = sha(raw)
		manifests[digests[i]] = raw
	}
	c, err := registry.New(registry.Config{Prefix: hostileRegistry(t, manifests) + "/caches", Insecure: true})
	must(t, err)
	for i, tt := range tests {
		_, err := Pull(context.Background(), c, s, key, digests[i], PullOptions{Import: engine.ImportOptions{MaxBytes: tt.maxBytes}})
		if !errors.Is(err, ErrTooLarge) {
			t.Errorf("%s: pull: %v, want ErrTooLarge", tt.name, err)
		}
	}
	if info, err := s.Inspect(key); err == nil && info.Head != nil {
		t.Errorf("a hostile image became generation %d", info.Head.Number)
	}
}

// A pull checks a blob's digest before it extracts anything: a registry
// that serves another, well-formed layer in its place (here one that
// plants a file) never gets a byte of it onto the node's disk as files.
// The proxy serves the substitute and then holds the response open, so
// that the test looks at the store while the pull still reads. On main,
// the substitute was extracted into the store's temporary area before the
// mismatch was seen.
func TestBlobIsVerifiedBeforeExtraction(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	a, b := newStore(t), newStore(t)
	g := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "data"), []byte("cache"), 0o644)) })
	ctx := context.Background()
	p, err := Push(ctx, newClient(t, reg, 0), a, key, g, "a")
	must(t, err)
	d, _, err := a.LayerDigest(key, g.Layers[0])
	must(t, err)

	var substitute bytes.Buffer
	zw, err := zstd.NewWriter(&substitute)
	must(t, err)
	if d.MediaType != string(types.OCILayerZStd) {
		t.Fatalf("layers are pushed as %s: make the substitute one", d.MediaType)
	}
	tw := tar.NewWriter(zw)
	must(t, tw.WriteHeader(&tar.Header{Name: "planted", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg}))
	_, err = tw.Write([]byte("owned"))
	must(t, err)
	must(t, tw.Close())
	must(t, zw.Close())
	sent, release := make(chan struct{}), make(chan struct{})
	target, err := url.Parse("http://" + reg.Addr)
	must(t, err)
	forward := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/blobs/"+d.Digest) || r.Method != http.MethodGet {
			forward.ServeHTTP(w, r)
			return
		}
		_, _ = w.Write(substitute.Bytes())
		w.(http.Flusher).Flush()
		close(sent)
		<-release
	}))
	defer proxy.Close()
	c, err := registry.New(registry.Config{Prefix: strings.TrimPrefix(proxy.URL, "http://") + "/caches", Insecure: true})
	must(t, err)

	done := make(chan error, 1)
	go func() { _, err := Pull(ctx, c, b, key, p.Digest, PullOptions{}); done <- err }()
	<-sent
	time.Sleep(500 * time.Millisecond) // an extraction of one small file is done by then
	var planted []string
	_ = filepath.WalkDir(b.Root(), func(path string, e os.DirEntry, err error) error {
		if err == nil && e.Name() == "planted" {
			planted = append(planted, path)
		}
		return nil
	})
	close(release)
	if err := <-done; !errors.Is(err, ErrCorrupt) {
		t.Errorf("pulling a substituted blob: %v, want ErrCorrupt", err)
	}
	if len(planted) > 0 {
		t.Fatalf("the substitute was extracted before its digest was checked: %v", planted)
	}
}

// A pull that fills the node's disk while it stages a blob fails with the
// disk's error, not ErrCorrupt: the registry's blob is intact.
func TestStagingOnAFullDiskIsNotCorruption(t *testing.T) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	a := newStore(t)
	noise := make([]byte, 2<<20)
	_, _ = rand.Read(noise) // incompressible: the blob is as large
	g := commit(t, a, key, func(mnt string) { must(t, os.WriteFile(filepath.Join(mnt, "noise"), noise, 0o644)) })
	ctx := context.Background()
	c := newClient(t, reg, 0)
	p, err := Push(ctx, c, a, key, g, "a")
	must(t, err)
	small := t.TempDir()
	must(t, unix.Mount("tmpfs", small, "tmpfs", 0, "size=512k"))
	t.Cleanup(func() { _ = unix.Unmount(small, unix.MNT_DETACH) })
	testenv.UnmountBelow(t, small)
	b, err := engine.Open(filepath.Join(small, "store"), engine.Options{})
	must(t, err)
	_, err = Pull(ctx, c, b, key, p.Digest, PullOptions{})
	if err == nil || errors.Is(err, ErrCorrupt) || !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("pulling onto a full disk: %v, want ENOSPC and not ErrCorrupt", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(b.Root(), "tmp")); len(entries) != 0 {
		t.Errorf("left in the store's tmp: %v", entries)
	}
}
