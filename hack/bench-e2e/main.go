// Command bench-e2e measures what a build pod sees on the local cluster.
//
// Synthetic: the time from pod creation to its container's start, and to
// the end of a workload that reads every file of a warm cache, for a
// layercache volume, for the same pod restoring the cache by copy (an init
// container copying from a hostPath, the local-path way) or by tar -x of an
// archive, and for an empty emptyDir (the floor).
//
// Build: a real go build of layercache itself with GOCACHE on the volume,
// cold, warm through layercache and warm through a copy (build.go).
//
// Load: many build pods created at once, with layercache and with an
// emptyDir: total time, start percentiles and scheduling warnings
// (load.go).
//
// Registry: on 3 nodes, a cold node's start pulling on demand, after a
// prefetch, and restoring a full tarball; an incremental push against a
// full re-upload (registry.go).
//
// Medians over --runs; run by make bench-e2e on a cluster with layercache
// installed (config/local) and the Go toolchain image imported.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	ns    = "layercache-bench"
	cache = "bench-cache"
	// The pod's clock: the host's uptime, which containers share.
	stamp = `cut -d' ' -f1 /proc/uptime`
)

type config struct {
	kubeconfig, hostDir string
	repo, parts         string
	size                int64
	files, runs         int
	loadPods            int
	loadRounds          int
}

func main() {
	var c config
	var size string
	flag.StringVar(&c.kubeconfig, "kubeconfig", "/var/lib/layercache-cluster/admin.kubeconfig", "the local cluster's kubeconfig")
	flag.StringVar(&c.hostDir, "host-dir", "/var/lib/layercache-cluster/hostpath/bench", "where the copy and tar baselines keep their source on the node")
	flag.StringVar(&size, "size", "1GiB", "cache size (GiB or MiB)")
	flag.IntVar(&c.files, "files", 50000, "files in the cache")
	flag.IntVar(&c.runs, "runs", 5, "runs per variant (medians)")
	flag.StringVar(&c.parts, "parts", "synthetic,build", "what to measure: synthetic (pod start and a full read of a warm cache), build (a real Go build), load (many build pods at once), registry (caches across nodes through the registry; 3 nodes)")
	flag.IntVar(&c.loadPods, "load-pods", 60, "pods created at once by the load part")
	flag.IntVar(&c.loadRounds, "load-rounds", 3, "rounds of the load part (each: the emptyDir burst, then the layercache one)")
	flag.StringVar(&c.repo, "repo", ".", "the layercache repository the real build compiles (its HEAD, vendored)")
	flag.Parse()
	var err error
	c.size, err = parseSize(size)
	if err == nil && c.runs < 1 {
		err = fmt.Errorf("--runs %d: want at least 1", c.runs)
	}
	if err == nil && (c.loadPods < 2 || c.loadRounds < 1) {
		err = fmt.Errorf("--load-pods %d, --load-rounds %d: want at least 2 pods and 1 round", c.loadPods, c.loadRounds)
	}
	if err == nil {
		err = run(context.Background(), c)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-e2e: %s\n", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	for suffix, mult := range map[string]int64{"GiB": 1 << 30, "MiB": 1 << 20} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			v, err := strconv.ParseFloat(n, 64)
			if err == nil && v > 0 {
				return int64(v * float64(mult)), nil
			}
		}
	}
	return 0, fmt.Errorf("size %q: want e.g. 1GiB or 256MiB", s)
}

type bench struct {
	config
	cs     kubernetes.Interface
	ctx    context.Context
	n      int
	missed []string
}

func run(ctx context.Context, c config) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return err
	}
	// The load part creates its pods at once: client-go's default of 5
	// requests a second would space them out over seconds.
	cfg.QPS, cfg.Burst = 200, 400
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	b := &bench{config: c, cs: cs, ctx: ctx}
	known := map[string]func() error{"synthetic": b.synthetic, "build": b.realBuild, "load": b.load, "registry": b.registry}
	parts := strings.Split(c.parts, ",")
	for _, part := range parts {
		if known[part] == nil {
			return fmt.Errorf("--parts: unknown part %q (want a list of synthetic, build, load, registry)", part)
		}
	}
	defer b.cleanup()
	if err := b.setup(); err != nil {
		return err
	}
	for _, part := range parts {
		if err := known[part](); err != nil {
			return fmt.Errorf("%s: %w", part, err)
		}
	}
	if len(b.missed) > 0 {
		return fmt.Errorf("targets missed: %s", strings.Join(b.missed, "; "))
	}
	return nil
}

// check prints whether a target is met and remembers the missed ones.
func (b *bench) check(cond bool, format string, args ...any) {
	what, mark := fmt.Sprintf(format, args...), "met"
	if !cond {
		mark, b.missed = "MISSED", append(b.missed, what)
	}
	fmt.Printf("target %s: %s\n", mark, what)
}

// synthetic measures pod start and a full read of a warm cache of
// --size bytes in --files files.
func (b *bench) synthetic() error {
	label := fmt.Sprintf("%.1f GiB / %d files", float64(b.size)/(1<<30), b.files)
	fmt.Fprintf(os.Stderr, "generating the %s source on the node...\n", label)
	if err := generate(filepath.Join(b.hostDir, "src"), b.size, b.files); err != nil {
		return err
	}
	if out, err := exec.Command("tar", "-C", filepath.Join(b.hostDir, "src"), "-cf", filepath.Join(b.hostDir, "cache.tar"), ".").CombinedOutput(); err != nil {
		return fmt.Errorf("tar: %s: %w", out, err)
	}
	fmt.Fprintln(os.Stderr, "filling the layercache cache from it (one committed build)...")
	src := []hostMount{{host: filepath.Join(b.hostDir, "src"), path: "/src", readOnly: true},
		{host: b.hostDir, path: "/src-archive", readOnly: true}}
	if _, err := b.pod("fill", podSpec{cache: cache, trust: "write", sa: "builder", hostMounts: src,
		script: "cp -a /src/. /cache/"}); err != nil {
		return err
	}
	if err := b.waitCommitted(cache); err != nil {
		return err
	}

	read := `n=$(find /cache -type f | wc -l); find /cache -type f -exec cat {} + > /dev/null`
	variants := []struct {
		name string
		spec podSpec
	}{
		{"layercache (warm cache)", podSpec{cache: cache, trust: "read"}},
		{"copy from a hostPath (init container cp -a)", podSpec{hostMounts: src, init: "cp -a /src/. /cache/"}},
		{"tar -x of an archive (init container)", podSpec{hostMounts: src, init: "tar -xf /src-archive/cache.tar -C /cache"}},
		{"empty emptyDir (floor)", podSpec{}},
	}
	results := map[string]timing{}
	for _, v := range variants {
		spec := v.spec
		spec.script = read
		ts, err := b.series("run", v.name, func(int) podSpec { return spec })
		if err != nil {
			return err
		}
		results[v.name] = medians(ts)
	}
	lc, cp, floor := results[variants[0].name], results[variants[1].name], results[variants[3].name]
	fmt.Printf("Pod on the local cluster (1 node, 2 cores), warm cache of %s; medians of %d runs.\n\n", label, b.runs)
	fmt.Println("| volume | pod created → container started | → every file read | start vs copy |")
	fmt.Println("|---|---|---|---|")
	for _, v := range variants {
		r := results[v.name]
		fmt.Printf("| %s | %s | %s | %.1fx |\n", v.name, sec(r.start), sec(r.end), float64(cp.start)/float64(r.start))
	}
	fmt.Println()
	b.check(float64(cp.start) >= 10*float64(lc.start), "layercache start at least 10x faster than the copy baseline (%.1fx)", float64(cp.start)/float64(lc.start))
	b.check(lc.start-floor.start <= 2*time.Second, "layercache start within 2 s of the emptyDir floor (+%s)", sec(lc.start-floor.start))
	return nil
}

// series runs --runs pods, spec(run) for each, and returns their timings.
func (b *bench) series(prefix, name string, spec func(run int) podSpec) ([]timing, error) {
	var ts []timing
	for r := range b.runs {
		fmt.Fprintf(os.Stderr, "%s, run %d/%d...\n", name, r+1, b.runs)
		t, err := b.pod(prefix, spec(r))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		ts = append(ts, t)
	}
	return ts, nil
}

// medians returns the median start, end, and script time (end - start)
// of a series.
func medians(ts []timing) timing {
	var starts, ends, scripts []time.Duration
	for _, t := range ts {
		starts, ends, scripts = append(starts, t.start), append(ends, t.end), append(scripts, t.end-t.start)
	}
	return timing{median(starts), median(ends), median(scripts)}
}

func sec(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func (b *bench) setup() error {
	b.cleanup()
	// The label lets the tarball baseline's pods reach the local registry
	// past its NetworkPolicy (config/local/registry.yaml).
	bns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"layercache-registry-client": "allow"}}}
	if _, err := b.cs.CoreV1().Namespaces().Create(b.ctx, bns, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := b.cs.CoreV1().ServiceAccounts(ns).Create(b.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "builder"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	_, err := b.cs.RbacV1().RoleBindings(ns).Create(b.ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "builder"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "layercache-cache-committer"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "builder", Namespace: ns}}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		if _, err := b.cs.CoreV1().ServiceAccounts(ns).Get(b.ctx, "default", metav1.GetOptions{}); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no default ServiceAccount in %s", ns)
		}
	}
}

func (b *bench) cleanup() {
	b.cs.CoreV1().Namespaces().Delete(b.ctx, ns, metav1.DeleteOptions{})
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if _, err := b.cs.CoreV1().Namespaces().Get(b.ctx, ns, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			break
		}
	}
	os.RemoveAll(b.hostDir)
}

type podSpec struct {
	node             string // pinned to it if set
	image            string // busybox by default
	env              []corev1.EnvVar
	cache, trust, sa string
	hostMounts       []hostMount
	init, script     string
}

// hostMount mounts a directory of the node into the pod's containers.
type hostMount struct {
	host, path string
	readOnly   bool
}

// timing is, from a pod's creation, when its main container started and
// when its script ended; and, for medians, the script's own time.
type timing struct{ start, end, script time.Duration }

// pod runs one pod to completion and returns, from its creation, when its
// main container started and when its script ended.
func (b *bench) pod(prefix string, s podSpec) (timing, error) {
	b.n++
	name := fmt.Sprintf("%s-%d", prefix, b.n)
	image := s.image
	if image == "" {
		image = "localhost/busybox:dev"
	}
	mounts := []corev1.VolumeMount{{Name: "cache", MountPath: "/cache"}}
	volumes := []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
	for i, m := range s.hostMounts {
		v := fmt.Sprintf("host%d", i)
		volumes = append(volumes, corev1.Volume{Name: v, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: m.host}}})
		mounts = append(mounts, corev1.VolumeMount{Name: v, MountPath: m.path, ReadOnly: m.readOnly})
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{}},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever, ServiceAccountName: s.sa, TerminationGracePeriodSeconds: ptr(int64(1)),
			Containers: []corev1.Container{{Name: "main", Image: image, ImagePullPolicy: corev1.PullNever, Env: s.env,
				Command:      []string{"sh", "-c", stamp + "; " + s.script + "; " + stamp},
				VolumeMounts: mounts}},
			Volumes: volumes,
		},
	}
	if s.cache != "" {
		p.Labels["layercache.io/cache"], p.Labels["layercache.io/trust"] = s.cache, s.trust
	}
	if s.node != "" {
		p.Spec.NodeSelector = map[string]string{corev1.LabelHostname: s.node}
	}
	if s.init != "" {
		p.Spec.InitContainers = []corev1.Container{{Name: "restore", Image: "localhost/busybox:dev", ImagePullPolicy: corev1.PullNever,
			Command: []string{"sh", "-c", s.init}, VolumeMounts: mounts}}
	}
	created := uptime()
	if _, err := b.cs.CoreV1().Pods(ns).Create(b.ctx, p, metav1.CreateOptions{}); err != nil {
		return timing{}, err
	}
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		got, err := b.cs.CoreV1().Pods(ns).Get(b.ctx, name, metav1.GetOptions{})
		if err != nil {
			return timing{}, err
		}
		if got.Status.Phase == corev1.PodFailed {
			raw, _ := b.cs.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "main", TailLines: ptr(int64(20))}).DoRaw(b.ctx)
			return timing{}, fmt.Errorf("pod %s failed; its last lines:\n%s", name, raw)
		}
		if got.Status.Phase == corev1.PodSucceeded {
			break
		}
		for _, st := range append(got.Status.InitContainerStatuses, got.Status.ContainerStatuses...) {
			if w := st.State.Waiting; w != nil && w.Reason == "ErrImageNeverPull" {
				return timing{}, fmt.Errorf("pod %s: image %s is not on the node (make bench-e2e builds and imports it)", name, st.Image)
			}
		}
		if time.Now().After(deadline) {
			return timing{}, fmt.Errorf("pod %s did not finish", name)
		}
	}
	raw, err := b.cs.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "main"}).DoRaw(b.ctx)
	if err != nil {
		return timing{}, err
	}
	lines := strings.Fields(string(raw))
	if len(lines) < 2 {
		return timing{}, fmt.Errorf("pod %s: no timestamps in %q", name, raw)
	}
	start, err1 := strconv.ParseFloat(lines[0], 64)
	end, err2 := strconv.ParseFloat(lines[len(lines)-1], 64)
	if err1 != nil || err2 != nil {
		return timing{}, fmt.Errorf("pod %s: bad timestamps in %q", name, raw)
	}
	b.cs.CoreV1().Pods(ns).Delete(b.ctx, name, metav1.DeleteOptions{})
	return timing{start: seconds(start - created), end: seconds(end - created)}, nil
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func uptime() float64 {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		panic(err)
	}
	v, _ := strconv.ParseFloat(strings.Fields(string(data))[0], 64)
	return v
}

func ptr[T any](v T) *T { return &v }

// waitCommitted waits until the node reports the cache committed.
func (b *bench) waitCommitted(cache string) error {
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(time.Second) {
		raw, err := b.cs.Discovery().RESTClient().Get().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "caches", cache).DoRaw(b.ctx)
		if err == nil && strings.Contains(string(raw), `"nodeNames":`) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cache %s was not committed", cache)
		}
	}
}

// generate writes size bytes in files files (random, incompressible),
// 100 per directory.
func generate(dir string, size int64, files int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rng := rand.New(rand.NewChaCha8([32]byte{7}))
	avg := size / int64(files)
	buf := make([]byte, 2*avg+8)
	for i := range files {
		n := avg/2 + rng.Int64N(avg+1)
		for j := 0; j+8 <= int(n); j += 8 {
			v := rng.Uint64()
			for k := range 8 {
				buf[j+k] = byte(v >> (8 * k))
			}
		}
		d := filepath.Join(dir, fmt.Sprintf("d%04d", i/100))
		if i%100 == 0 {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%06d", i)), buf[:n], 0o644); err != nil {
			return err
		}
	}
	return nil
}
