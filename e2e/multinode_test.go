//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

const repo = ".." // go test runs in the package directory

// needNodes skips unless the cluster has node2 and node3 (make test-e2e
// brings up 3 nodes).
func (e *env) needNodes() {
	e.t.Helper()
	names := strings.Join(e.nodeNames(), " ")
	if !strings.Contains(names, "node2") || !strings.Contains(names, "node3") {
		e.t.Skipf("needs the nodes node2 and node3 of the 3-node local cluster (make test-e2e); have %s", names)
	}
}

func cluster(t *testing.T, script string, args ...string) {
	t.Helper()
	out, err := exec.Command(filepath.Join(repo, "hack", "cluster", script), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, out)
	}
}

// kubectlCmd is kubectl on the local cluster.
func kubectlCmd(args ...string) *exec.Cmd {
	return exec.Command(filepath.Join(repo, "bin", "k8s", "v1.33.13", "kubectl"), append([]string{"--kubeconfig", kubeconfig}, args...)...)
}

func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := kubectlCmd(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// commitOn runs a trusted writer of cache pinned to node and waits until
// its commit is reported.
func (e *env) commitOn(node, cache, pod, script string) {
	e.t.Helper()
	if phase, out := e.run(on(node, buildPod(pod, cache, "write", "builder", script, nil))); phase != corev1.PodSucceeded {
		e.t.Fatalf("%s on %s: %s %s", pod, node, phase, out)
	}
	e.settled()
	e.eventually("the Cache to list "+node, 30*time.Second, func() bool { return e.nodeStatus(cache, node) != nil })
}

// nodeStatus is node's entry in the Cache's status, or nil.
func (e *env) nodeStatus(cache, node string) *v1alpha1.NodeCacheStatus {
	ca := &v1alpha1.Cache{}
	if c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: cache}, ca) != nil {
		return nil
	}
	for i := range ca.Status.Nodes {
		if ca.Status.Nodes[i].Node == node {
			return &ca.Status.Nodes[i]
		}
	}
	return nil
}

// localCache creates Cache name with registry sync off: it stays on the
// nodes that commit it, each with its own state.
func (e *env) localCache(name string) {
	e.t.Helper()
	e.create(&v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: e.ns},
		Spec: v1alpha1.CacheSpec{RegistrySync: v1alpha1.RegistrySyncDisabled}})
}

// A cache committed on node2 draws the next unpinned build of that cache
// there (the webhook's preferred affinity), and it starts warm.
func TestWarmNodeAffinity(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node2", "affine", "writer", `echo from-node2 > /cache/result`)
	phase, out := e.run(buildPod("next", "affine", "read", "", `cat /cache/result`, nil))
	if phase != corev1.PodSucceeded || out != "from-node2" {
		t.Fatalf("next build: %s %q", phase, out)
	}
	if n := e.nodeOf("next"); n != "node2" {
		t.Fatalf("the next build ran on %s, not on node2 where the cache is", n)
	}
}

// Each node holds its own state of a cache, listed in the Cache's status
// with its own generation; a build forced onto a node starts from that
// node's state (with registry sync off for the cache: with it, node3
// would pull node2's commit first).
func TestCachesLivePerNode(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.localCache("split")
	e.commitOn("node2", "split", "w1", `echo 1 > /cache/a`)
	e.commitOn("node2", "split", "w2", `echo 2 > /cache/b`)
	e.commitOn("node3", "split", "w3", `n=$(ls /cache | wc -l); echo $n > /cache/seen-on-node3`)
	if g2, g3 := e.nodeStatus("split", "node2"), e.nodeStatus("split", "node3"); g2.Generation != 2 || g3.Generation != 1 {
		t.Fatalf("generations: node2 %d, node3 %d; want 2 and 1", g2.Generation, g3.Generation)
	}
	read := `cd /cache && for f in $(ls | sort); do echo "$f=$(cat $f)"; done`
	for node, want := range map[string]string{"node2": "a=1\nb=2", "node3": "seen-on-node3=0"} {
		name := "read-" + node
		if phase, out := e.run(on(node, buildPod(name, "split", "read", "", read, nil))); phase != corev1.PodSucceeded || out != want {
			t.Errorf("a build on %s saw %q, want %q (%s)", node, out, want, phase)
		}
	}
	e.settled()
	nodeCaches := &v1alpha1.NodeCacheList{}
	if err := c.List(e.ctx, nodeCaches, client.InNamespace(e.ns), client.MatchingLabels{v1alpha1.LabelCache: "split"}); err != nil || len(nodeCaches.Items) != 2 {
		t.Fatalf("NodeCaches of split: %v, %d", err, len(nodeCaches.Items))
	}
}

// kubectl drain of a node that holds a cache completes (the manager's
// PodDisruptionBudget lets one replica go at a time), and builds then run
// on the other nodes.
func TestDrainANodeWithACache(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	e.commitOn("node3", "drained", "writer", `echo x > /cache/x`)
	t.Cleanup(func() { kubectl(t, "uncordon", "node3") })
	start := time.Now()
	kubectl(t, "drain", "node3", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=180s")
	t.Logf("drain took %.1fs", time.Since(start).Seconds())
	if phase, out := e.run(buildPod("after-drain", "drained", "write", "builder", `echo y > /cache/y; ls /cache | sort | tr '\n' ' '`, nil)); phase != corev1.PodSucceeded {
		t.Fatalf("a build after the drain: %s %s", phase, out)
	}
	if n := e.nodeOf("after-drain"); n == "node3" {
		t.Fatal("a build ran on the drained node")
	}
	e.settled()
}

// A node vanishes (its kubelet, containers and node agent stop) and is
// deleted: deleting its Caches, and the namespace that holds them,
// completes within 60 s; the other nodes keep their data and status. When
// it registers again it starts empty: what it held may have been deleted.
func TestNodeLoss(t *testing.T) {
	e, other := newEnv(t), newEnv(t)
	e.needNodes()
	// Each node's own state matters here: no registry sync.
	e.localCache("only-there")
	e.localCache("both")
	other.localCache("survivor")
	e.commitOn("node3", "only-there", "w1", `echo lost > /cache/f`)
	e.commitOn("node2", "both", "w2", `echo kept > /cache/f`)
	e.commitOn("node3", "both", "w3", `echo lost > /cache/f`)
	other.commitOn("node2", "survivor", "w4", `echo kept > /cache/f`)
	other.commitOn("node3", "survivor", "w5", `echo lost > /cache/f`)

	cluster(t, "node-stop.sh", "3")
	t.Cleanup(func() { restoreNode(t, "node3", 3) })
	kubectl(t, "delete", "node", "node3", "--wait=false")
	lost := time.Now()

	ca := &v1alpha1.Cache{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: "both"}, ca); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(e.ctx, ca); err != nil {
		t.Fatal(err)
	}
	e.eventually("the Cache held on the lost node to be deleted", 60*time.Second, func() bool {
		return apierrors.IsNotFound(c.Get(e.ctx, client.ObjectKeyFromObject(ca), ca))
	})
	t.Logf("Cache deleted %.1fs after the node", time.Since(lost).Seconds())
	ns := &corev1.Namespace{}
	if err := c.Get(e.ctx, client.ObjectKey{Name: e.ns}, ns); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(e.ctx, ns); err != nil {
		t.Fatal(err)
	}
	e.eventually("the namespace to be deleted", 60*time.Second, func() bool {
		return apierrors.IsNotFound(c.Get(e.ctx, client.ObjectKeyFromObject(ns), ns))
	})
	t.Logf("namespace deleted %.1fs after the node", time.Since(lost).Seconds())

	// The other namespace's cache keeps node2, loses node3.
	other.eventually("the survivor to list node2 only", 30*time.Second, func() bool {
		return other.nodeStatus("survivor", "node3") == nil && other.nodeStatus("survivor", "node2") != nil
	})
	if _, err := os.Stat(filepath.Join(storeDir("node2"), "caches", other.ns, "survivor")); err != nil {
		t.Fatalf("node2's data of the survivor: %v", err)
	}
	if phase, out := other.run(on("node2", buildPod("check", "survivor", "read", "", `cat /cache/f`, nil))); phase != corev1.PodSucceeded || out != "kept" {
		t.Fatalf("node2 reads %q (%s)", out, phase)
	}
	other.settled()

	// Back again, the node forgets what it held.
	restoreNode(t, "node3", 3)
	other.eventually("node3 to forget the survivor", 60*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(storeDir("node3"), "caches", other.ns, "survivor"))
		return os.IsNotExist(err)
	})
	if other.nodeStatus("survivor", "node3") != nil {
		t.Fatal("node3 came back with its stale data of the survivor")
	}
}

// restoreNode starts node K again and waits until it is Ready with a ready
// node agent. Idempotent.
func restoreNode(t *testing.T, name string, k int) {
	cluster(t, "node.sh", fmt.Sprint(k))
	e := &env{t: t, ctx: context.Background()}
	e.eventually(name+" to be Ready with a node agent", 180*time.Second, func() bool {
		n := &corev1.Node{}
		if c.Get(e.ctx, client.ObjectKey{Name: name}, n) != nil {
			return false
		}
		ready := false
		for _, cond := range n.Status.Conditions {
			ready = ready || (cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue)
		}
		agents := &corev1.PodList{}
		c.List(e.ctx, agents, client.InNamespace("layercache-system"), client.MatchingLabels{"app.kubernetes.io/component": "node-agent"})
		for _, p := range agents.Items {
			if p.Spec.NodeName == name && p.DeletionTimestamp == nil && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].Ready {
				return ready
			}
		}
		return false
	})
}

// storm creates labelled pods, one every interval, until stop is closed or
// max are created. It returns the names created and the refusals.
type refusal struct {
	name  string
	start time.Time
	err   error
}

// sentAnnotation is when a storm sent a pod's creation.
const sentAnnotation = "e2e.layercache.io/sent"

func (e *env) storm(prefix string, max int, interval time.Duration, stop <-chan struct{}) ([]string, []refusal) {
	var (
		names   []string
		refused []refusal
		mu      sync.Mutex
		wg      sync.WaitGroup
	)
	for i := 0; i < max; i++ {
		select {
		case <-stop:
			i = max
			continue
		default:
		}
		p := buildPod(fmt.Sprintf("%s-%03d", prefix, i), prefix, "read", "", "true", nil)
		p.Namespace = e.ns
		names = append(names, p.Name)
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			p.Annotations = map[string]string{sentAnnotation: start.Format(time.RFC3339Nano)}
			if err := c.Create(e.ctx, p); err != nil {
				mu.Lock()
				refused = append(refused, refusal{p.Name, start, err})
				mu.Unlock()
			}
		}()
		time.Sleep(interval)
	}
	wg.Wait()
	return names, refused
}

// stormUntil runs a storm in the background; the function it returns
// stops it and returns its creations and refusals.
func (e *env) stormUntil(prefix string, max int, interval time.Duration) func() ([]string, []refusal) {
	var names []string
	var refused []refusal
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		names, refused = e.storm(prefix, max, interval, stop)
	}()
	return func() ([]string, []refusal) {
		close(stop)
		<-done
		return names, refused
	}
}

// stormOutcome fails the test for each refused creation of a storm (the
// time it was sent from the disruption at since), logs the counts, and
// returns the pods that ran uncached.
func (e *env) stormOutcome(disruption string, since time.Time, names []string, refused []refusal) []string {
	e.t.Helper()
	for _, r := range refused {
		e.t.Errorf("%s refused, sent %+.3fs from %s: %v", r.name, r.start.Sub(since).Seconds(), disruption, r.err)
	}
	skipped := e.uncached(names)
	e.t.Logf("%d of %d creations refused, %d uncached (%v)", len(refused), len(names), len(skipped), skipped)
	return skipped
}

// uncached waits for the pods to end (every one must succeed) and returns
// those admitted without the webhook (no claims annotation); each must have
// its CacheSkipped event.
func (e *env) uncached(names []string) []string {
	e.t.Helper()
	var out []string
	for _, name := range names {
		if phase, _ := e.wait(name); phase != corev1.PodSucceeded {
			e.t.Errorf("%s: %s", name, phase)
		}
		p := &corev1.Pod{}
		if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: name}, p); err != nil {
			e.t.Fatal(err)
		}
		if _, ok := p.Annotations[v1alpha1.AnnotationClaims]; ok {
			continue
		}
		out = append(out, name)
		e.eventually(name+"'s CacheSkipped event", 30*time.Second, func() bool {
			return strings.Contains(e.events(name), " CacheSkipped: ")
		})
	}
	return out
}

// The manager runs two replicas; the leader is killed (SIGKILL) while
// labelled pods are created, one every 200 ms for 30 s. The webhook fails
// open: none is refused; a request in flight to the killed replica, or
// sent before its endpoint is dropped, is admitted uncached, with its
// event; every other pod gets its claim, and every claim is released.
func TestManagerHA(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	lease := &coordinationv1.Lease{}
	// The holder is POD_UUID: a new process, even in the same pod (the
	// killed container restarts), is a new holder.
	leader := func() string {
		if c.Get(e.ctx, client.ObjectKey{Namespace: "layercache-system", Name: "manager.layercache.io"}, lease) != nil || lease.Spec.HolderIdentity == nil {
			return ""
		}
		return *lease.Spec.HolderIdentity
	}
	e.twoManagers()
	e.eventually("a leader that runs", 60*time.Second, func() bool {
		pod, _, _ := strings.Cut(leader(), "_")
		return pod != "" && c.Get(e.ctx, client.ObjectKey{Namespace: "layercache-system", Name: pod}, &corev1.Pod{}) == nil
	})
	first := leader()
	firstPod, _, _ := strings.Cut(first, "_")

	var names []string
	var refused []refusal
	done := make(chan struct{})
	go func() {
		defer close(done)
		names, refused = e.storm("ha", 150, 200*time.Millisecond, nil)
	}()
	time.Sleep(5 * time.Second)
	killed := time.Now()
	killManager(t, firstPod)
	unready := e.endpointUnready(firstPod)
	var paused time.Duration
	e.eventually("another leader", 90*time.Second, func() bool {
		l := leader()
		paused = time.Since(killed)
		return l != "" && l != first
	})
	t.Logf("the leader %s was killed; %s took over after %.1fs", first, leader(), paused.Seconds())
	<-done
	// A request in flight to the killed replica, or sent to its endpoint
	// before the kubelet reports it dead and kube-proxy drops it, fails in
	// transport; the API server retries none and admits the pod as written.
	// No other pod may run uncached.
	gone := <-unready
	t.Logf("the killed replica's endpoint was unready %.1fs after the kill", gone.Sub(killed).Seconds())
	for _, name := range e.stormOutcome("the kill", killed, names, refused) {
		p := &corev1.Pod{}
		if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: name}, p); err != nil {
			t.Fatal(err)
		}
		sent, err := time.Parse(time.RFC3339Nano, p.Annotations[sentAnnotation])
		if err != nil || sent.Before(killed.Add(-time.Second)) || sent.After(gone.Add(kubeProxySync)) {
			t.Errorf("%s ran uncached, sent %+.1fs from the kill: not in flight to the killed replica, nor before its endpoint was dropped (%v)",
				name, sent.Sub(killed).Seconds(), err)
		}
	}
	e.settled() // every claim created and released
}

// kubeProxySync bounds how long kube-proxy takes to drop an endpoint once
// its EndpointSlice says it is not ready (its minSyncPeriod is 1s).
const kubeProxySync = 3 * time.Second

// endpointUnready reports when the webhook Service's EndpointSlices first
// show pod's endpoint not ready, or no longer list it.
func (e *env) endpointUnready(pod string) <-chan time.Time {
	out := make(chan time.Time, 1)
	go func() {
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			slices := &discoveryv1.EndpointSliceList{}
			if c.List(e.ctx, slices, client.InNamespace("layercache-system"),
				client.MatchingLabels{discoveryv1.LabelServiceName: "layercache-webhook-service"}) != nil {
				continue
			}
			ready := false
			for _, sl := range slices.Items {
				for _, ep := range sl.Endpoints {
					if ep.TargetRef != nil && ep.TargetRef.Name == pod && (ep.Conditions.Ready == nil || *ep.Conditions.Ready) {
						ready = true
					}
				}
			}
			if !ready {
				break
			}
		}
		out <- time.Now()
	}()
	return out
}

// twoManagers waits for 2 ready manager replicas, and no other.
func (e *env) twoManagers() {
	e.t.Helper()
	e.eventually("2 ready manager replicas", 120*time.Second, func() bool {
		managers := &corev1.PodList{}
		if c.List(e.ctx, managers, client.InNamespace("layercache-system"), client.MatchingLabels{"control-plane": "controller-manager"}) != nil {
			return false
		}
		for _, p := range managers.Items {
			if p.DeletionTimestamp != nil || len(p.Status.ContainerStatuses) != 1 || !p.Status.ContainerStatuses[0].Ready {
				return false
			}
		}
		return len(managers.Items) == 2
	})
}

// killManager kills the processes of the manager pod's container with
// SIGKILL, as a crash would (every node shares this host's PID namespace).
func killManager(t *testing.T, pod string) {
	t.Helper()
	p := &corev1.Pod{}
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "layercache-system", Name: pod}, p); err != nil || len(p.Status.ContainerStatuses) == 0 {
		t.Fatalf("manager pod %s: %v", pod, err)
	}
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	procs, _ := filepath.Glob("/sys/fs/cgroup/*/k8s.io/" + id + "/cgroup.procs")
	if len(procs) == 0 {
		t.Fatalf("no cgroup for container %s of %s", id, pod)
	}
	data, err := os.ReadFile(procs[0])
	if err != nil || len(strings.Fields(string(data))) == 0 {
		t.Fatalf("processes of %s: %v", pod, err)
	}
	for _, pid := range strings.Fields(string(data)) {
		if out, err := exec.Command("kill", "-9", pid).CombinedOutput(); err != nil {
			t.Fatalf("kill -9 %s: %v %s", pid, err, out)
		}
	}
}
