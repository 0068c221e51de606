package engine

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestHostDir(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	target := filepath.Join(dir, "pod", "scratch")
	must(t, s.CreateHostDir("pvc-1"))
	must(t, s.CreateHostDir("pvc-1")) // idempotent
	must(t, s.MountHostDir("pvc-1", target))
	must(t, s.MountHostDir("pvc-1", target)) // idempotent
	points, err := s.HostDirMountPoints("pvc-1")
	if err != nil || !slices.Equal(points, []string{target}) {
		t.Fatalf("mount points = %v, %v", points, err)
	}
	writeTree(t, target, tree{"out": "x"})
	assertTree(t, "host dir", readTree(t, s.hostDirPath("pvc-1")), tree{"out": "x"})
	if err := s.RemoveHostDir("pvc-1"); !errors.Is(err, ErrMounted) {
		t.Fatalf("removing a mounted host dir: err = %v", err)
	}
	must(t, UnmountTarget(target))
	must(t, UnmountTarget(target)) // idempotent
	if ids, _ := s.HostDirs(); !slices.Equal(ids, []string{"pvc-1"}) {
		t.Fatalf("host dirs = %v", ids)
	}
	must(t, s.RemoveHostDir("pvc-1"))
	must(t, s.RemoveHostDir("pvc-1"))
	if _, err := os.Stat(s.hostDirPath("pvc-1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("host dir still there: %v", err)
	}
	if err := s.CreateHostDir("../x"); err == nil {
		t.Fatal("a bad ID was accepted")
	}
}

func TestLastUsed(t *testing.T) {
	s, dir := newTestStore(t, Options{})
	commitTree(t, s, testKey, dir, func(mnt string) { writeTree(t, mnt, tree{"a": "1"}) })
	info, _ := s.Inspect(testKey)
	if !info.LastUsed.Equal(info.Head.Created) {
		t.Fatalf("last used = %v, want the commit time %v", info.LastUsed, info.Head.Created)
	}
	time.Sleep(20 * time.Millisecond)
	if _, err := s.CreateVolume("reader", testKey, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	info2, _ := s.Inspect(testKey)
	if !info2.LastUsed.After(info.LastUsed) {
		t.Fatalf("last used = %v, not after %v", info2.LastUsed, info.LastUsed)
	}
}
