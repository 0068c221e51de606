package engine

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
		must(t, os.WriteFile(filepath.Join(mnt, "tool"), []byte("#!/bin/sh\n"), 0o755))
		must(t, os.Chmod(filepath.Join(mnt, "tool"), os.ModeSetuid|0o755))
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

// A volume created Setuid runs the setuid binaries of its layers with
// their owner's rights (and is still nodev); one created without runs them
// with the caller's. Run as nobody: id -u prints the effective user.
func TestSetuidVolumesRunSetuidBinaries(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	idBin, err := exec.LookPath("id")
	if err != nil {
		t.Skipf("no id(1) to run setuid: %v", err)
	}
	data, err := os.ReadFile(idBin)
	must(t, err)
	k := Key{Namespace: "ci", Name: "setuid"}
	commitTree(t, s, k, dir, func(mnt string) {
		must(t, os.WriteFile(filepath.Join(mnt, "id"), data, 0o755))
		must(t, os.Chmod(filepath.Join(mnt, "id"), os.ModeSetuid|0o755))
	})
	// nobody must reach the mounts: t.TempDir is 0700.
	public, err := os.MkdirTemp("", "layercache-setuid-")
	must(t, err)
	t.Cleanup(func() { unmountBelow(t, public); os.RemoveAll(public) })
	must(t, os.Chmod(public, 0o755))
	for _, c := range []struct {
		setuid bool
		want   string
	}{{true, "0"}, {false, "65534"}} {
		id := "setuid-" + strconv.FormatBool(c.setuid)
		_, err := s.CreateVolume(id, k, VolumeOptions{Setuid: c.setuid})
		must(t, err)
		mnt := filepath.Join(public, id)
		must(t, s.Mount(id, mnt))
		cmd := exec.Command(filepath.Join(mnt, "id"), "-u")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != c.want {
			t.Errorf("Setuid %v: nobody running a setuid-root id -u got %q (%v): want %s", c.setuid, out, err, c.want)
		}
		var st unix.Statfs_t
		must(t, unix.Statfs(mnt, &st))
		if st.Flags&unix.ST_NODEV == 0 || (st.Flags&unix.ST_NOSUID != 0) == c.setuid {
			t.Errorf("Setuid %v: mounted with flags %#x", c.setuid, st.Flags)
		}
		must(t, s.Unmount(id))
		must(t, s.Discard(id))
	}
}
