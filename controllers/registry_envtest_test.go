package controllers_test

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/controllers"
	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/testenv"
)

// The newest pushed image (by commit time, whichever node pushed it)
// becomes the Cache's status.registry and every NodeCache's
// spec.registry; a Cache that asks for it gets a NodeCache, holding the
// image, on every node, a node that joins later included.
func TestNewestImageAndPrefetchOnAllNodes(t *testing.T) {
	rc, err := registry.New(registry.Config{Prefix: "127.0.0.1:1/caches", Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	s := startWith(t, controllers.Options{Registry: rc})
	ns := s.namespace()
	c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "everywhere"},
		Spec: v1alpha1.CacheSpec{Prefetch: v1alpha1.PrefetchAllNodes}}
	s.create(c)
	t1 := time.Date(2026, 1, 1, 10, 0, 0, 123456000, time.UTC)
	image := func(node, hex string, at time.Time) *v1alpha1.RegistryImage {
		return &v1alpha1.RegistryImage{Image: "127.0.0.1:1/caches/" + ns + "/everywhere@sha256:" + hex, Node: node,
			Generation: 1, CommitTime: metav1.NewMicroTime(at)}
	}
	pushedA := image("node-a", "aa", t1)
	s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 1, Pushed: pushedA})

	registryOf := func() *v1alpha1.RegistryImage {
		got := &v1alpha1.Cache{}
		if s.c.Get(s.ctx, client.ObjectKeyFromObject(c), got) != nil {
			return nil
		}
		return got.Status.Registry
	}
	specOf := func(node string) *v1alpha1.RegistryImage {
		nc := &v1alpha1.NodeCache{}
		if s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", node)}, nc) != nil {
			return nil
		}
		return nc.Spec.Registry
	}
	s.eventually("node-a's push to be the Cache's image", func() bool {
		r := registryOf()
		return r != nil && r.Image == pushedA.Image && r.CommitTime.Equal(&pushedA.CommitTime)
	})
	s.eventually("node-a's NodeCache to name the image", func() bool { r := specOf("node-a"); return r != nil && r.Image == pushedA.Image })

	// A node that joins, once its agent registers, gets a NodeCache holding
	// the image, for its agent to pull.
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}})
	s.csiNode("node-b", v1alpha1.DriverName)
	s.eventually("a NodeCache on the new node", func() bool { r := specOf("node-b"); return r != nil && r.Image == pushedA.Image })
	ncB := &v1alpha1.NodeCache{}
	if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", "node-b")}, ncB); err != nil {
		t.Fatal(err)
	}
	if ncB.Labels[v1alpha1.LabelNode] != "node-b" || len(ncB.Finalizers) != 1 || ncB.Finalizers[0] != v1alpha1.FinalizerNodeData ||
		len(ncB.OwnerReferences) != 1 || ncB.OwnerReferences[0].Name != "everywhere" {
		t.Errorf("node-b's NodeCache: %+v", ncB.ObjectMeta)
	}

	// A newer commit pushed by node-b (once granted one) wins, and reaches
	// node-a; an older one pushed later does not.
	before := ncB.DeepCopy()
	ncB.Spec.CommitGranted = &metav1.Time{Time: time.Now()}
	if err := s.c.Patch(s.ctx, ncB, client.MergeFrom(before)); err != nil {
		t.Fatal(err)
	}
	before = ncB.DeepCopy()
	ncB.Status = v1alpha1.NodeCacheStatus{Node: "node-b", Generation: 1, Layers: 1, Size: resource.MustParse("1Mi"),
		Pushed: image("node-b", "bb", t1.Add(time.Second))}
	if err := s.c.Status().Patch(s.ctx, ncB, client.MergeFrom(before)); err != nil {
		t.Fatal(err)
	}
	s.eventually("node-b's newer push to reach node-a", func() bool {
		r := specOf("node-a")
		return r != nil && r.Node == "node-b" && registryOf().Node == "node-b"
	})
	ncA := &v1alpha1.NodeCache{}
	if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", "node-a")}, ncA); err != nil {
		t.Fatal(err)
	}
	before = ncA.DeepCopy()
	ncA.Status.Pushed = image("node-a", "cc", t1.Add(-time.Hour))
	if err := s.c.Status().Patch(s.ctx, ncA, client.MergeFrom(before)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // the reconcile that follows the patch
	if r := registryOf(); r == nil || r.Node != "node-b" {
		t.Errorf("an older commit replaced the newest image: %+v", r)
	}
}

// csiNode registers the node agent's CSI driver on node, as the kubelet
// does when the agent's plugin registers.
func (s *suite) csiNode(node string, drivers ...string) {
	s.t.Helper()
	cn := &storagev1.CSINode{ObjectMeta: metav1.ObjectMeta{Name: node}}
	for _, d := range drivers {
		cn.Spec.Drivers = append(cn.Spec.Drivers, storagev1.CSINodeDriver{Name: d, NodeID: node})
	}
	s.create(cn)
}

// prefetch: AllNodes gives a NodeCache only to nodes that run the node
// agent (their CSINode lists the layercache.io driver): nodes outside the
// agent's node selector, Windows or virtual-kubelet nodes get none, so
// deleting the Cache never waits for an agent that does not exist. Before,
// every Node got one, with the agent's finalizer, and the deletion hung.
func TestPrefetchOnlyOnNodesWithTheAgent(t *testing.T) {
	reg := testenv.StartRegistry(t) // deleting the Cache deletes its images
	rc, err := registry.New(registry.Config{Prefix: reg.Addr + "/caches", Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	s := startWith(t, controllers.Options{Registry: rc})
	ns := s.namespace()
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "no-agent-" + ns}})
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "other-driver-" + ns}})
	s.csiNode("other-driver-"+ns, "ebs.csi.aws.com")
	c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "everywhere"},
		Spec: v1alpha1.CacheSpec{Prefetch: v1alpha1.PrefetchAllNodes}}
	s.create(c)
	pushed := &v1alpha1.RegistryImage{Image: reg.Addr + "/caches/" + ns + "/everywhere@sha256:aa", Node: "node-a",
		Generation: 1, CommitTime: metav1.NewMicroTime(time.Now())}
	s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 1, Pushed: pushed})
	// A node with the agent, for comparison: it gets one.
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "agent-" + ns}})
	s.csiNode("agent-"+ns, v1alpha1.DriverName)
	has := func(node string) bool {
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", node)}, &v1alpha1.NodeCache{}) == nil
	}
	s.eventually("a NodeCache on the node with the agent", func() bool { return has("agent-" + ns) })
	for _, node := range []string{"no-agent-" + ns, "other-driver-" + ns} {
		if has(node) {
			t.Errorf("node %s, which runs no agent, got a NodeCache", node)
		}
	}

	// Deleting the Cache completes once the agents let go: here nobody
	// plays node-a's and the agent node's part, so the test does.
	if err := s.c.Delete(s.ctx, c); err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node-a", "agent-" + ns} {
		nc := &v1alpha1.NodeCache{}
		if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", node)}, nc); err == nil {
			if _, err := finalizers.Remove(s.ctx, s.c, nc, v1alpha1.FinalizerNodeData); err != nil {
				t.Fatal(err)
			}
		}
	}
	s.eventually("the Cache's deletion to complete", func() bool {
		return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(c), &v1alpha1.Cache{}))
	})
}

// The registry pointer every node pulls takes no NodeCache's word
// unchecked. On main, each of the refused reports below became the Cache's
// image, and the one dated an hour ahead then pinned it: a newer commit
// never replaced it.
func TestRegistryPointerIsChecked(t *testing.T) {
	rc, err := registry.New(registry.Config{Prefix: "127.0.0.1:1/caches", Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	s := startWith(t, controllers.Options{Registry: rc})
	ns := s.namespace()
	c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pinned"}}
	s.create(c)
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-fast"}})
	now := time.Now()
	image := func(repo, node, hex string, at time.Time) *v1alpha1.RegistryImage {
		return &v1alpha1.RegistryImage{Image: "127.0.0.1:1/caches/" + repo + "@sha256:" + hex, Node: node,
			Generation: 1, CommitTime: metav1.NewMicroTime(at)}
	}
	registryOf := func() *v1alpha1.RegistryImage {
		got := &v1alpha1.Cache{}
		if s.c.Get(s.ctx, client.ObjectKeyFromObject(c), got) != nil {
			return nil
		}
		return got.Status.Registry
	}
	nodesOf := func() []v1alpha1.NodeCacheStatus {
		got := &v1alpha1.Cache{}
		_ = s.c.Get(s.ctx, client.ObjectKeyFromObject(c), got)
		return got.Status.Nodes
	}
	report := func(nc *v1alpha1.NodeCache, p *v1alpha1.RegistryImage) {
		t.Helper()
		got := &v1alpha1.NodeCache{}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), got); err != nil {
			t.Fatal(err)
		}
		before := got.DeepCopy()
		got.Status.Pushed = p
		if err := s.c.Status().Patch(s.ctx, got, client.MergeFrom(before)); err != nil {
			t.Fatal(err)
		}
	}
	refused := func(what, message string) {
		t.Helper()
		s.eventually(what, func() bool { return strings.Contains(s.events(ns, "pinned"), message) })
	}
	good := image(ns+"/pinned", "node-a", "a1", now.Add(-time.Minute))
	past := metav1.NewTime(now.Add(-time.Minute))
	ncA := s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 1, LastCommitTime: &past, Pushed: good})
	s.eventually("node-a's push to be the image", func() bool { r := registryOf(); return r != nil && r.Image == good.Image })

	// A fast clock: dated an hour ahead. Not adopted, and not preferred.
	ahead := metav1.NewTime(now.Add(time.Hour))
	ncFast := s.nodeCache(c, "node-fast", v1alpha1.NodeCacheStatus{Generation: 1, LastCommitTime: &ahead,
		Pushed: image(ns+"/pinned", "node-fast", "f1", now.Add(time.Hour))})
	refused("the fast node's report refused", "ahead of the manager's clock")
	s.eventually("both nodes in the status", func() bool { return len(nodesOf()) == 2 })
	if nodes := nodesOf(); nodes[0].Node != "node-a" {
		t.Errorf("the fast node is preferred: %+v", nodes)
	}
	// Another repository; another node's push. (A NodeCache of a node that
	// does not exist is deleted by the Node reconciler.)
	report(ncA, image("other/pinned", "node-a", "c1", now))
	refused("the other repository's image refused", "is not in the cache's repository")
	report(ncFast, image(ns+"/pinned", "node-a", "d1", now))
	refused("another node's push refused", "pushed by node node-a, not by its own node node-fast")
	if r := registryOf(); r == nil || r.Image != good.Image {
		t.Fatalf("a refused report became the image: %+v", r)
	}
	// A node the manager never let commit the cache.
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-ungranted"}})
	ncU := s.nodeCache(c, "node-ungranted", v1alpha1.NodeCacheStatus{Generation: 1})
	ungrant := ncU.DeepCopy()
	ungrant.Spec.CommitGranted = nil
	if err := s.c.Patch(s.ctx, ungrant, client.MergeFrom(ncU)); err != nil {
		t.Fatal(err)
	}
	report(ncU, image(ns+"/pinned", "node-ungranted", "b1", now))
	refused("the ungranted node's push refused", "the manager never let node node-ungranted commit the cache")
	if r := registryOf(); r == nil || r.Image != good.Image {
		t.Fatalf("a refused report became the image: %+v", r)
	}
	// A newer commit, rightly reported, still replaces it.
	newer := image(ns+"/pinned", "node-a", "e1", now.Add(time.Second))
	report(ncA, newer)
	s.eventually("the newer commit to be the image", func() bool { r := registryOf(); return r != nil && r.Image == newer.Image })
}
