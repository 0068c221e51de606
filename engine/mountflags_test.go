package engine

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// assertNosuidNodev checks the mount at path.
func assertNosuidNodev(t *testing.T, what, path string) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 {
		t.Errorf("%s is mounted with flags %#x: want nosuid and nodev", what, st.Flags)
	}
}

// A cache is data: neither a committed setuid binary nor a device node may
// act as one in the next build's volume, nor in a host directory.
func TestVolumesAreNosuidNodev(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	k := Key{Namespace: "ci", Name: "flags"}
	commitTree(t, s, k, dir, func(mnt string) {
		must(t, os.WriteFile(filepath.Join(mnt, "tool"), []byte("#!/bin/sh\n"), 0o4755))
	})
	if _, err := s.CreateVolume("next", k, VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "next")
	must(t, s.Mount("next", mnt))
	assertNosuidNodev(t, "a cache volume", mnt)
	must(t, s.Unmount("next"))
	must(t, s.Discard("next"))

	target := filepath.Join(dir, "scratch")
	must(t, s.CreateHostDir("pvc-h"))
	must(t, s.MountHostDir("pvc-h", target))
	assertNosuidNodev(t, "a host directory", target)
	must(t, UnmountTarget(target))
	must(t, s.RemoveHostDir("pvc-h"))
}
