package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

type result struct {
	code           int
	stdout, stderr string
}

func lc(t *testing.T, root string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(append([]string{"--root", root}, args...), &out, &errb)
	return result{code, out.String(), errb.String()}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: the CLI mounts overlays, which needs root; CI runs the tests as root")
	}
}

func TestCLIStory(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	root, mnt := filepath.Join(dir, "store"), filepath.Join(dir, "mnt")
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })

	if r := lc(t, root, "mount", "ci/demo", mnt, "--write"); r.code != 0 || !strings.Contains(r.stdout, "first use") {
		t.Fatalf("mount: %+v", r)
	}
	if err := os.WriteFile(filepath.Join(mnt, "built"), []byte("artifact"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := lc(t, root, "umount", mnt, "--commit"); r.code != 0 || !strings.Contains(r.stdout, "generation 1") {
		t.Fatalf("umount --commit: %+v", r)
	}
	if r := lc(t, root, "mount", "ci/demo", mnt); r.code != 0 || !strings.Contains(r.stdout, "generation 1") {
		t.Fatalf("second mount: %+v", r)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil || st.Flags&unix.ST_NOSUID == 0 {
		t.Errorf("a mount without --setuid: flags %#x (%v), want nosuid", st.Flags, err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "built")); err != nil || string(b) != "artifact" {
		t.Fatalf("second mount sees %q, %v", b, err)
	}
	if r := lc(t, root, "umount", mnt, "--commit"); r.code != 2 || !strings.Contains(r.stderr, "without --write") {
		t.Fatalf("commit of a read-only mount: %+v", r)
	}
	if r := lc(t, root, "rm", "ci/demo"); r.code != 1 || !strings.Contains(r.stderr, "used by volume") {
		t.Fatalf("rm of a cache in use: %+v", r)
	}
	if r := lc(t, root, "umount", mnt); r.code != 0 || !strings.Contains(r.stdout, "discarded") {
		t.Fatalf("umount: %+v", r)
	}
	if r := lc(t, root, "mount", "ci/demo", mnt, "--setuid"); r.code != 0 {
		t.Fatalf("mount --setuid: %+v", r)
	}
	if err := unix.Statfs(mnt, &st); err != nil || st.Flags&unix.ST_NOSUID != 0 || st.Flags&unix.ST_NODEV == 0 {
		t.Errorf("a mount with --setuid: flags %#x (%v), want nodev without nosuid", st.Flags, err)
	}
	if r := lc(t, root, "umount", mnt); r.code != 0 {
		t.Fatalf("umount: %+v", r)
	}

	r := lc(t, root, "-o", "json", "ls")
	var rows []cacheRow
	if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || r.code != 0 {
		t.Fatalf("ls -o json: %+v (%v)", r, err)
	}
	if len(rows) != 1 || rows[0].Cache.String() != "ci/demo" || rows[0].Generation != 1 || rows[0].Bytes == 0 {
		t.Fatalf("ls rows = %+v", rows)
	}
	for _, cmd := range [][]string{{"ls"}, {"inspect", "ci/demo"}, {"du"}, {"volumes"}, {"compact"}, {"gc"}} {
		if r := lc(t, root, cmd...); r.code != 0 || r.stdout == "" {
			t.Errorf("%v: %+v", cmd, r)
		}
	}
	if r := lc(t, root, "rm", "ci/demo"); r.code != 0 {
		t.Fatalf("rm: %+v", r)
	}
	if r := lc(t, root, "inspect", "ci/demo"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Fatalf("inspect after rm: %+v", r)
	}
}

// A branch's first mount starts from main's cache; its commit goes to the
// branch, and main is unchanged.
func TestCLIFallback(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	root, mnt := filepath.Join(dir, "store"), filepath.Join(dir, "mnt")
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(mnt, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if r := lc(t, root, "mount", "ci/main", mnt, "--write"); r.code != 0 {
		t.Fatalf("mount main: %+v", r)
	}
	write("dep", "from main")
	if r := lc(t, root, "umount", mnt, "--commit"); r.code != 0 {
		t.Fatalf("commit main: %+v", r)
	}
	r := lc(t, root, "mount", "ci/feature", mnt, "--write", "--from", "ci/none,ci/main")
	if r.code != 0 || !strings.Contains(r.stdout, "from fallback cache ci/main: generation 1") {
		t.Fatalf("mount the branch: %+v", r)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "dep")); err != nil || string(b) != "from main" {
		t.Fatalf("the branch's first mount sees %q, %v", b, err)
	}
	write("branch-only", "b")
	if r := lc(t, root, "umount", mnt, "--commit"); r.code != 0 || !strings.Contains(r.stdout, "generation 1") {
		t.Fatalf("commit the branch: %+v", r)
	}
	for cache, want := range map[string][]string{"ci/feature": {"branch-only", "dep"}, "ci/main": {"dep"}} {
		if r := lc(t, root, "mount", cache, mnt, "--from", "ci/main"); r.code != 0 || strings.Contains(r.stdout, "fallback") {
			t.Fatalf("mount %s: %+v", cache, r)
		}
		entries, err := os.ReadDir(mnt)
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		if err != nil || strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s holds %v (%v), want %v", cache, got, err, want)
		}
		if r := lc(t, root, "umount", mnt); r.code != 0 {
			t.Fatalf("umount %s: %+v", cache, r)
		}
	}
}

func TestCLIBadInput(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "store")
	full := filepath.Join(dir, "full")
	os.MkdirAll(full, 0o755)
	os.WriteFile(filepath.Join(full, "f"), nil, 0o644)
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"mount", "ci/Bad", filepath.Join(dir, "m")}, 2, `invalid cache name "Bad"`},
		{[]string{"mount", "no-namespace", filepath.Join(dir, "m")}, 2, "want NAMESPACE/NAME"},
		{[]string{"mount", "../etc/x", filepath.Join(dir, "m")}, 2, "invalid namespace"},
		{[]string{"mount", "ci/x", full}, 2, "is not empty"},
		{[]string{"mount", "ci/x"}, 2, "takes NAMESPACE/NAME TARGET"},
		{[]string{"umount", filepath.Join(dir, "nothing")}, 2, "is not a layercache mount"},
		{[]string{"frob"}, 2, "unknown command"},
		{[]string{"ls", "-o", "yaml"}, 2, "want table or json"},
		{[]string{"mount", "--nope", "ci/x", "/tmp"}, 2, "flag provided but not defined"},
		{[]string{"mount", "ci/x", filepath.Join(dir, "m"), "--from", "ci/main,main"}, 2, "--from: "},
	}
	for _, tt := range tests {
		r := lc(t, root, tt.args...)
		if r.code != tt.code || !strings.Contains(r.stderr, tt.msg) {
			t.Errorf("%v: code %d stderr %q, want code %d and %q", tt.args, r.code, r.stderr, tt.code, tt.msg)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(root, "volumes")); len(entries) != 0 {
		t.Errorf("bad input left %d volume(s) behind", len(entries))
	}
}
