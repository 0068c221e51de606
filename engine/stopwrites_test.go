package engine

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// bindAt bind-mounts src at a new directory dst, as the kubelet and the
// container runtime do with a volume's target.
func bindAt(t *testing.T, src, dst string) {
	t.Helper()
	must(t, os.MkdirAll(dst, 0o755))
	must(t, unix.Mount(src, dst, "", unix.MS_BIND, ""))
	t.Cleanup(func() { unix.Unmount(dst, unix.MNT_DETACH) })
}

func assertWritable(t *testing.T, what, dir string, want bool) {
	t.Helper()
	err := os.WriteFile(filepath.Join(dir, "probe"), []byte("x"), 0o644)
	switch {
	case want && err != nil:
		t.Errorf("%s: writing: %v, want it to work", what, err)
	case !want && !errors.Is(err, unix.EROFS):
		t.Errorf("%s: writing: %v, want EROFS", what, err)
	}
}

// A volume over its bound whose pod cannot be stopped is made read-only:
// through every bind mount of it, as a container sees it.
func TestStopWritesOfAVolume(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	if _, err := s.CreateVolume("greedy", testKey, VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	target, container := filepath.Join(dir, "target"), filepath.Join(dir, "container")
	must(t, s.Mount("greedy", target))
	bindAt(t, target, container)
	assertWritable(t, "before", container, true)
	must(t, s.StopWrites("greedy"))
	must(t, s.StopWrites("greedy")) // idempotent
	assertWritable(t, "the container's bind mount", container, false)
	assertWritable(t, "the target", target, false)
	if b, err := os.ReadFile(filepath.Join(container, "a")); err != nil || string(b) != "1" {
		t.Errorf("reading after: %q, %v", b, err)
	}
	must(t, unix.Unmount(container, 0))
	must(t, s.Unmount("greedy"))
	must(t, s.Discard("greedy"))
	must(t, s.StopWrites("greedy")) // not mounted: nothing to do
}

// A host directory is an overlay of its own: a second target shares it (a
// bind mount), and stopping its writes stops them at every target and
// every bind mount of them; its data and work dir go with it.
func TestStopWritesOfAHostDir(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	must(t, s.CreateHostDir("pvc-h"))
	one, two, container := filepath.Join(dir, "one"), filepath.Join(dir, "two"), filepath.Join(dir, "container")
	must(t, s.MountHostDir("pvc-h", one))
	must(t, s.MountHostDir("pvc-h", two))
	bindAt(t, two, container)
	points, err := s.HostDirMountPoints("pvc-h")
	if err != nil || !slices.Contains(points, one) || !slices.Contains(points, two) {
		t.Fatalf("mount points = %v, %v", points, err)
	}
	writeTree(t, one, tree{"out": "x"})
	assertTree(t, "the second target", readTree(t, two), tree{"out": "x"})
	if _, inodes, err := s.HostDirUsage("pvc-h"); err != nil || inodes == 0 {
		t.Errorf("usage: %d inodes, %v", inodes, err)
	}
	must(t, s.StopHostDirWrites("pvc-h"))
	for _, d := range []string{one, two, container} {
		assertWritable(t, d, d, false)
	}
	must(t, unix.Unmount(container, 0))
	must(t, UnmountTarget(one))
	must(t, UnmountTarget(two))
	must(t, s.RemoveHostDir("pvc-h"))
	for _, p := range []string{s.hostDirPath("pvc-h"), s.hostDirWork("pvc-h")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there: %v", p, err)
		}
	}
}

// A host directory that an older agent bind-mounted is still found, and
// stopping its writes says why it cannot: it is the node's file system.
func TestStopWritesOfALegacyHostDir(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	must(t, s.CreateHostDir("pvc-old"))
	target := filepath.Join(dir, "old")
	bindAt(t, s.hostDirPath("pvc-old"), target)
	if points, err := s.HostDirMountPoints("pvc-old"); err != nil || !slices.Equal(points, []string{target}) {
		t.Fatalf("mount points = %v, %v", points, err)
	}
	if err := s.StopHostDirWrites("pvc-old"); err == nil || !strings.Contains(err.Error(), "bind mount of the node's file system") {
		t.Errorf("stopping a legacy bind mount: %v", err)
	}
	assertWritable(t, "a legacy bind mount", target, true)
}
