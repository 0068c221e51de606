package engine

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// Kernels before 6.8 have no "lowerdir+": the engine then mounts through
// mount(2). Exercise that path on any kernel, and check that mountinfo
// reports the legacy "lowerdir=a:b" form the way GC reads it.
func TestLegacyMountFallback(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1", "b": "1"}) })
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"b": "2"}) })
	v, err := s.CreateVolume("legacy", testKey, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	lowers := []string{s.layerPath(testKey, v.Layers[1]), s.layerPath(testKey, v.Layers[0])}
	target := filepath.Join(dir, "legacy")
	must(t, os.MkdirAll(target, 0o755))
	must(t, mountOverlayLegacy(lowers, s.upperDir("legacy"), s.workDir("legacy"), target, unix.MS_NOSUID|unix.MS_NODEV))
	assertTree(t, "legacy mount", readTree(t, target), tree{"a": "1", "b": "2"})

	mounts, err := readMountInfo()
	must(t, err)
	found := false
	for _, m := range mounts {
		if m.MountPoint == target {
			found = true
			if !slices.Equal(m.Lowers, lowers) || m.Upper != s.upperDir("legacy") {
				t.Errorf("mountinfo entry = %+v, want lowers %v", m, lowers)
			}
		}
	}
	if !found {
		t.Fatal("the legacy mount is not in mountinfo")
	}
	if id, err := s.VolumeAt(target); err != nil || id != "legacy" {
		t.Errorf("VolumeAt = %q, %v", id, err)
	}
	must(t, s.Unmount("legacy"))
	if points, _ := s.MountPoints("legacy"); len(points) != 0 {
		t.Errorf("still mounted at %v", points)
	}

	many := make([]string, 200)
	for i := range many {
		many[i] = filepath.Join(s.root, "caches", "ns", "project", "layers", "0123456789abcdef01234567")
	}
	if err := mountOverlayLegacy(many, s.upperDir("legacy"), s.workDir("legacy"), target, unix.MS_NOSUID|unix.MS_NODEV); err == nil {
		t.Error("200 layers fit in one page of mount options?")
	}
}
