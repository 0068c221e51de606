package engine

import (
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// requireRoot skips tests that mount overlays: that needs CAP_SYS_ADMIN.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (overlay mounts and trusted.* xattrs need CAP_SYS_ADMIN); CI runs the tests as root")
	}
}

// newTestStore opens a store in a fresh temp dir and makes sure nothing
// stays mounted below it when the test ends, even if it failed half-way.
func newTestStore(t testing.TB, opts Options) (*Store, string) {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	t.Cleanup(func() { unmountBelow(t, dir) })
	s, err := Open(filepath.Join(dir, "store"), opts)
	if err != nil {
		t.Fatal(err)
	}
	return s, dir
}

func unmountBelow(t testing.TB, dir string) {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return
	}
	mounts, err := readMountInfo()
	if err != nil {
		t.Errorf("reading mountinfo: %v", err)
		return
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		if strings.HasPrefix(mounts[i].MountPoint, real+"/") {
			if err := unix.Unmount(mounts[i].MountPoint, unix.MNT_DETACH); err != nil {
				t.Errorf("cleanup: unmounting %s: %v", mounts[i].MountPoint, err)
			}
		}
	}
}

var testKey = Key{Namespace: "ns", Name: "project"}

// tree is a directory's content: path -> file content, "dir/" for a dir,
// "-> target" for a symlink.
type tree map[string]string

func readTree(t testing.TB, root string) tree {
	t.Helper()
	out := tree{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			out[rel] = "-> " + target
		case d.IsDir():
			out[rel+"/"] = ""
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("reading %s: %v", root, err)
	}
	return out
}

func writeTree(t testing.TB, root string, files tree) {
	t.Helper()
	for _, p := range slices.Sorted(maps.Keys(files)) {
		full := filepath.Join(root, p)
		if strings.HasSuffix(p, "/") {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if target, ok := strings.CutPrefix(files[p], "-> "); ok {
			if err := os.Symlink(target, full); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(full, []byte(files[p]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func assertTree(t testing.TB, what string, got, want tree) {
	t.Helper()
	for _, p := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[p]; !ok {
			t.Errorf("%s: %s is missing", what, p)
		} else if g != want[p] {
			t.Errorf("%s: %s = %q, want %q", what, p, g, want[p])
		}
	}
	for _, p := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: unexpected %s", what, p)
		}
	}
}

// commitTree creates a writable volume, mounts it, applies fn to the
// mounted dir, unmounts and commits it.
func commitTree(t testing.TB, s *Store, k Key, dir string, fn func(mnt string)) CommitResult {
	t.Helper()
	id := writtenVolume(t, s, k, dir, fn)
	res, err := s.Commit(id)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// writtenVolume creates a writable volume of k, lets fn write through its
// mount, and unmounts it: ready to commit or discard.
func writtenVolume(t testing.TB, s *Store, k Key, dir string, fn func(mnt string)) string {
	t.Helper()
	id := "v" + randomID()
	if _, err := s.CreateVolume(id, k, VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt-"+id)
	if err := s.Mount(id, mnt); err != nil {
		t.Fatal(err)
	}
	fn(mnt)
	if err := s.Unmount(id); err != nil {
		t.Fatal(err)
	}
	os.Remove(mnt)
	return id
}

// view mounts a fresh volume of k's head and returns its content.
func view(t testing.TB, s *Store, k Key, dir string) tree {
	t.Helper()
	id := "view" + randomID()
	if _, err := s.CreateVolume(id, k, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt-"+id)
	if err := s.Mount(id, mnt); err != nil {
		t.Fatal(err)
	}
	got := readTree(t, mnt)
	if err := s.Unmount(id); err != nil {
		t.Fatal(err)
	}
	if err := s.Discard(id); err != nil {
		t.Fatal(err)
	}
	os.Remove(mnt)
	return got
}

// assertNoOrphans checks that every layer and generation on disk is
// referenced and that no temporary entry is left.
func assertNoOrphans(t testing.TB, s *Store) {
	t.Helper()
	keys, err := s.Keys()
	if err != nil {
		t.Fatal(err)
	}
	vols, err := s.Volumes()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		referenced := map[string]bool{}
		head, ok, err := s.head(k)
		if err != nil {
			t.Fatal(err)
		}
		keep := map[int64]bool{}
		if ok {
			keep[head.Number] = true
		}
		for _, v := range vols {
			if v.LayersOf() == k {
				keep[v.Generation] = true
				for _, l := range v.Layers {
					referenced[l] = true
				}
			}
			if v.Cache == k {
				referenced[v.CommitLayer], referenced[v.BaseLayer] = true, true
			}
		}
		nums, err := s.generationNumbers(k)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nums {
			g, err := s.generation(k, n)
			if err != nil {
				t.Fatal(err)
			}
			if !keep[n] && !slices.ContainsFunc(vols, func(v *Volume) bool { return v.ID == g.Volume }) {
				t.Errorf("%s: orphan generation %d", k, n)
			}
			for _, l := range g.Layers {
				referenced[l] = true
			}
		}
		entries, err := os.ReadDir(filepath.Join(s.cacheDir(k), dirLayers))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range entries {
			if !referenced[strings.TrimSuffix(e.Name(), imageSuffix)] {
				t.Errorf("%s: orphan layer %s", k, e.Name())
			}
		}
	}
	assertNoStrayMounts(t, s)
	tmp, err := os.ReadDir(filepath.Join(s.root, dirTmp))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range tmp {
		t.Errorf("leftover temporary entry %s", e.Name())
	}
}

// assertNoStrayMounts checks that every EROFS mount below the store is an
// image layer's, on its own mount point, with its image still there.
func assertNoStrayMounts(t testing.TB, s *Store) {
	t.Helper()
	mounts, err := readMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if m.FSType != "erofs" || !strings.HasPrefix(m.MountPoint, s.root+"/") {
			continue
		}
		if _, err := os.Stat(m.MountPoint + imageSuffix); err != nil || filepath.Base(filepath.Dir(m.MountPoint)) != dirLayers {
			t.Errorf("stray EROFS mount at %s (its image: %v)", m.MountPoint, err)
		}
	}
}
