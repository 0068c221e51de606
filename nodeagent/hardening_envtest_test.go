package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/testenv"
)

func TestSizesAreEnforced(t *testing.T) {
	s := startNode(t)
	ns := s.namespace()
	if err := s.c.Create(s.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: ns}}); err != nil {
		t.Fatal(err)
	}

	t.Run("a commit over the Cache's maxSize is refused and names both sizes", func(t *testing.T) {
		s.t = t
		key := engine.Key{Namespace: ns, Name: "bounded"}
		pv := s.pv("pvc-m1", attrs(ns, "bounded", true))
		s.build(pv, map[string]string{"small": "s"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		s.eventually("the Cache", func() bool {
			return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "bounded"}, &v1alpha1.Cache{}) == nil
		})
		max := resource.MustParse("64Ki")
		s.updateCache(ns, "bounded", func(c *v1alpha1.Cache) { c.Spec.MaxSize = &max })
		pv = s.pv("pvc-m2", attrs(ns, "bounded", true))
		s.build(pv, map[string]string{"big": strings.Repeat("x", 256<<10)}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		if got := s.content(key); len(got) != 1 || got["small"] != "s" {
			t.Fatalf("cache content = %v, want the first commit only", got)
		}
		s.eventually("a CommitRefused event naming both sizes", func() bool {
			ev := s.events(ns, "bounded")
			return strings.Contains(ev, "CommitRefused") && strings.Contains(ev, "more than its spec.maxSize 64Ki") &&
				strings.Contains(ev, "the cache would be ")
		})
		if vols, _ := s.store.Volumes(); len(vols) != 0 {
			t.Errorf("%d volume(s) left on disk", len(vols))
		}
	})

	t.Run("a volume over its size is reported on its PV and never committed", func(t *testing.T) {
		s.t = t
		key := engine.Key{Namespace: ns, Name: "sized"}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "greedy", Namespace: ns},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "build", Image: "busybox"}}}}
		neighbour := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "modest", Namespace: ns},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "build", Image: "busybox"}}}}
		for _, p := range []*corev1.Pod{pod, neighbour} {
			if err := s.c.Create(s.ctx, p); err != nil {
				t.Fatal(err)
			}
		}
		greedyAttrs, modestAttrs := attrs(ns, "sized", true), attrs(ns, "sized", true)
		greedyAttrs[v1alpha1.AttrPodUID], modestAttrs[v1alpha1.AttrPodUID] = string(pod.UID), string(neighbour.UID)
		greedy, modest := s.pv("pvc-s1", greedyAttrs), s.pv("pvc-s2", modestAttrs)
		for _, pv := range []*corev1.PersistentVolume{greedy, modest} {
			patch := client.MergeFrom(pv.DeepCopy())
			pv.Spec.Capacity[corev1.ResourceStorage] = resource.MustParse("1Mi")
			if err := s.c.Patch(s.ctx, pv, patch); err != nil {
				t.Fatal(err)
			}
		}
		greedyTarget := s.publishFor(greedy, pod)
		modestTarget := s.publishFor(modest, neighbour)
		// Writes past the size; the neighbour stays within its own.
		if err := os.WriteFile(filepath.Join(greedyTarget, "huge"), make([]byte, 2<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(modestTarget, "fits"), make([]byte, 256<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		limiter := &SizeLimiter{Client: s.c, Store: s.store, Recorder: s.rec}
		if err := limiter.Check(s.ctx); err != nil {
			t.Fatal(err)
		}
		// The agent tells the manager on the PV (it may not touch pods).
		overLimit := func(pv *corev1.PersistentVolume) string {
			got := &corev1.PersistentVolume{}
			if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), got); err != nil {
				t.Fatal(err)
			}
			return got.Annotations[v1alpha1.AnnotationOverLimit]
		}
		if got := overLimit(greedy); !strings.Contains(got, "more than its size 1Mi") {
			t.Errorf("the greedy volume's PV says %q, want it over its size", got)
		}
		if got := overLimit(modest); got != "" {
			t.Errorf("the neighbour's PV says %q, want nothing", got)
		}
		// Its writes are refused from now on; the neighbour's are not.
		if err := os.WriteFile(filepath.Join(greedyTarget, "more"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("writing to the volume over its size: %v, want EROFS", err)
		}
		if err := os.WriteFile(filepath.Join(modestTarget, "more"), []byte("x"), 0o644); err != nil {
			t.Errorf("writing to the neighbour: %v", err)
		}
		// A second check writes nothing more.
		if err := limiter.Check(s.ctx); err != nil {
			t.Fatal(err)
		}
		// Even if its pod reports success, the greedy volume is discarded.
		s.unpublish(greedy, greedyTarget)
		s.unpublish(modest, modestTarget)
		s.release(greedy, "Succeeded", false)
		s.release(modest, "Succeeded", false)
		s.pvGone(greedy)
		s.pvGone(modest)
		got := s.content(key)
		if _, ok := got["huge"]; ok {
			t.Fatal("the writes of a volume over its size were committed")
		}
		if _, ok := got["fits"]; !ok {
			t.Fatalf("the neighbour's writes were not committed: %v", got)
		}
	})

	// On main, host directories were never measured.
	t.Run("a host directory over its size is reported on its PV", func(t *testing.T) {
		s.t = t
		pv := s.pv("pvc-hd1", map[string]string{v1alpha1.AttrKind: v1alpha1.KindHostDir})
		patch := client.MergeFrom(pv.DeepCopy())
		pv.Spec.Capacity[corev1.ResourceStorage] = resource.MustParse("1Mi")
		if err := s.c.Patch(s.ctx, pv, patch); err != nil {
			t.Fatal(err)
		}
		target := s.build(pv, map[string]string{"huge": strings.Repeat("x", 2<<20)}, true)
		limiter := &SizeLimiter{Client: s.c, Store: s.store, Recorder: s.rec}
		if err := limiter.Check(s.ctx); err != nil {
			t.Fatal(err)
		}
		got := &corev1.PersistentVolume{}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), got); err != nil {
			t.Fatal(err)
		}
		if why := got.Annotations[v1alpha1.AnnotationOverLimit]; !strings.Contains(why, "volume pvc-hd1 holds ") || !strings.Contains(why, "more than its size 1Mi") {
			t.Errorf("the host directory's PV says %q, want it over its size", why)
		}
		if err := os.WriteFile(filepath.Join(target, "more"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("writing to the host directory over its size: %v, want EROFS", err)
		}
		s.unpublish(pv, target)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
	})

	// The last writes may come after the last periodic check: on main, a
	// build that outgrew its size just before it ended was committed.
	t.Run("a volume over its size at commit is never committed", func(t *testing.T) {
		s.t = t
		key := engine.Key{Namespace: ns, Name: "late"}
		pv := s.pv("pvc-l1", attrs(ns, "late", true))
		patch := client.MergeFrom(pv.DeepCopy())
		pv.Spec.Capacity[corev1.ResourceStorage] = resource.MustParse("1Mi")
		if err := s.c.Patch(s.ctx, pv, patch); err != nil {
			t.Fatal(err)
		}
		s.build(pv, map[string]string{"huge": strings.Repeat("x", 2<<20)}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		if got := s.content(key); len(got) != 0 {
			t.Fatalf("the writes of a volume over its size were committed: %v", len(got))
		}
		s.eventually("a CommitRefused event naming the size", func() bool {
			ev := s.events(ns, "late")
			return strings.Contains(ev, "CommitRefused") && strings.Contains(ev, "more than its size 1Mi")
		})
	})

	// Empty files take no blocks: on main, 200 of them in a volume bounded
	// to 100 inodes went unnoticed.
	t.Run("a volume over the node's inode bound is reported on its PV and never committed", func(t *testing.T) {
		s.t = t
		key := engine.Key{Namespace: ns, Name: "inodes"}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "many-files", Namespace: ns},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "build", Image: "busybox"}}}}
		if err := s.c.Create(s.ctx, pod); err != nil {
			t.Fatal(err)
		}
		a := attrs(ns, "inodes", true)
		a[v1alpha1.AttrPodUID] = string(pod.UID)
		pv := s.pv("pvc-i1", a)
		target := s.publishFor(pv, pod)
		for i := range 200 {
			if err := os.WriteFile(filepath.Join(target, fmt.Sprintf("empty-%d", i)), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		limiter := &SizeLimiter{Client: s.c, Store: s.store, Recorder: s.rec, MaxInodes: 100}
		if err := limiter.Check(s.ctx); err != nil {
			t.Fatal(err)
		}
		got := &corev1.PersistentVolume{}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), got); err != nil {
			t.Fatal(err)
		}
		if why := got.Annotations[v1alpha1.AnnotationOverLimit]; !strings.Contains(why, "holds 201 files and directories, more than the node's bound 100") {
			t.Errorf("the PV says %q, want the inode bound named", why)
		}
		// A pod's own bound (layercache.io/max-inodes) is lower: it wins.
		a2 := attrs(ns, "inodes", true)
		a2[v1alpha1.AttrMaxInodes] = "50"
		pv2 := s.pv("pvc-i2", a2)
		target2 := s.publishFor(pv2, pod)
		for i := range 60 {
			if err := os.WriteFile(filepath.Join(target2, fmt.Sprintf("empty-%d", i)), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := limiter.Check(s.ctx); err != nil {
			t.Fatal(err)
		}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv2), got); err != nil {
			t.Fatal(err)
		}
		if why := got.Annotations[v1alpha1.AnnotationOverLimit]; !strings.Contains(why, "holds 61 files and directories, more than its bound 50 (layercache.io/max-inodes)") {
			t.Errorf("the PV says %q, want the pod's inode bound named", why)
		}
		s.unpublish(pv2, target2)
		s.release(pv2, "Succeeded", false)
		s.pvGone(pv2)
		s.unpublish(pv, target)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		if got := s.content(key); len(got) != 0 {
			t.Fatalf("the writes of a volume over its inode bound were committed: %d files", len(got))
		}
	})
}

// publishFor publishes pv for pod, as the kubelet does, and returns the
// target.
func (s *nodeSuite) publishFor(pv *corev1.PersistentVolume, pod *corev1.Pod) string {
	s.t.Helper()
	pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrPodUID] = string(pod.UID)
	target := filepath.Join(s.dir, "pods", pv.Name)
	vctx := map[string]string{podUIDKey: string(pod.UID), podNamespaceKey: pod.Namespace, podNameKey: pod.Name}
	for k, v := range pv.Spec.CSI.VolumeAttributes {
		vctx[k] = v
	}
	if _, err := s.driver.NodePublishVolume(s.ctx, &csi.NodePublishVolumeRequest{VolumeId: pv.Name, TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: vctx}); err != nil {
		s.t.Fatal(err)
	}
	return target
}

// If reporting a commit fails, it is retried: the NodeCache reconciler,
// the only writer of NodeCache status, returns the error (the controller
// retries it); a PV reconciled again after its volume was committed
// reports the commit it finds on disk (and tells the user) again.
func TestReportAfterCommitIsRetried(t *testing.T) {
	store, dir := newStore(t)
	env := testenv.Start(t)
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "report-"}}
	if err := env.Client.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	direct, err := client.NewWithWatch(env.Config, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	failures := 1
	flaky := interceptor.NewClient(direct, interceptor.Funcs{
		SubResourcePatch: func(ctx context.Context, c client.Client, sub string, obj client.Object, patch client.Patch, opts ...client.SubResourcePatchOption) error {
			if sub == "status" && failures > 0 {
				failures--
				return apierrors.NewServiceUnavailable("the API server is restarting")
			}
			return c.Status().Patch(ctx, obj, patch, opts...)
		},
	})
	events := record.NewFakeRecorder(10)
	reports := NewReports("node-a")
	r := &PVReconciler{Client: direct, Store: store, NodeName: "node-a", Recorder: events, Reports: reports}
	nr := &NodeCacheReconciler{Client: flaky, Store: store, NodeName: "node-a", Recorder: events, Reports: reports}
	s := &nodeSuite{t: t, ctx: ctx, c: env.Client, store: store, dir: dir, driver: &Driver{Store: store, NodeName: "node-a"}}
	pv := s.pv("pvc-r1", attrs(ns.Name, "reported", true))
	s.build(pv, map[string]string{"a": "1"}, false)
	s.release(pv, "Succeeded", false)
	req := ctrl.Request{NamespacedName: client.ObjectKeyFromObject(pv)}
	for i := range 2 {
		if i == 0 {
			_, err = r.Reconcile(ctx, req)
		} else { // as after a failure once the volume was committed
			err = r.finishCacheVolume(ctx, pv)
		}
		if err != nil {
			t.Fatalf("finishing the PV (%d): %v", i, err)
		}
		select {
		case ev := <-events.Events:
			if !strings.Contains(ev, "Committed") || !strings.Contains(ev, "generation 1") {
				t.Errorf("event = %q", ev)
			}
		default:
			t.Errorf("no Committed event after reconcile %d", i)
		}
	}
	ncReq := ctrl.Request{NamespacedName: client.ObjectKey{Namespace: ns.Name, Name: v1alpha1.NodeCacheName("reported", "node-a")}}
	if _, err := nr.Reconcile(ctx, ncReq); err == nil {
		t.Fatal("the first report said nothing went wrong though the status write failed")
	}
	if _, err := nr.Reconcile(ctx, ncReq); err != nil {
		t.Fatalf("the retry: %v", err)
	}
	nc := &v1alpha1.NodeCache{}
	if err := env.Client.Get(ctx, ncReq.NamespacedName, nc); err != nil {
		t.Fatal(err)
	}
	if nc.Status.Generation != 1 || nc.Status.Node != "node-a" || nc.Status.Size.IsZero() {
		t.Fatalf("status after the retry = %+v", nc.Status)
	}

	// A released PV whose name cannot be a volume of ours is a terminal
	// error, never a delay the controller would ignore.
	long := s.pv(strings.Repeat("x", 140), attrs(ns.Name, "reported", true))
	s.release(long, "Succeeded", false)
	res, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKeyFromObject(long)})
	if !errors.Is(err, reconcile.TerminalError(nil)) || !res.IsZero() {
		t.Fatalf("reconcile of an invalid volume: %+v, %v; want a terminal error and no requeue", res, err)
	}
}

// The agent never creates a Cache from what it finds on disk: data no
// Cache owns (its Cache deleted while the node was away, or a namespace
// deleted and re-created under the same name) is never reported, and is
// deleted once unused for the grace period. On main, the report re-created
// the Cache, and with it, in a re-created namespace, another tenant's data.
func TestDataWithoutACacheIsNeverReported(t *testing.T) {
	store, dir := newStore(t)
	env := testenv.Start(t)
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "orphan-"}}
	if err := env.Client.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	events := record.NewFakeRecorder(10)
	reports := NewReports("node-a")
	r := &PVReconciler{Client: env.Client, Store: store, NodeName: "node-a", Recorder: events, Reports: reports}
	nr := &NodeCacheReconciler{Client: env.Client, Store: store, NodeName: "node-a", Recorder: events, Reports: reports}
	s := &nodeSuite{t: t, ctx: ctx, c: env.Client, store: store, dir: dir, driver: &Driver{Store: store, NodeName: "node-a"}}
	pv := s.pv("pvc-o1", attrs(ns.Name, "orphan", true))
	s.build(pv, map[string]string{"a": "1"}, false)
	// The outcome, with no grant: as an older manager during an upgrade.
	patch := client.MergeFrom(pv.DeepCopy())
	metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationPodPhase, "Succeeded")
	if err := env.Client.Patch(ctx, pv, patch); err != nil {
		t.Fatal(err)
	}
	pv.Status.Phase = corev1.VolumeReleased
	if err := env.Client.Status().Update(ctx, pv); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKeyFromObject(pv)}); err != nil {
		t.Fatal(err)
	}
	key := engine.Key{Namespace: ns.Name, Name: "orphan"}
	if info, err := store.Inspect(key); err != nil || info.Head == nil {
		t.Fatalf("the commit: %+v, %v", info, err)
	}
	req := ctrl.Request{NamespacedName: client.ObjectKey{Namespace: ns.Name, Name: v1alpha1.NodeCacheName("orphan", "node-a")}}
	if _, err := nr.Reconcile(ctx, req); err != nil {
		t.Fatal(err)
	}
	cacheErr := env.Client.Get(ctx, client.ObjectKey{Namespace: ns.Name, Name: "orphan"}, &v1alpha1.Cache{})
	ncErr := env.Client.Get(ctx, req.NamespacedName, &v1alpha1.NodeCache{})
	if !apierrors.IsNotFound(cacheErr) || !apierrors.IsNotFound(ncErr) {
		t.Fatalf("data on disk brought back a Cache (%v) or a NodeCache (%v)", cacheErr, ncErr)
	}
	if _, err := store.Inspect(key); err != nil {
		t.Fatalf("data used within the grace period was deleted: %v", err)
	}
	nr.OrphanGrace = time.Nanosecond
	if _, err := nr.Reconcile(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Inspect(key); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("orphaned data past its grace period: %v, want it deleted", err)
	}
}
