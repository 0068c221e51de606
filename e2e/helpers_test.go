//go:build e2e

// Package e2e checks layercache on the local cluster (make cluster-up,
// make deploy-local) through what a user sees: pod logs, Cache status,
// events. Run it with make test-e2e (make test does).
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

const (
	clusterState = "/var/lib/layercache-cluster"
	kubeconfig   = clusterState + "/admin.kubeconfig"
)

var (
	c  client.Client
	cs kubernetes.Interface
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("skipping the e2e suite: it needs root and the local cluster (make test-e2e)")
		os.Exit(0)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: no local cluster (%v): run make test-e2e\n", err)
		os.Exit(1)
	}
	scheme := runtime.NewScheme()
	clientgoscheme.AddToScheme(scheme)
	v1alpha1.AddToScheme(scheme)
	if c, err = client.New(cfg, client.Options{Scheme: scheme}); err == nil {
		cs, err = kubernetes.NewForConfig(cfg)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// env is one test's namespace, with a service account "builder" allowed to
// commit and "default" not.
type env struct {
	t   *testing.T
	ctx context.Context
	ns  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-"}}
	if err := c.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			(&env{t: t, ctx: ctx, ns: ns.Name}).keepEvidence()
		}
		c.Delete(context.Background(), ns)
	})
	e := &env{t: t, ctx: ctx, ns: ns.Name}
	e.create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "builder", Namespace: ns.Name}})
	e.create(&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "builder-commits", Namespace: ns.Name},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "layercache-cache-committer"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "builder", Namespace: ns.Name}}})
	e.eventually("the default ServiceAccount", 60*time.Second, func() bool {
		return c.Get(ctx, client.ObjectKey{Namespace: ns.Name, Name: "default"}, &corev1.ServiceAccount{}) == nil
	})
	return e
}

// keepEvidence writes, for a failed test, its namespace's events and the
// logs of layercache's pods into files (E2E_EVIDENCE, or a directory under
// the temporary one), and logs only where: the test's own failures stay
// the last lines of its output, where CI shows them.
func (e *env) keepEvidence() {
	dir := os.Getenv("E2E_EVIDENCE")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "layercache-e2e")
	}
	dir = filepath.Join(dir, strings.ReplaceAll(e.t.Name(), "/", "_"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		e.t.Logf("keeping the evidence: %v", err)
		return
	}
	files := map[string]string{"events-" + e.ns + ".txt": e.events("")}
	pods := &corev1.PodList{}
	if err := c.List(e.ctx, pods, client.InNamespace("layercache-system")); err != nil {
		e.t.Logf("keeping the evidence: %v", err)
	}
	for _, p := range pods.Items {
		out, err := kubectlCmd("-n", p.Namespace, "logs", p.Name, "--all-containers", "--timestamps").CombinedOutput()
		if err != nil {
			out = fmt.Appendf(out, "\n%v", err)
		}
		files[p.Name+".log"] = string(out)
	}
	// The kubelets' logs (the local cluster's): a volume the kubelet does
	// not unmount is told there.
	kubelets, _ := filepath.Glob(filepath.Join(clusterState, "logs", "*kubelet.log"))
	for _, f := range kubelets {
		if b, err := os.ReadFile(f); err == nil {
			files[filepath.Base(f)] = string(b)
		}
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			e.t.Logf("keeping the evidence: %v", err)
		}
	}
	e.t.Logf("the namespace's events and layercache's logs are in %s", dir)
}

// labelNamespace sets a label on the test's namespace.
func (e *env) labelNamespace(key, value string) {
	e.t.Helper()
	ns := &corev1.Namespace{}
	if err := c.Get(e.ctx, client.ObjectKey{Name: e.ns}, ns); err != nil {
		e.t.Fatal(err)
	}
	metav1.SetMetaDataLabel(&ns.ObjectMeta, key, value)
	if err := c.Update(e.ctx, ns); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) create(obj client.Object) {
	e.t.Helper()
	if err := c.Create(e.ctx, obj); err != nil {
		e.t.Fatalf("creating %T %s: %v", obj, obj.GetName(), err)
	}
}

func (e *env) eventually(what string, timeout time.Duration, cond func() bool) {
	e.t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(250 * time.Millisecond) {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// buildPod is a pod as a CI user writes it: labels, a script, busybox.
func buildPod(name, cache, trust, sa, script string, ann map[string]string) *corev1.Pod {
	labels := map[string]string{}
	if cache != "" {
		labels[v1alpha1.LabelCache] = cache
	}
	if trust != "" {
		labels[v1alpha1.LabelTrust] = trust
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Annotations: ann},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, RestartPolicy: corev1.RestartPolicyNever, TerminationGracePeriodSeconds: ptr(int64(2)),
			Containers: []corev1.Container{{Name: "build", Image: "localhost/busybox:dev", ImagePullPolicy: corev1.PullNever,
				Command: []string{"sh", "-c", script}}},
		},
	}
}

func ptr[T any](v T) *T { return &v }

// run creates the pod and waits until it ended; it returns its phase and log.
func (e *env) run(p *corev1.Pod) (corev1.PodPhase, string) {
	e.t.Helper()
	p.Namespace = e.ns
	e.create(p)
	return e.wait(p.Name)
}

func (e *env) wait(name string) (corev1.PodPhase, string) {
	e.t.Helper()
	p := &corev1.Pod{}
	e.eventually("pod "+name+" to end", 120*time.Second, func() bool {
		return c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: name}, p) == nil &&
			(p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed)
	})
	return p.Status.Phase, e.logs(name)
}

func (e *env) logs(name string) string {
	raw, err := cs.CoreV1().Pods(e.ns).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(e.ctx)
	if err != nil {
		e.t.Fatalf("logs of %s: %v", name, err)
	}
	return string(bytes.TrimSpace(raw))
}

// settled waits until the pod's claims are gone and their PVs finished: the
// commit (or discard) is done.
func (e *env) settled() {
	e.t.Helper()
	var left []string
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		if left = e.unreleased(); len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after 90s waiting for claims and volumes to be released; left:\n%s", strings.Join(left, "\n"))
		}
	}
}

// unreleased describes the test namespace's claims and the volumes bound
// to it that are still there: phase, deletion, finalizers, node.
func (e *env) unreleased() []string {
	pvcs := &corev1.PersistentVolumeClaimList{}
	pvs := &corev1.PersistentVolumeList{}
	if err := c.List(e.ctx, pvcs, client.InNamespace(e.ns)); err != nil {
		return []string{err.Error()}
	}
	if err := c.List(e.ctx, pvs); err != nil {
		return []string{err.Error()}
	}
	var left []string
	for _, pvc := range pvcs.Items {
		left = append(left, fmt.Sprintf("PVC %s: %s, deleting %v, finalizers %v", pvc.Name, pvc.Status.Phase,
			pvc.DeletionTimestamp != nil, pvc.Finalizers))
	}
	for _, pv := range pvs.Items {
		if pv.Spec.ClaimRef != nil && pv.Spec.ClaimRef.Namespace == e.ns {
			left = append(left, fmt.Sprintf("PV %s (claim %s, node %s): %s, deleting %v, finalizers %v, annotations %v",
				pv.Name, pv.Spec.ClaimRef.Name, pv.Labels[v1alpha1.LabelNode], pv.Status.Phase, pv.DeletionTimestamp != nil,
				pv.Finalizers, pv.Annotations))
		}
	}
	return left
}

// generation is the cache's head generation on the node (0 if none).
func (e *env) generation(cache string) int64 {
	ca := &v1alpha1.Cache{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: cache}, ca); err != nil || len(ca.Status.Nodes) == 0 {
		return 0
	}
	return ca.Status.Nodes[0].Generation
}

// listCache prints a build's /cache files, sorted, as "name=content" lines.
const listCache = `cd /cache && for f in $(ls | sort); do echo "$f=$(cat $f)"; done`

// read runs a reader pod that prints the cache's files, sorted, as
// "name=content" lines.
func (e *env) read(cache, name string) string {
	e.t.Helper()
	phase, out := e.run(buildPod(name, cache, "read", "", listCache, nil))
	if phase != corev1.PodSucceeded {
		e.t.Fatalf("reader %s: %s: %s", name, phase, out)
	}
	e.settled()
	return out
}

// nodeOf is the node the pod ran on.
func (e *env) nodeOf(pod string) string {
	e.t.Helper()
	p := &corev1.Pod{}
	if err := c.Get(e.ctx, client.ObjectKey{Namespace: e.ns, Name: pod}, p); err != nil {
		e.t.Fatal(err)
	}
	return p.Spec.NodeName
}

// storeDir is where node keeps its caches, seen from this host: node 1 is
// the host; node K (2..9) of the local cluster keeps its own directories
// in its mount namespace, below the cluster's state (hack/cluster/node.sh).
func storeDir(node string) string {
	if len(node) == 5 && strings.HasPrefix(node, "node") && node[4] >= '2' && node[4] <= '9' {
		return filepath.Join(clusterState, "nodes", node, "fs", "layercache")
	}
	return "/var/lib/layercache"
}

// agentOn is the node agent's pod on node.
func (e *env) agentOn(node string) *corev1.Pod {
	e.t.Helper()
	agents := &corev1.PodList{}
	if err := c.List(e.ctx, agents, client.InNamespace("layercache-system"),
		client.MatchingLabels{"app.kubernetes.io/component": "node-agent"}); err != nil {
		e.t.Fatal(err)
	}
	for i := range agents.Items {
		if agents.Items[i].Spec.NodeName == node {
			return &agents.Items[i]
		}
	}
	e.t.Fatalf("no node agent on %s", node)
	return nil
}

// on pins a pod to node.
func on(node string, p *corev1.Pod) *corev1.Pod {
	p.Spec.NodeSelector = map[string]string{corev1.LabelHostname: node}
	return p
}

// nodeNames lists the cluster's nodes, sorted.
func (e *env) nodeNames() []string {
	e.t.Helper()
	nodes := &corev1.NodeList{}
	if err := c.List(e.ctx, nodes); err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, n := range nodes.Items {
		out = append(out, n.Name)
	}
	slices.Sort(out)
	return out
}

func (e *env) events(object string) string {
	list := &corev1.EventList{}
	opts := []client.ListOption{client.InNamespace(e.ns)}
	if object != "" {
		opts = append(opts, client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("involvedObject.name", object)})
	}
	c.List(e.ctx, list, opts...)
	var out []string
	for _, ev := range list.Items {
		out = append(out, ev.InvolvedObject.Name+" "+ev.Reason+": "+ev.Message)
	}
	return strings.Join(out, "\n")
}
