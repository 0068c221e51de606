// Command bench measures layercache's engine against the copy-based ways of
// restoring a cache, in one run on one disk: warm volume setup (overlay
// mount vs cp -a vs tar -x), commit of 1,000 changed files on a small and a
// large cache, and compaction of 20 layers. It prints medians, ratios and
// whether the project's targets are met. Run as root: `make bench`.
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/layercache/layercache/engine"
)

type config struct {
	dir               string
	size, smallSize   int64
	files, runs       int
	keep              bool
	changed, compactN int
}

func main() {
	var c config
	var size, small string
	flag.StringVar(&c.dir, "dir", "/var/tmp/layercache-bench", "work dir (removed at the end)")
	flag.StringVar(&size, "size", "1GiB", "size of the large cache")
	flag.StringVar(&small, "small-size", "100MiB", "size of the small cache")
	flag.IntVar(&c.files, "files", 50000, "files in the large cache (the small one is scaled down)")
	flag.IntVar(&c.runs, "runs", 7, "runs per measurement (medians are reported)")
	flag.IntVar(&c.changed, "changed", 1000, "files changed per commit")
	flag.IntVar(&c.compactN, "compact-layers", 20, "layers merged by the compaction measurement")
	flag.BoolVar(&c.keep, "keep", false, "keep the work dir")
	flag.Parse()
	var err error
	if c.size, err = parseSize(size); err == nil {
		c.smallSize, err = parseSize(small)
	}
	if err == nil && os.Geteuid() != 0 {
		err = fmt.Errorf("must run as root (overlay mounts)")
	}
	if err == nil {
		err = run(c)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %s\n", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(n, 64)
			if err != nil || v <= 0 {
				return 0, fmt.Errorf("size %q: want a number with GiB, MiB, KiB or B", s)
			}
			return int64(v * float64(u.mult)), nil
		}
	}
	return 0, fmt.Errorf("size %q: want a number with GiB, MiB, KiB or B", s)
}

type cache struct {
	key   engine.Key
	size  int64
	files int
	label string
}

type bench struct {
	config
	s    *engine.Store
	rows []string
	fail []string
}

func run(c config) error {
	if err := os.RemoveAll(c.dir); err != nil {
		return err
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return err
	}
	defer cleanup(c)
	s, err := engine.Open(filepath.Join(c.dir, "store"), engine.Options{CompactThreshold: 1 << 20})
	if err != nil {
		return err
	}
	b := &bench{config: c, s: s}
	smallFiles := max(1000, int(int64(c.files)*c.smallSize/c.size))
	large := cache{engine.Key{Namespace: "bench", Name: "large"}, c.size, c.files, ""}
	small := cache{engine.Key{Namespace: "bench", Name: "small"}, c.smallSize, smallFiles, ""}
	for _, ca := range []*cache{&small, &large} {
		ca.label = fmt.Sprintf("%s / %d files", human(ca.size), ca.files)
		fmt.Fprintf(os.Stderr, "generating the %s cache...\n", ca.label)
		if err := b.generate(*ca); err != nil {
			return err
		}
	}
	fmt.Fprintln(os.Stderr, "measuring warm volume setup...")
	if err := b.setup(large); err != nil {
		return err
	}
	var commits [2]time.Duration
	for i, ca := range []cache{small, large} {
		fmt.Fprintf(os.Stderr, "measuring commits on the %s cache...\n", ca.label)
		if commits[i], err = b.commit(ca); err != nil {
			return err
		}
	}
	ratio := float64(commits[1]) / float64(commits[0])
	b.rows = append(b.rows, fmt.Sprintf("| commit time, large / small cache | %.2fx | | | | |", ratio))
	b.target(ratio <= 2, "commit time within 2x between the %s and %s caches (%.2fx)", small.label, large.label, ratio)
	fmt.Fprintln(os.Stderr, "measuring compaction...")
	if err := b.compact(large); err != nil {
		return err
	}
	b.print(large)
	if len(b.fail) > 0 {
		return fmt.Errorf("targets missed: %s", strings.Join(b.fail, "; "))
	}
	return nil
}

func cleanup(c config) {
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], c.dir+"/") {
			unix.Unmount(f[4], unix.MNT_DETACH)
		}
	}
	if !c.keep {
		os.RemoveAll(c.dir)
	}
}

// generate commits a cache of ca.size bytes in ca.files files of varied
// sizes (random, incompressible content), 100 files per directory.
func (b *bench) generate(ca cache) error {
	id := "gen-" + ca.key.Name
	if _, err := b.s.CreateVolume(id, ca.key, engine.VolumeOptions{Writable: true}); err != nil {
		return err
	}
	mnt := filepath.Join(b.dir, "mnt-"+id)
	if err := b.s.Mount(id, mnt); err != nil {
		return err
	}
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	avg := ca.size / int64(ca.files)
	buf := make([]byte, 2*avg+1)
	var written int64
	for i := range ca.files {
		n := avg/2 + rng.Int64N(avg+1)
		if i == ca.files-1 {
			n = max(0, min(int64(len(buf)), ca.size-written))
		}
		fillRandom(rng, buf[:n])
		p := filePath(mnt, i)
		if i%100 == 0 {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
		}
		if err := os.WriteFile(p, buf[:n], 0o644); err != nil {
			return err
		}
		written += n
	}
	if err := b.s.Unmount(id); err != nil {
		return err
	}
	if _, err := b.s.Commit(id); err != nil {
		return err
	}
	os.Remove(mnt)
	unix.Sync()
	return nil
}

func fillRandom(rng *rand.Rand, buf []byte) {
	for i := 0; i+8 <= len(buf); i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			buf[i+j] = byte(v >> (8 * j))
		}
	}
}

func filePath(root string, i int) string {
	return filepath.Join(root, fmt.Sprintf("d%04d", i/100), fmt.Sprintf("f%06d", i))
}

func (b *bench) headLayer(k engine.Key) (string, error) {
	info, err := b.s.Inspect(k)
	if err != nil {
		return "", err
	}
	if info.Head == nil || len(info.Head.Layers) != 1 {
		return "", fmt.Errorf("cache %s: want one layer", k)
	}
	return b.s.LayerPath(k, info.Head.Layers[0])
}

var results = map[string]time.Duration{}

// setup measures a warm volume: overlay (create + mount) vs cp -a vs tar -x
// of the same content from the same disk.
func (b *bench) setup(ca cache) error {
	layer, err := b.headLayer(ca.key)
	if err != nil {
		return err
	}
	mnt := filepath.Join(b.dir, "mnt-setup")
	overlay, err := b.measure(b.runs, func(i int) (time.Duration, error) {
		id := fmt.Sprintf("setup-%d", i)
		unix.Sync()
		start := time.Now()
		if _, err := b.s.CreateVolume(id, ca.key, engine.VolumeOptions{}); err != nil {
			return 0, err
		}
		if err := b.s.Mount(id, mnt); err != nil {
			return 0, err
		}
		d := time.Since(start)
		if err := b.s.Unmount(id); err != nil {
			return 0, err
		}
		return d, b.s.Discard(id)
	})
	if err != nil {
		return err
	}
	copyRuns := min(b.runs, 5)
	dst := filepath.Join(b.dir, "copy")
	cp, err := b.measure(copyRuns, func(int) (time.Duration, error) {
		return timedCommand(dst, "cp", "-a", layer, dst)
	})
	if err != nil {
		return err
	}
	archive := filepath.Join(b.dir, "cache.tar")
	if out, err := exec.Command("tar", "-C", layer, "-cf", archive, ".").CombinedOutput(); err != nil {
		return fmt.Errorf("tar -c: %s: %w", out, err)
	}
	tarx, err := b.measure(copyRuns, func(int) (time.Duration, error) {
		if err := os.Mkdir(dst, 0o755); err != nil {
			return 0, err
		}
		return timedCommand(dst, "tar", "-C", dst, "-xf", archive)
	})
	if err != nil {
		return err
	}
	os.Remove(archive)
	results["cp"] = cp
	vsCp, vsTar := float64(cp)/float64(overlay), float64(tarx)/float64(overlay)
	b.rows = append(b.rows, fmt.Sprintf("| warm volume setup, %s | %s | %s | %s | %.0fx | %.0fx |",
		ca.label, dur(overlay), dur(cp), dur(tarx), vsCp, vsTar))
	b.target(vsCp >= 300, "warm setup at least 300x faster than cp -a (%.0fx)", vsCp)
	return nil
}

// timedCommand times a command that creates dst, then removes dst.
func timedCommand(dst string, name string, args ...string) (time.Duration, error) {
	unix.Sync()
	start := time.Now()
	out, err := exec.Command(name, args...).CombinedOutput()
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("%s: %s: %w", name, out, err)
	}
	if err := os.RemoveAll(dst); err != nil {
		return 0, err
	}
	return d, nil
}

// commit measures the commit of a volume in which c.changed files of the
// cache were rewritten. The files' data are not synced before: the commit
// makes them durable, as it must.
func (b *bench) commit(ca cache) (time.Duration, error) {
	med, err := b.measure(b.runs, func(i int) (time.Duration, error) {
		return b.commitChanged(ca, i)
	})
	if err != nil {
		return 0, err
	}
	if _, err := b.s.Compact(ca.key); err != nil {
		return 0, err
	}
	if _, err := b.s.GC(); err != nil {
		return 0, err
	}
	b.rows = append(b.rows, fmt.Sprintf("| commit of %d changed files, %s cache | %s | | | | |", b.changed, ca.label, dur(med)))
	b.target(med <= 50*time.Millisecond, "%d-file commit at most 50 ms median on the %s cache (%s)", b.changed, ca.label, dur(med))
	return med, nil
}

func (b *bench) commitChanged(ca cache, run int) (time.Duration, error) {
	id := fmt.Sprintf("commit-%s-%d", ca.key.Name, run)
	if _, err := b.s.CreateVolume(id, ca.key, engine.VolumeOptions{Writable: true}); err != nil {
		return 0, err
	}
	mnt := filepath.Join(b.dir, "mnt-commit")
	if err := b.s.Mount(id, mnt); err != nil {
		return 0, err
	}
	unix.Sync()
	content := make([]byte, 4096)
	for j := range b.changed {
		copy(content, fmt.Sprintf("run %d change %d\n", run, j))
		if err := os.WriteFile(filePath(mnt, j*ca.files/b.changed), content, 0o644); err != nil {
			return 0, err
		}
	}
	if err := b.s.Unmount(id); err != nil {
		return 0, err
	}
	start := time.Now()
	res, err := b.s.Commit(id)
	d := time.Since(start)
	if err == nil && !res.Committed {
		err = fmt.Errorf("nothing committed")
	}
	return d, err
}

// compact measures the merge of a chain of c.compactN layers (the large
// cache plus c.compactN-1 commits of c.changed files each).
func (b *bench) compact(ca cache) error {
	runs := min(b.runs, 3)
	med, err := b.measure(runs, func(r int) (time.Duration, error) {
		for i := 1; i < b.compactN; i++ {
			if _, err := b.commitChanged(ca, 1000+r*b.compactN+i); err != nil {
				return 0, err
			}
		}
		info, err := b.s.Inspect(ca.key)
		if err != nil {
			return 0, err
		}
		if n := len(info.Head.Layers); n != b.compactN {
			return 0, fmt.Errorf("chain has %d layers, want %d", n, b.compactN)
		}
		unix.Sync()
		start := time.Now()
		res, err := b.s.Compact(ca.key)
		d := time.Since(start)
		if err == nil && !res.Compacted {
			err = fmt.Errorf("nothing compacted")
		}
		if err != nil {
			return 0, err
		}
		_, err = b.s.GC()
		return d, err
	})
	if err != nil {
		return err
	}
	b.rows = append(b.rows, fmt.Sprintf("| compaction of %d layers, %s cache (off the commit path) | %s | %s | | %.1fx | |",
		b.compactN, ca.label, dur(med), dur(results["cp"]), float64(results["cp"])/float64(med)))
	return nil
}

func (b *bench) measure(runs int, fn func(i int) (time.Duration, error)) (time.Duration, error) {
	var ds []time.Duration
	for i := range runs {
		d, err := fn(i)
		if err != nil {
			return 0, err
		}
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds[len(ds)/2], nil
}

func (b *bench) target(ok bool, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if !ok {
		b.fail = append(b.fail, msg)
	}
	mark := "met"
	if !ok {
		mark = "MISSED"
	}
	b.rows = append(b.rows, "target "+mark+": "+msg)
}

func (b *bench) print(large cache) {
	fmt.Printf("Machine: %s, %d cores, kernel %s, %s filesystem; medians of %d runs (copies: %d).\n\n",
		cpuModel(), runtime.NumCPU(), kernel(), fsType(b.dir), b.runs, min(b.runs, 5))
	fmt.Println("| measurement | layercache | cp -a | tar -x | vs cp -a | vs tar -x |")
	fmt.Println("|---|---|---|---|---|---|")
	var targets []string
	for _, r := range b.rows {
		if strings.HasPrefix(r, "target ") {
			targets = append(targets, r)
			continue
		}
		fmt.Println(r)
	}
	fmt.Println()
	for _, t := range targets {
		fmt.Println(t)
	}
}

func dur(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d KiB", n>>10)
	}
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

func kernel() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func fsType(dir string) string {
	out, err := exec.Command("findmnt", "-n", "-o", "FSTYPE", "-T", dir).Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}
