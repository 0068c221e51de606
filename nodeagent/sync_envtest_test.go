package nodeagent

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/registry/transfer"
	"github.com/layercache/layercache/internal/testenv"
)

// startNodeWithRegistry starts node-a's agent with a real registry.
func startNodeWithRegistry(t *testing.T) (*nodeSuite, *registry.Client, *testenv.Registry) {
	requireRoot(t)
	reg := testenv.StartRegistry(t)
	rc, err := registry.New(registry.Config{Prefix: reg.Addr + "/caches", Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	return startNodeWith(t, func(o *Options) { o.Registry = rc }), rc, reg
}

// A commit on node-a reaches node-b through a real registry: pulled when
// node-b sets up a volume, then prefetched in the background once node-b
// holds the cache. Deleting the Cache deletes its images.
func TestCachesFollowBuildsThroughTheRegistry(t *testing.T) {
	// The manager's side too: status.registry gathered and copied to the
	// NodeCaches; images deleted with the Cache.
	s, reg := startNodeAndManagerWithRegistry(t)
	rc := s.registry
	env := &testenv.Env{Config: s.cfg, Scheme: s.c.Scheme()}

	// node-b: its own agent, with its own store.
	storeB, dirB := newStore(t)
	mgrB, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache: CacheOptions("node-b"), Client: ClientOptions(), Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation}})
	if err != nil {
		t.Fatal(err)
	}
	reportsB := NewReports("node-b")
	if err := Setup(mgrB, Options{NodeName: "node-b", Store: storeB, MaintenanceInterval: time.Hour, SizeCheckInterval: time.Hour,
		Registry: rc, PullTimeout: 30 * time.Second, Reports: reportsB}); err != nil {
		t.Fatal(err)
	}
	testenv.RunManager(t, mgrB)
	syncB := &RegistrySyncer{Client: mgrB.GetClient(), Store: storeB, NodeName: "node-b", Registry: rc, Recorder: mgrB.GetEventRecorderFor("b"), Reports: reportsB, PullTimeout: 30 * time.Second}
	driverB := &Driver{Store: storeB, NodeName: "node-b", Sync: syncB}

	ns := s.namespace()
	key := engine.Key{Namespace: ns, Name: "go"}
	pv := s.pv("pvc-a1", attrs(ns, "go", true))
	s.build(pv, map[string]string{"f": "1"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	cache := &v1alpha1.Cache{}
	s.eventually("the push to reach the Cache's status", func() bool {
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "go"}, cache) == nil && cache.Status.Registry != nil
	})
	first := cache.Status.Registry
	if first.Node != "node-a" || first.Generation != 1 || !strings.HasPrefix(first.Image, reg.Addr+"/caches/"+ns+"/go@sha256:") {
		t.Fatalf("status.registry = %+v", first)
	}

	// node-b has nothing: its first volume pulls.
	target := filepath.Join(dirB, "pods", "pvc-b1")
	volCtx := attrs(ns, "go", false)
	if _, err := driverB.NodePublishVolume(s.ctx, &csi.NodePublishVolumeRequest{VolumeId: "pvc-b1", TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: volCtx}); err != nil {
		t.Fatal(err)
	}
	if got := readFiles(t, target); got["f"] != "1" {
		t.Fatalf("node-b's first volume sees %v", got)
	}
	if _, err := driverB.NodeUnpublishVolume(s.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-b1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if err := storeB.Discard("pvc-b1"); err != nil {
		t.Fatal(err)
	}
	ncB := &v1alpha1.NodeCache{}
	s.eventually("node-b's NodeCache", func() bool {
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("go", "node-b")}, ncB) == nil && ncB.Status.Generation > 0
	})

	// A second commit on node-a is prefetched on node-b, with no volume.
	pv = s.pv("pvc-a2", attrs(ns, "go", true))
	s.build(pv, map[string]string{"g": "2"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	s.eventually("node-b to prefetch the second commit", func() bool {
		info, err := storeB.Inspect(key)
		return err == nil && info.Head != nil && info.Head.Labels[transfer.LabelDigest] != "" &&
			info.Head.Labels[transfer.LabelDigest] != first.Digest()
	})
	suite := &nodeSuite{t: t, ctx: s.ctx, store: storeB, dir: dirB}
	if got := suite.content(key); got["f"] != "1" || got["g"] != "2" {
		t.Fatalf("node-b after the prefetch: %v", got)
	}
	if ev := s.events(ns, "go"); !strings.Contains(ev, ReasonPushed) || !strings.Contains(ev, "(prefetch") {
		t.Errorf("events lack a push or a prefetch:\n%s", ev)
	}

	// Deleting the Cache deletes its images.
	if err := s.c.Delete(s.ctx, cache); err != nil {
		t.Fatal(err)
	}
	s.eventually("the Cache to go", func() bool {
		return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(cache), cache))
	})
	if tags, err := rc.Tags(s.ctx, registry.Cache(key)); err != nil || len(tags) != 0 {
		t.Errorf("after the Cache's deletion the registry has tags %v (%v)", tags, err)
	}
}

// A registry that never answers holds a volume's setup for no longer than
// the pull budget; the build starts from what the node has, with a
// PullFailed event.
func TestSlowRegistryNeverHoldsABuild(t *testing.T) {
	requireRoot(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan []net.Conn)
	go func() { // accept, then say nothing
		var held []net.Conn
		for {
			c, err := l.Accept()
			if err != nil {
				done <- held
				return
			}
			held = append(held, c)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		for _, c := range <-done {
			c.Close()
		}
	})
	rc, err := registry.New(registry.Config{Prefix: l.Addr().String() + "/caches", Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	s := startNode(t)
	ns := s.namespace()
	cache := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "go"}}
	if err := s.c.Create(s.ctx, cache); err != nil {
		t.Fatal(err)
	}
	cache.Status.Registry = &v1alpha1.RegistryImage{
		Image:      l.Addr().String() + "/caches/" + ns + "/go@sha256:" + strings.Repeat("ab", 32),
		CommitTime: metav1.NewMicroTime(time.Now()),
	}
	if err := s.c.Status().Update(s.ctx, cache); err != nil {
		t.Fatal(err)
	}
	const budget = 2 * time.Second
	driver := &Driver{Store: s.store, NodeName: "node-a", Sync: &RegistrySyncer{Client: s.c, Store: s.store, NodeName: "node-a",
		Registry: rc, Recorder: s.rec, PullTimeout: budget}}
	target := filepath.Join(s.dir, "pods", "pvc-slow")
	start := time.Now()
	if _, err := driver.NodePublishVolume(s.ctx, &csi.NodePublishVolumeRequest{VolumeId: "pvc-slow", TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: attrs(ns, "go", false)}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took < budget || took > budget+5*time.Second {
		t.Errorf("the volume's setup took %s with a pull budget of %s", took, budget)
	}
	if got := readFiles(t, target); len(got) != 0 {
		t.Errorf("the volume is not empty: %v", got)
	}
	s.eventually("a PullFailed event", func() bool { return strings.Contains(s.events(ns, "go"), ReasonPullFailed) })
	if _, err := driver.NodeUnpublishVolume(s.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-slow", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Discard("pvc-slow"); err != nil {
		t.Fatal(err)
	}
}

// A NodeCache the manager made for a Cache that every node prefetches
// (spec.registry set, no data on the node) is kept, and the node brings
// the image down without any build.
func TestPrefetchOnANodeThatNeverHeldTheCache(t *testing.T) {
	s, rc, _ := startNodeWithRegistry(t)
	ns := s.namespace()
	key := engine.Key{Namespace: ns, Name: "everywhere"}

	// Another node's commit, pushed.
	other, dir := newStore(t)
	suite := &nodeSuite{t: t, ctx: s.ctx, store: other, dir: dir}
	id := "v-other"
	if _, err := other.CreateVolume(id, key, engine.VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := other.Mount(id, mnt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("from elsewhere"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := other.Unmount(id); err != nil {
		t.Fatal(err)
	}
	res, err := other.Commit(id)
	if err != nil {
		t.Fatal(err)
	}
	info, err := other.Inspect(key)
	if err != nil {
		t.Fatal(err)
	}
	p, err := transfer.Push(s.ctx, rc, other, key, *info.Head, "node-x")
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := rc.Repository(registry.Cache(key))
	img := &v1alpha1.RegistryImage{Image: repo.String() + "@" + p.Digest, Node: "node-x", Generation: res.Generation,
		CommitTime: metav1.NewMicroTime(info.Head.Committed())}

	cache := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "everywhere"},
		Spec: v1alpha1.CacheSpec{Prefetch: v1alpha1.PrefetchAllNodes}}
	if err := s.c.Create(s.ctx, cache); err != nil {
		t.Fatal(err)
	}
	nc := &v1alpha1.NodeCache{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.NodeCacheName("everywhere", "node-a"),
			Labels:     map[string]string{v1alpha1.LabelCache: "everywhere", v1alpha1.LabelNode: "node-a"},
			Finalizers: []string{v1alpha1.FinalizerNodeData}},
		Spec: v1alpha1.NodeCacheSpec{Cache: "everywhere", Node: "node-a", Registry: img},
	}
	if err := s.c.Create(s.ctx, nc); err != nil {
		t.Fatal(err)
	}
	got := s.nodeCache(ns, "everywhere") // waits for a status: the pull reported
	if got.Status.Generation < 1 {
		t.Fatalf("node-a's NodeCache: %+v", got.Status)
	}
	suite.store = s.store
	if files := suite.content(key); files["f"] != "from elsewhere" {
		t.Fatalf("node-a prefetched %v", files)
	}
}
