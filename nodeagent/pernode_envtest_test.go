package nodeagent

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/testenv"
)

type countingReconciler struct {
	reconcile.Reconciler
	calls atomic.Int64
}

func (c *countingReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	c.calls.Add(1)
	return c.Reconciler.Reconcile(ctx, req)
}

// A commit on node-a, and everything it writes (the Cache, node-a's
// NodeCache and its status), wakes no reconciler of node-b's agent: each
// agent caches and reconciles only its own node's objects.
func TestOneNodesCommitWakesNoOtherNode(t *testing.T) {
	s := startNode(t) // node-a, the whole agent
	storeB, _ := newStore(t)
	env := &testenv.Env{Config: s.cfg, Scheme: s.c.Scheme()}
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache: CacheOptions("node-b"), Client: ClientOptions(),
		Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := &countingReconciler{Reconciler: &NodeCacheReconciler{Client: mgr.GetClient(), Store: storeB, NodeName: "node-b", Recorder: mgr.GetEventRecorderFor("b")}}
	if err := ctrl.NewControllerManagedBy(mgr).Named("nodecache").For(&v1alpha1.NodeCache{}).Complete(b); err != nil {
		t.Fatal(err)
	}
	testenv.RunManager(t, mgr)
	if !mgr.GetCache().WaitForCacheSync(s.ctx) {
		t.Fatal("node-b's cache did not sync")
	}

	ns := s.namespace()
	for i, name := range []string{"pvc-w1", "pvc-w2"} {
		pv := s.pv(name, attrs(ns, "busy", true))
		s.build(pv, map[string]string{"f": string(rune('a' + i))}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
	}
	// The report follows the commit (the NodeCache reconciler is enqueued).
	s.eventually("node-a's NodeCache to report generation 2", func() bool {
		nc := &v1alpha1.NodeCache{}
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("busy", "node-a")}, nc) == nil && nc.Status.Generation == 2
	})
	if n := b.calls.Load(); n != 0 {
		t.Fatalf("node-b's reconciler ran %d time(s) for node-a's commits", n)
	}

	// It does wake for its own node's objects (the count can move).
	own := &v1alpha1.NodeCache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.NodeCacheName("busy", "node-b"),
		Labels: map[string]string{v1alpha1.LabelNode: "node-b", v1alpha1.LabelCache: "busy"}},
		Spec: v1alpha1.NodeCacheSpec{Cache: "busy", Node: "node-b"}}
	if err := s.c.Create(s.ctx, own); err != nil {
		t.Fatal(err)
	}
	s.eventually("node-b to reconcile its own NodeCache", func() bool { return b.calls.Load() > 0 })
	// It holds none of the data: it withdraws the NodeCache.
	s.eventually("node-b's empty NodeCache to go", func() bool {
		return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(own), own))
	})
}

// A node deleted from the cluster and registered again (a new Node UID)
// forgets the caches it held: they may have been deleted meanwhile.
func TestReplacedNodeForgetsItsCaches(t *testing.T) {
	s := startNode(t)
	ns := s.namespace()
	pv := s.pv("pvc-old", attrs(ns, "stale", true))
	s.build(pv, map[string]string{"f": "1"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	key := engine.Key{Namespace: ns, Name: "stale"}
	if _, err := s.store.Inspect(key); err != nil {
		t.Fatal(err)
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}
	if err := s.c.Create(s.ctx, node); err != nil {
		t.Fatal(err)
	}
	// First start with this store: it records the node, keeps the data.
	if err := s.maint.ForgetIfReplaced(s.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Inspect(key); err != nil {
		t.Fatalf("the first start forgot a cache: %v", err)
	}
	// The Node is deleted and registers again.
	if err := s.c.Delete(s.ctx, node); err != nil {
		t.Fatal(err)
	}
	s.eventually("the Node to go", func() bool { return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(node), node)) })
	again := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}
	if err := s.c.Create(s.ctx, again); err != nil {
		t.Fatal(err)
	}
	if err := s.maint.ForgetIfReplaced(s.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Inspect(key); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("the replaced node kept its stale cache: %v", err)
	}
	if owner, _ := s.store.Owner(); owner != string(again.UID) {
		t.Errorf("owner = %q, want %q", owner, again.UID)
	}
}

// A node agent's informers hold its own node's NodeCaches, never another
// node's, and no object's managedFields.
func TestTheAgentsCacheIsLean(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "lean"}}); err != nil {
		t.Fatal(err)
	}
	nodeCache := func(node string) *v1alpha1.NodeCache {
		return &v1alpha1.NodeCache{ObjectMeta: metav1.ObjectMeta{Namespace: "lean", Name: v1alpha1.NodeCacheName("main", node),
			Labels: map[string]string{v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node)}},
			Spec: v1alpha1.NodeCacheSpec{Cache: "main", Node: node}}
	}
	own, other := nodeCache("node-a"), nodeCache("node-b")
	for _, nc := range []*v1alpha1.NodeCache{own, other} {
		if err := env.Client.Create(ctx, nc); err != nil {
			t.Fatal(err)
		}
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(nc), nc); err != nil || len(nc.ManagedFields) == 0 {
			t.Fatalf("the API server has no managedFields for %s (%v)", nc.Name, err)
		}
	}
	if !env.CachedCopy(t, CacheOptions("node-a"), own) {
		t.Fatalf("node-a's cache does not hold its NodeCache %s", own.Name)
	}
	if n := len(own.ManagedFields); n > 0 {
		t.Errorf("node-a's cache holds %s with %d managedFields entries", own.Name, n)
	}
	if env.CachedCopy(t, CacheOptions("node-a"), other) {
		t.Errorf("node-a's cache holds node-b's NodeCache %s", other.Name)
	}
}
