package nodeagent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/testenv"
)

type nodeSuite struct {
	t      *testing.T
	ctx    context.Context
	c      client.Client
	store  *engine.Store
	dir    string
	driver *Driver
	maint  *Maintenance
	rec    record.EventRecorder
	cfg    *rest.Config
	// registry is the agent's registry client, if it has one.
	registry *registry.Client
}

func startNode(t *testing.T) *nodeSuite { return startNodeWith(t, func(*Options) {}) }

// startNodeWith starts node-a's agent with options changed by set.
func startNodeWith(t *testing.T, set func(*Options)) *nodeSuite {
	if os.Getenv("LAYERCACHE_TEST_LOG") != "" { // the reconcilers' logs, for debugging
		ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(true)))
	}
	store, dir := newStore(t)
	env := testenv.Start(t)
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}, Cache: CacheOptions("node-a"), Client: ClientOptions(),
		// go test -count=N starts this manager N times in one process.
		Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation},
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{NodeName: "node-a", Store: store, MaintenanceInterval: time.Hour, SizeCheckInterval: time.Hour, Reports: NewReports("node-a")}
	set(&opts)
	if err := Setup(mgr, opts); err != nil {
		t.Fatal(err)
	}
	ctx := testenv.RunManager(t, mgr)
	rec := mgr.GetEventRecorderFor("test")
	return &nodeSuite{t: t, ctx: ctx, c: env.Client, store: store, dir: dir, driver: &Driver{Store: store, NodeName: "node-a"}, rec: rec, cfg: env.Config,
		maint: &Maintenance{APIReader: env.Client, Client: env.Client, Recorder: rec, NodeName: "node-a", Store: store, Interval: time.Hour, OrphanGrace: time.Nanosecond,
			Reports: opts.Reports}}
}

func (s *nodeSuite) namespace() string {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "node-"}}
	if err := s.c.Create(s.ctx, ns); err != nil {
		s.t.Fatal(err)
	}
	return ns.Name
}

// pv creates a PV as the provisioner does.
func (s *nodeSuite) pv(name string, attrs map[string]string) *corev1.PersistentVolume {
	s.t.Helper()
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{v1alpha1.LabelNode: "node-a"},
			Finalizers: []string{v1alpha1.FinalizerNode}},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:    corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: v1alpha1.DriverName, VolumeHandle: name, VolumeAttributes: attrs}},
		},
	}
	if err := s.c.Create(s.ctx, pv); err != nil {
		s.t.Fatal(err)
	}
	return pv
}

// build publishes the volume as the kubelet would, writes files, and
// unpublishes it unless keep is set.
func (s *nodeSuite) build(pv *corev1.PersistentVolume, files map[string]string, keep bool) string {
	s.t.Helper()
	target := filepath.Join(s.dir, "pods", pv.Name)
	ctx := map[string]string{podUIDKey: pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrPodUID], podNamespaceKey: pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrNamespace], podNameKey: "build-" + pv.Name}
	for k, v := range pv.Spec.CSI.VolumeAttributes {
		ctx[k] = v
	}
	if _, err := s.driver.NodePublishVolume(s.ctx, &csi.NodePublishVolumeRequest{VolumeId: pv.Name, TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: ctx}); err != nil {
		s.t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(target, name), []byte(content), 0o644); err != nil {
			s.t.Fatal(err)
		}
	}
	if !keep {
		s.unpublish(pv, target)
	}
	return target
}

func (s *nodeSuite) unpublish(pv *corev1.PersistentVolume, target string) {
	if _, err := s.driver.NodeUnpublishVolume(s.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: pv.Name, TargetPath: target}); err != nil {
		s.t.Fatal(err)
	}
}

// release does what the manager and the PV controller do when the pod ends:
// a writable volume that may commit is granted first (the Cache and
// node-a's NodeCache exist, marked granted).
func (s *nodeSuite) release(pv *corev1.PersistentVolume, phase string, commitOnFailure bool) {
	s.t.Helper()
	a := pv.Spec.CSI.VolumeAttributes
	if a[v1alpha1.AttrWrite] == "true" && a[v1alpha1.AttrKind] == v1alpha1.KindCache &&
		(phase == "Succeeded" || phase == "Failed" && commitOnFailure) {
		grant(s.t, s.ctx, s.c, a[v1alpha1.AttrNamespace], a[v1alpha1.AttrCache], "node-a")
	}
	patch := client.MergeFrom(pv.DeepCopy())
	metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationPodPhase, phase)
	if commitOnFailure {
		metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationCommitOnFailure, "true")
	}
	if err := s.c.Patch(s.ctx, pv, patch); err != nil {
		s.t.Fatal(err)
	}
	pv.Status.Phase = corev1.VolumeReleased
	if err := s.c.Status().Update(s.ctx, pv); err != nil {
		s.t.Fatal(err)
	}
}

// updateCache changes a Cache's spec; the agent writes its status at any
// time, so a conflict is retried on a fresh copy.
func (s *nodeSuite) updateCache(ns, name string, change func(*v1alpha1.Cache)) {
	s.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		c := &v1alpha1.Cache{}
		if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: name}, c); err != nil {
			return err
		}
		change(c)
		return s.c.Update(s.ctx, c)
	})
	if err != nil {
		s.t.Fatal(err)
	}
}

func (s *nodeSuite) eventually(what string, cond func() bool) {
	s.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			s.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// pvGone waits until the agent has finished with the PV: its finalizer
// removed and the PV deleted. (envtest runs no controller-manager, so the
// API server's kubernetes.io/pv-protection finalizer stays; on a cluster
// the controller-manager removes it from a released PV at once.)
func (s *nodeSuite) pvGone(pv *corev1.PersistentVolume) {
	s.t.Helper()
	s.eventually("PV "+pv.Name+" to be finished and deleted", func() bool {
		got := &corev1.PersistentVolume{}
		err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), got)
		return apierrors.IsNotFound(err) || (err == nil && got.DeletionTimestamp != nil &&
			!slices.Contains(got.Finalizers, v1alpha1.FinalizerNode))
	})
}

// content mounts a fresh read volume of the cache and returns its files.
func (s *nodeSuite) content(key engine.Key) map[string]string {
	s.t.Helper()
	id := "view-" + strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "")
	if _, err := s.store.CreateVolume(id, key, engine.VolumeOptions{}); err != nil {
		s.t.Fatal(err)
	}
	mnt := filepath.Join(s.dir, id)
	if err := s.store.Mount(id, mnt); err != nil {
		s.t.Fatal(err)
	}
	out := map[string]string{}
	entries, _ := os.ReadDir(mnt)
	for _, e := range entries {
		b, _ := os.ReadFile(filepath.Join(mnt, e.Name()))
		out[e.Name()] = string(b)
	}
	s.store.Unmount(id)
	s.store.Discard(id)
	return out
}

// nodeCache waits for node-a's NodeCache of cache, with a status.
func (s *nodeSuite) nodeCache(ns, cache string) *v1alpha1.NodeCache {
	s.t.Helper()
	nc := &v1alpha1.NodeCache{}
	s.eventually("the NodeCache of "+cache, func() bool {
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName(cache, "node-a")}, nc) == nil && nc.Status.Generation > 0
	})
	return nc
}

func (s *nodeSuite) events(ns, name string) string {
	list := &corev1.EventList{}
	s.c.List(s.ctx, list, client.InNamespace(ns), client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("involvedObject.name", name)})
	var out []string
	for _, e := range list.Items {
		out = append(out, e.Reason+": "+e.Message)
	}
	return strings.Join(out, "\n")
}

func attrs(ns, cache string, write bool) map[string]string {
	w := "false"
	if write {
		w = "true"
	}
	return map[string]string{v1alpha1.AttrKind: "cache", v1alpha1.AttrNamespace: ns, v1alpha1.AttrCache: cache, v1alpha1.AttrWrite: w,
		v1alpha1.AttrPodUID: "uid-of-the-build-pod"}
}

func TestNodeAgentLifecycle(t *testing.T) {
	s := startNode(t)
	ns := s.namespace()
	key := engine.Key{Namespace: ns, Name: "example-project"}
	cache := &v1alpha1.Cache{}
	getCache := func() error { return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "example-project"}, cache) }

	t.Run("a succeeded writer is committed and the Cache reports the node", func(t *testing.T) {
		s.t = t
		pv := s.pv("pvc-1", attrs(ns, "example-project", true))
		target := s.build(pv, map[string]string{"a": "1"}, true)
		s.release(pv, "Succeeded", false)
		// Not while the kubelet still has it mounted.
		time.Sleep(1500 * time.Millisecond)
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), &corev1.PersistentVolume{}); err != nil {
			t.Fatalf("PV finished while still published: %v", err)
		}
		s.unpublish(pv, target)
		s.pvGone(pv)
		if got := s.content(key); got["a"] != "1" {
			t.Fatalf("cache content = %v", got)
		}
		nc := s.nodeCache(ns, "example-project")
		n := nc.Status
		if n.Node != "node-a" || n.Generation != 1 || n.LastCommitPod != ns+"/build-pvc-1" || n.Size.IsZero() || n.LastCommitTime == nil {
			t.Errorf("node entry = %+v", n)
		}
		if err := getCache(); err != nil {
			t.Fatalf("the Cache was not created: %v", err)
		}
		if !slices.Equal(nc.Finalizers, []string{v1alpha1.FinalizerNodeData}) || !metav1.IsControlledBy(nc, cache) ||
			nc.Labels[v1alpha1.LabelNode] != "node-a" || nc.Labels[v1alpha1.LabelCache] != "example-project" || nc.Spec.Node != "node-a" {
			t.Errorf("NodeCache = %+v", nc.ObjectMeta)
		}
		s.eventually("a Committed event", func() bool {
			return strings.Contains(s.events(ns, "example-project"), "Committed: Node node-a: generation 1")
		})
	})

	t.Run("failed, read-only and denied writes are discarded", func(t *testing.T) {
		s.t = t
		failed := s.pv("pvc-2", attrs(ns, "example-project", true))
		s.build(failed, map[string]string{"failed": "x"}, false)
		s.release(failed, "Failed", false)
		reader := s.pv("pvc-3", attrs(ns, "example-project", false))
		s.build(reader, map[string]string{"reader": "x"}, false)
		s.release(reader, "Succeeded", false)
		deleted := s.pv("pvc-4", attrs(ns, "example-project", true))
		s.build(deleted, map[string]string{"interrupted": "x"}, false)
		s.release(deleted, "Deleted", false)
		s.pvGone(failed)
		s.pvGone(reader)
		s.pvGone(deleted)
		if got := s.content(key); len(got) != 1 || got["a"] != "1" {
			t.Fatalf("cache content = %v, want only the first commit", got)
		}
		if vols, _ := s.store.Volumes(); len(vols) != 0 {
			t.Errorf("%d volume(s) left on disk", len(vols))
		}
	})

	t.Run("commit-on-failure commits a failed pod", func(t *testing.T) {
		s.t = t
		pv := s.pv("pvc-5", attrs(ns, "example-project", true))
		s.build(pv, map[string]string{"partial": "p"}, false)
		s.release(pv, "Failed", true)
		s.pvGone(pv)
		if got := s.content(key); got["partial"] != "p" || got["a"] != "1" {
			t.Fatalf("cache content = %v", got)
		}
	})

	t.Run("a read-only Cache takes no commit", func(t *testing.T) {
		s.t = t
		s.updateCache(ns, "example-project", func(c *v1alpha1.Cache) { c.Spec.ReadOnly = true })
		pv := s.pv("pvc-6", attrs(ns, "example-project", true))
		s.build(pv, map[string]string{"frozen": "x"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		if _, ok := s.content(key)["frozen"]; ok {
			t.Fatal("a read-only cache was committed to")
		}
		s.eventually("a CommitDenied event", func() bool { return strings.Contains(s.events(ns, "example-project"), "CommitDenied") })
		s.updateCache(ns, "example-project", func(c *v1alpha1.Cache) { c.Spec.ReadOnly = false })
	})

	t.Run("after a restart a finished commit is not committed again", func(t *testing.T) {
		s.t = t
		pv := s.pv("pvc-7", attrs(ns, "example-project", true))
		s.build(pv, map[string]string{"once": "1"}, false)
		// The agent committed, then died before deleting the PV.
		res, err := s.store.Commit(pv.Name)
		if err != nil {
			t.Fatal(err)
		}
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		info, _ := s.store.Inspect(key)
		if info.Head.Number != res.Generation {
			t.Fatalf("head = generation %d, want %d (committed once)", info.Head.Number, res.Generation)
		}
	})

	t.Run("a volume whose PV is gone is discarded, never committed", func(t *testing.T) {
		s.t = t
		if _, err := s.store.CreateVolume("pvc-gone", key, engine.VolumeOptions{Writable: true}); err != nil {
			t.Fatal(err)
		}
		s.maint.Pass(s.ctx)
		if _, err := s.store.Volume("pvc-gone"); err == nil {
			t.Fatal("an orphaned volume survived the sweep")
		}
	})

	t.Run("deleting the NodeCache deletes its data on the node", func(t *testing.T) {
		s.t = t
		nc := s.nodeCache(ns, "example-project")
		if err := s.c.Delete(s.ctx, nc); err != nil {
			t.Fatal(err)
		}
		s.eventually("the NodeCache to be gone", func() bool {
			return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), nc))
		})
		if _, err := s.store.Inspect(key); err == nil {
			t.Fatal("the cache's data is still on the node")
		}
	})

	t.Run("an idle cache is evicted after its ttl", func(t *testing.T) {
		s.t = t
		ttlKey := engine.Key{Namespace: ns, Name: "short-lived"}
		pv := s.pv("pvc-8", attrs(ns, "short-lived", true))
		s.build(pv, map[string]string{"x": "1"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		// The manager copies the Cache's ttl to its NodeCaches.
		nc := s.nodeCache(ns, "short-lived")
		patch := client.MergeFrom(nc.DeepCopy())
		nc.Spec.TTL = &metav1.Duration{Duration: time.Second}
		if err := s.c.Patch(s.ctx, nc, patch); err != nil {
			t.Fatal(err)
		}
		s.eventually("the eviction", func() bool {
			_, err := s.store.Inspect(ttlKey)
			return err != nil
		})
		s.eventually("the node's NodeCache to go", func() bool {
			return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), nc))
		})
		if ev := s.events(ns, "short-lived"); !strings.Contains(ev, "CacheEvicted") {
			t.Errorf("events = %s", ev)
		}
	})

	t.Run("above the disk budget the least recently used idle cache goes", func(t *testing.T) {
		s.t = t
		for i, name := range []string{"old-cache", "new-cache"} {
			pv := s.pv(fmt.Sprintf("pvc-b%d", i), attrs(ns, name, true))
			s.build(pv, map[string]string{"blob": strings.Repeat("x", 256<<10)}, false)
			s.release(pv, "Succeeded", false)
			s.pvGone(pv)
			time.Sleep(20 * time.Millisecond)
		}
		newKey := engine.Key{Namespace: ns, Name: "new-cache"}
		u, err := s.store.Usage(newKey)
		if err != nil {
			t.Fatal(err)
		}
		s.maint.DiskBudget = u.Bytes + 64<<10 // room for one of them
		s.maint.Pass(s.ctx)
		if _, err := s.store.Inspect(engine.Key{Namespace: ns, Name: "old-cache"}); err == nil {
			t.Error("the least recently used cache survived")
		}
		if _, err := s.store.Inspect(newKey); err != nil {
			t.Errorf("the newest cache was evicted: %v", err)
		}
		s.eventually("an eviction event", func() bool { return strings.Contains(s.events(ns, "old-cache"), "least recently used") })
	})

	t.Run("metrics count what happened", func(t *testing.T) {
		s.t = t
		for result, min := range map[string]float64{"committed": 3, "discarded": 2, "denied": 2} {
			if got := testutil.ToFloat64(commits.WithLabelValues(result)); got < min {
				t.Errorf("commits{result=%q} = %v, want at least %v", result, got, min)
			}
		}
		if got := testutil.ToFloat64(volumeStarts.WithLabelValues("warm")); got < 1 {
			t.Errorf("warm starts = %v", got)
		}
		if n := testutil.CollectAndCount(volumeSetupSeconds); n != 1 {
			t.Errorf("setup histogram series = %d", n)
		}
	})

	t.Run("a host directory is removed with its PV", func(t *testing.T) {
		s.t = t
		pv := s.pv("pvc-h", map[string]string{v1alpha1.AttrKind: "hostdir"})
		s.build(pv, map[string]string{"scratch": "x"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		if dirs, _ := s.store.HostDirs(); len(dirs) != 0 {
			t.Errorf("host dirs left: %v", dirs)
		}
	})
}

var skipNameValidation = true
