package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
)

const loadCache = "load-cache"

// loadResult is one burst of pods.
type loadResult struct {
	total                     time.Duration   // first creation → last pod done
	starts                    []time.Duration // each pod: created → container started
	failedScheduling, failMnt int
}

// load starts --load-pods build pods at once, half writers and half
// readers of one cache, and the same pods with an emptyDir, in alternating
// rounds: total time, start percentiles, and the warnings the cluster
// logged (FailedScheduling, FailedMount).
func (b *bench) load() error {
	fmt.Fprintln(os.Stderr, "load: committing a first generation of the cache...")
	if _, err := b.pod("load-fill", podSpec{cache: loadCache, trust: "write", sa: "builder",
		script: "mkdir -p /cache/deps && for i in $(seq 100); do echo $i > /cache/deps/$i; done"}); err != nil {
		return err
	}
	if err := b.waitCommitted(loadCache); err != nil {
		return err
	}
	variants := []struct {
		name  string
		cache bool
	}{{"emptyDir", false}, {"layercache", true}}
	results := map[string][]loadResult{}
	for round := range b.loadRounds {
		for _, v := range variants {
			fmt.Fprintf(os.Stderr, "load: %d pods with %s, round %d/%d...\n", b.loadPods, v.name, round+1, b.loadRounds)
			r, err := b.burst(fmt.Sprintf("l%d-%s", round, map[bool]string{true: "lc", false: "ed"}[v.cache]), v.cache)
			if err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			results[v.name] = append(results[v.name], r)
		}
	}
	fmt.Printf("%d build pods created at once (half writers, half readers of one cache), on the local cluster (1 node, 2 cores); %d rounds, median total, start percentiles over all rounds.\n\n",
		b.loadPods, b.loadRounds)
	fmt.Println("| volume | all pods done | created → started p50 | p90 | FailedScheduling | FailedMount |")
	fmt.Println("|---|---|---|---|---|---|")
	summary := map[string]loadResult{}
	for _, v := range variants {
		var totals, starts []time.Duration
		var fs, fm int
		for _, r := range results[v.name] {
			totals, starts = append(totals, r.total), append(starts, r.starts...)
			fs, fm = fs+r.failedScheduling, fm+r.failMnt
		}
		slices.Sort(starts)
		s := loadResult{total: median(totals), starts: starts, failedScheduling: fs, failMnt: fm}
		summary[v.name] = s
		fmt.Printf("| %s | %s | %s | %s | %d | %d |\n", v.name, sec(s.total), sec(percentile(starts, 50)), sec(percentile(starts, 90)), fs, fm)
	}
	fmt.Println()
	lc, ed := summary["layercache"], summary["emptyDir"]
	b.check(float64(lc.total) <= 1.2*float64(ed.total), "layercache's total within 1.2x of emptyDir's (%.2fx)", float64(lc.total)/float64(ed.total))
	b.check(lc.failedScheduling == 0, "no FailedScheduling with layercache (%d)", lc.failedScheduling)
	return nil
}

func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

// burst creates the pods of one round at once and waits until all are
// done and, for layercache, their claims released.
func (b *bench) burst(prefix string, cache bool) (loadResult, error) {
	created := make([]float64, b.loadPods)
	errs := make([]error, b.loadPods)
	first := uptime()
	var wg sync.WaitGroup
	for i := range b.loadPods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", prefix, i), Labels: map[string]string{}},
				Spec: corev1.PodSpec{
					RestartPolicy: corev1.RestartPolicyNever, TerminationGracePeriodSeconds: ptr(int64(1)),
					Containers: []corev1.Container{{Name: "main", Image: "localhost/busybox:dev", ImagePullPolicy: corev1.PullNever,
						Command:      []string{"sh", "-c", stamp + `; ls /cache/deps 2>/dev/null | wc -l >/dev/null; echo "$HOSTNAME" > /cache/built-by-$HOSTNAME`},
						VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/cache"}}}},
					Volumes: []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
				},
			}
			if cache {
				p.Labels["layercache.io/cache"], p.Labels["layercache.io/trust"] = loadCache, "read"
				if i%2 == 0 {
					p.Labels["layercache.io/trust"], p.Spec.ServiceAccountName = "write", "builder"
				}
			}
			created[i] = uptime()
			_, errs[i] = b.cs.CoreV1().Pods(ns).Create(b.ctx, p, metav1.CreateOptions{})
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return loadResult{}, err
		}
	}
	var last float64
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(250 * time.Millisecond) {
		list, err := b.cs.CoreV1().Pods(ns).List(b.ctx, metav1.ListOptions{})
		if err != nil {
			return loadResult{}, err
		}
		done := 0
		for _, p := range list.Items {
			if !strings.HasPrefix(p.Name, prefix+"-") {
				continue
			}
			switch p.Status.Phase {
			case corev1.PodFailed:
				return loadResult{}, fmt.Errorf("pod %s failed", p.Name)
			case corev1.PodSucceeded:
				done++
			}
		}
		if done == b.loadPods {
			last = uptime()
			break
		}
		if time.Now().After(deadline) {
			return loadResult{}, fmt.Errorf("%d of %d pods done after 10 minutes", done, b.loadPods)
		}
	}
	r := loadResult{total: seconds(last - first)}
	for i := range b.loadPods {
		name := fmt.Sprintf("%s-%d", prefix, i)
		raw, err := b.cs.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "main"}).DoRaw(b.ctx)
		if err != nil {
			return loadResult{}, err
		}
		start, err := strconv.ParseFloat(strings.TrimSpace(string(raw)), 64)
		if err != nil {
			return loadResult{}, fmt.Errorf("pod %s: no timestamp in %q", name, raw)
		}
		r.starts = append(r.starts, seconds(start-created[i]))
	}
	events, err := b.cs.CoreV1().Events(ns).List(b.ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.kind", "Pod").String()})
	if err != nil {
		return loadResult{}, err
	}
	for _, e := range events.Items {
		if !strings.HasPrefix(e.InvolvedObject.Name, prefix+"-") {
			continue
		}
		count := max(int(e.Count), 1)
		switch e.Reason {
		case "FailedScheduling":
			r.failedScheduling += count
		case "FailedMount":
			r.failMnt += count
		default:
			continue
		}
		fmt.Fprintf(os.Stderr, "load: %s %s (x%d): %s\n", e.InvolvedObject.Name, e.Reason, count, e.Message)
	}
	return r, b.clearPods(prefix)
}

// clearPods deletes the round's pods and waits until their claims and
// volumes are released, so that one round's commits do not slow the next.
func (b *bench) clearPods(prefix string) error {
	list, err := b.cs.CoreV1().Pods(ns).List(b.ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, p := range list.Items {
		if strings.HasPrefix(p.Name, prefix+"-") {
			b.cs.CoreV1().Pods(ns).Delete(b.ctx, p.Name, metav1.DeleteOptions{})
		}
	}
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(time.Second) {
		pods, err1 := b.cs.CoreV1().Pods(ns).List(b.ctx, metav1.ListOptions{})
		pvcs, err2 := b.cs.CoreV1().PersistentVolumeClaims(ns).List(b.ctx, metav1.ListOptions{})
		pvs, err3 := b.cs.CoreV1().PersistentVolumes().List(b.ctx, metav1.ListOptions{})
		if err1 == nil && err2 == nil && err3 == nil && len(pods.Items) == 0 && len(pvcs.Items) == 0 && len(pvs.Items) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("round %s: pods, claims or volumes still there after 5 minutes", prefix)
		}
	}
}
