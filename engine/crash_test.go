package engine

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The crash child runs crashWorkload and SIGKILLs itself at its Nth
// failpoint. The parent runs it once for every N the workload has, and each
// time checks that the store reopens with the old or the new head (never a
// mix), that retrying what the child left (as the node agent does after a
// restart) loses nothing and commits nothing twice, and that GC then leaves
// no orphan.
const (
	envCrashRoot   = "LAYERCACHE_CRASH_ROOT"
	envCrashKillAt = "LAYERCACHE_CRASH_KILL_AT"
)

// crashOps is the child's workload: five commits, a compaction, an import
// staged before commit 5 (a prefetch under way) and published after it
// (refused: it is older), a GC, a commit to another cache from a volume
// started from this one (a fallback), then, on a third cache, a pull as an
// image layer, its mount, a newer pull and the GC that unmounts and
// removes the first image.
var crashOps = []string{"commit 1", "commit 2", "commit 3", "compact", "commit 4", "stage", "commit 5", "import", "gc", "branch",
	"pull 1", "mount", "pull 2", "gc pulled"}

// crashPulled is the cache the pulls go to.
var crashPulled = Key{Namespace: testKey.Namespace, Name: "pulled"}

// crashPull is pull n: an image layer holding "pulled" = n.
func crashPull(t testing.TB, s *Store, n int) error {
	l, err := s.ImportLayer(bytes.NewReader(tarOf(t, entry{h: tar.Header{Name: "pulled"}, body: strconv.Itoa(n)})), ImportOptions{})
	if err != nil {
		return err
	}
	if !l.image {
		return errors.New("a pull was not kept as an image")
	}
	_, err = s.PublishLayers(crashPulled, []*StagedLayer{l}, PublishOptions{ContentTime: time.Unix(int64(1_700_000_000+n), 0)})
	return err
}

// crashBranch is the cache that the last op commits to, from testKey.
var crashBranch = Key{Namespace: testKey.Namespace, Name: "branch"}

// crashBranchContent is crashBranch's content once its commit is done.
func crashBranchContent() tree {
	t := crashContent(5)
	t["b"] = "branch"
	return t
}

// crashContent is the cache content after commit n: each commit adds its
// own file, deletes (by a whiteout) the one from two commits before, and
// rewrites "state".
func crashContent(n int) tree {
	if n == 0 {
		return tree{}
	}
	t := tree{"state": strconv.Itoa(n), "f" + strconv.Itoa(n): strconv.Itoa(n)}
	if n > 1 {
		t["f"+strconv.Itoa(n-1)] = strconv.Itoa(n - 1)
	}
	return t
}

func TestCrashChild(t *testing.T) {
	root := os.Getenv(envCrashRoot)
	if root == "" {
		t.Skip("run by TestCrashSafety as a child process")
	}
	killAt, _ := strconv.Atoi(os.Getenv(envCrashKillAt))
	count := 0
	failpointHook = func(name string) {
		count++
		if count == killAt {
			fmt.Printf("killed at %s\n", name)
			unix.Kill(os.Getpid(), unix.SIGKILL)
			select {}
		}
	}
	s, err := Open(root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var staged *StagedLayer
	stagedAt := time.Now()
	for _, op := range crashOps {
		fmt.Printf("op %s\n", op)
		var err error
		switch {
		case op == "stage":
			staged, err = s.ImportLayer(bytes.NewReader(tarOf(t, entry{h: tar.Header{Name: "state"}, body: "imported"})), ImportOptions{})
		case op == "import":
			_, err = s.PublishLayers(testKey, []*StagedLayer{staged}, PublishOptions{ContentTime: stagedAt})
			if errors.Is(err, ErrStale) {
				err = nil
			} else if err == nil {
				err = errors.New("an import older than the head was published")
			}
		case strings.HasPrefix(op, "pull "):
			n, _ := strconv.Atoi(strings.TrimPrefix(op, "pull "))
			err = crashPull(t, s, n)
		case op == "mount":
			_, err = s.MountImageLayers()
		case op == "compact":
			_, err = s.Compact(testKey)
		case op == "gc", op == "gc pulled":
			_, err = s.GC()
		case op == "branch":
			if _, err = s.CreateVolume("branch", crashBranch, VolumeOptions{Writable: true, From: []Key{testKey}}); err == nil {
				if err = os.WriteFile(filepath.Join(s.upperDir("branch"), "b"), []byte("branch"), 0o644); err == nil {
					_, err = s.Commit("branch")
				}
			}
		default:
			n, _ := strconv.Atoi(strings.TrimPrefix(op, "commit "))
			err = crashCommit(s, n)
		}
		if err != nil {
			t.Fatalf("%s: %v", op, err)
		}
	}
	fmt.Printf("failpoints %d\n", count)
}

// crashCommit writes commit n straight into a volume's upper dir (the
// child mounts nothing, so a kill leaves no mount behind) and commits it.
func crashCommit(s *Store, n int) error {
	id := "vol" + strconv.Itoa(n)
	if _, err := s.CreateVolume(id, testKey, VolumeOptions{Writable: true}); err != nil {
		return err
	}
	upper := s.upperDir(id)
	for name, content := range crashContent(n) {
		if content == strconv.Itoa(n) || name == "state" {
			if err := os.WriteFile(filepath.Join(upper, name), []byte(content), 0o644); err != nil {
				return err
			}
		}
	}
	if n > 2 { // an overlay whiteout: a 0/0 character device
		if err := unix.Mknod(filepath.Join(upper, "f"+strconv.Itoa(n-2)), unix.S_IFCHR, 0); err != nil {
			return err
		}
	}
	_, err := s.Commit(id)
	return err
}

func runCrashChild(t *testing.T, root string, killAt int) (lines []string, killed bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), envCrashRoot+"="+root, envCrashKillAt+"="+strconv.Itoa(killAt))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return lines, true
		}
	}
	if err != nil {
		t.Fatalf("crash child (kill at %d) failed: %v\n%s", killAt, err, out.String())
	}
	return lines, false
}

func TestCrashSafety(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	t.Cleanup(func() { unmountBelow(t, dir) })

	lines, killed := runCrashChild(t, filepath.Join(dir, "dry-run"), 0)
	if killed {
		t.Fatal("the dry run was killed")
	}
	total := 0
	for _, l := range lines {
		fmt.Sscanf(l, "failpoints %d", &total)
	}
	if total < 50 {
		t.Fatalf("the workload has %d failpoints, want at least 50", total)
	}

	for killAt := 1; killAt <= total; killAt++ {
		root := filepath.Join(dir, fmt.Sprintf("kill-%03d", killAt))
		lines, killed := runCrashChild(t, root, killAt)
		if !killed {
			t.Fatalf("kill at %d: the child was not killed:\n%s", killAt, strings.Join(lines, "\n"))
		}
		// The last operation the child began and the last commit before it.
		op, where, lastCommit := "", "", 0
		for _, l := range lines {
			if rest, ok := strings.CutPrefix(l, "op "); ok {
				if op != "" && strings.HasPrefix(op, "commit ") {
					lastCommit, _ = strconv.Atoi(strings.TrimPrefix(op, "commit "))
				}
				op = rest
			}
			if rest, ok := strings.CutPrefix(l, "killed at "); ok {
				where = rest
			}
		}
		t.Run(fmt.Sprintf("%03d-%s-%s", killAt, strings.ReplaceAll(op, " ", ""), strings.ReplaceAll(where, "/", "-")), func(t *testing.T) {
			checkAfterCrash(t, root, dir, op, lastCommit)
		})
	}
	t.Logf("killed the workload at each of its %d failpoints", total)
}

func checkAfterCrash(t *testing.T, root, dir, op string, lastCommit int) {
	s, err := Open(root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	inFlight := lastCommit
	if n, ok := strings.CutPrefix(op, "commit "); ok {
		inFlight, _ = strconv.Atoi(n)
	}
	// 1. Right after the crash: the old head or the new one, never a mix.
	got := view(t, s, testKey, dir)
	old, new := crashContent(lastCommit), crashContent(inFlight)
	if !treesEqual(got, old) && !treesEqual(got, new) {
		t.Fatalf("after the crash the cache holds %v, want %v or %v", got, old, new)
	}

	// 2. Recovery: finish what the child left, as the node agent does.
	vols, err := s.Volumes()
	if err != nil {
		t.Fatal(err)
	}
	startedCommit := false
	for _, v := range vols {
		if v.CommitLayer != "" {
			startedCommit = true
		}
		if _, err := s.Commit(v.ID); err != nil {
			t.Fatalf("retrying the commit of %s: %v", v.ID, err)
		}
	}
	got = view(t, s, testKey, dir)
	switch {
	case startedCommit && !treesEqual(got, new):
		t.Fatalf("after retrying an interrupted commit the cache holds %v, want %v", got, new)
	case !treesEqual(got, old) && !treesEqual(got, new):
		t.Fatalf("after recovery the cache holds %v, want %v or %v", got, old, new)
	}
	// An import that was fetched while the head was committed, retried now
	// as a prefetch would be, never replaces it.
	if head, ok, err := s.head(testKey); err != nil {
		t.Fatal(err)
	} else if ok {
		l, err := s.ImportLayer(bytes.NewReader(tarOf(t, entry{h: tar.Header{Name: "state"}, body: "imported"})), ImportOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.PublishLayers(testKey, []*StagedLayer{l}, PublishOptions{ContentTime: head.Committed().Add(-time.Nanosecond)}); !errors.Is(err, ErrStale) {
			t.Fatalf("an import older than the recovered head: %v, want ErrStale", err)
		}
		assertTree(t, "after a stale import", view(t, s, testKey, dir), got)
	}
	// The fallback commit: the branch has nothing, or all of it, and its
	// fallback is unchanged (checked above).
	branch := view(t, s, crashBranch, dir)
	switch {
	case op == "branch" && startedCommit && !treesEqual(branch, crashBranchContent()):
		t.Fatalf("after retrying an interrupted fallback commit the branch holds %v, want %v", branch, crashBranchContent())
	case !treesEqual(branch, tree{}) && !treesEqual(branch, crashBranchContent()):
		t.Fatalf("after recovery the branch holds %v, want nothing or %v", branch, crashBranchContent())
	}
	// The pulls: nothing, or the whole of one of them.
	pulled := view(t, s, crashPulled, dir)
	if !treesEqual(pulled, tree{}) && !treesEqual(pulled, tree{"pulled": "1"}) && !treesEqual(pulled, tree{"pulled": "2"}) {
		t.Fatalf("after recovery the pulled cache holds %v", pulled)
	}
	// 3. GC leaves nothing unreferenced.
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, s)
	if vols, _ := s.Volumes(); len(vols) != 0 {
		t.Errorf("volumes left after recovery: %d", len(vols))
	}
	assertTree(t, "after GC", view(t, s, testKey, dir), got)
	assertTree(t, "the pulled cache after GC", view(t, s, crashPulled, dir), pulled)
}

func treesEqual(a, b tree) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
