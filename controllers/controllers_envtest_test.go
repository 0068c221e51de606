package controllers_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/controllers"
	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/testenv"
)

type suite struct {
	t   *testing.T
	ctx context.Context
	c   client.Client
}

func start(t *testing.T) *suite { return startWith(t, controllers.Options{}) }

func startWith(t *testing.T, opts controllers.Options) *suite {
	env := testenv.Start(t)
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}, Cache: controllers.CacheOptions(),
		// go test -count=N starts this manager N times in one process.
		Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := controllers.Setup(mgr, opts); err != nil {
		t.Fatal(err)
	}
	ctx := testenv.RunManager(t, mgr)
	s := &suite{t: t, ctx: ctx, c: env.Client}
	reclaim := corev1.PersistentVolumeReclaimDelete
	wait := storagev1.VolumeBindingWaitForFirstConsumer
	for _, sc := range []*storagev1.StorageClass{
		{ObjectMeta: metav1.ObjectMeta{Name: "layercache"}, Provisioner: v1alpha1.DriverName, ReclaimPolicy: &reclaim, VolumeBindingMode: &wait},
		{ObjectMeta: metav1.ObjectMeta{Name: "layercache-hostdir"}, Provisioner: v1alpha1.DriverName, ReclaimPolicy: &reclaim, VolumeBindingMode: &wait,
			Parameters: map[string]string{v1alpha1.ParameterKind: v1alpha1.KindHostDir}},
	} {
		s.create(sc)
	}
	s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{corev1.LabelHostname: "host-a"}}})
	s.create(&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "committer"}, Rules: []rbacv1.PolicyRule{{
		APIGroups: []string{"layercache.io"}, Resources: []string{"caches"}, Verbs: []string{"commit"}}}})
	return s
}

func (s *suite) create(obj client.Object) {
	s.t.Helper()
	if err := s.c.Create(s.ctx, obj); err != nil {
		s.t.Fatalf("creating %T %s: %v", obj, obj.GetName(), err)
	}
}

func (s *suite) namespace(serviceAccounts ...string) string {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "ctrl-"}}
	s.create(ns)
	for _, sa := range append(serviceAccounts, "default") {
		s.create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: ns.Name}})
	}
	return ns.Name
}

func (s *suite) eventually(what string, cond func() bool) {
	s.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			s.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// buildPod is a pod as the webhook leaves it.
func buildPod(ns, name, cache, trust, sa string) *corev1.Pod {
	claim := v1alpha1.Claim{Cache: cache, ClaimName: name + "-" + cache + "-x1", Volume: "cache", Trust: trust,
		Size: "1Gi", StorageClass: "layercache", MountPath: "/cache"}
	data, _ := json.Marshal([]v1alpha1.Claim{claim})
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
			Labels:      map[string]string{v1alpha1.LabelCache: cache, v1alpha1.LabelTrust: trust},
			Annotations: map[string]string{v1alpha1.AnnotationClaims: string(data)}},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "build", Image: "busybox",
				VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/cache"}}}},
			Volumes: []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim.ClaimName}}}},
		},
	}
}

func (s *suite) pvc(ns, name string) *corev1.PersistentVolumeClaim {
	s.t.Helper()
	pvc := &corev1.PersistentVolumeClaim{}
	s.eventually("claim "+name, func() bool { return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: name}, pvc) == nil })
	return pvc
}

// schedule does what the scheduler does for a WaitForFirstConsumer claim,
// and returns the PV the provisioner makes.
func (s *suite) schedule(pvc *corev1.PersistentVolumeClaim) *corev1.PersistentVolume {
	s.t.Helper()
	patch := client.MergeFrom(pvc.DeepCopy())
	metav1.SetMetaDataAnnotation(&pvc.ObjectMeta, controllers.AnnotationSelectedNode, "node-a")
	if err := s.c.Patch(s.ctx, pvc, patch); err != nil {
		s.t.Fatal(err)
	}
	pv := &corev1.PersistentVolume{}
	s.eventually("PV of "+pvc.Name, func() bool { return s.c.Get(s.ctx, client.ObjectKey{Name: controllers.PVName(pvc)}, pv) == nil })
	return pv
}

func (s *suite) events(ns, object string) string {
	list := &corev1.EventList{}
	if err := s.c.List(s.ctx, list, client.InNamespace(ns),
		client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("involvedObject.name", object)}); err != nil {
		s.t.Fatal(err)
	}
	var out []string
	for _, e := range list.Items {
		out = append(out, e.Reason+": "+e.Message)
	}
	return strings.Join(out, "\n")
}

func TestManagerReconcilers(t *testing.T) {
	s := start(t)

	t.Run("a trusted writer's claim and PV", func(t *testing.T) {
		s.t = t
		ns := s.namespace("trusted")
		s.create(&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "commit", Namespace: ns},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "committer"},
			Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "trusted", Namespace: ns}}})
		pod := buildPod(ns, "build", "example-project", "write", "trusted")
		s.create(pod)
		pvc := s.pvc(ns, "build-example-project-x1")
		if !metav1.IsControlledBy(pvc, pod) || *pvc.Spec.StorageClassName != "layercache" ||
			pvc.Spec.AccessModes[0] != corev1.ReadWriteOncePod || !pvc.Spec.Resources.Requests.Storage().Equal(resource.MustParse("1Gi")) ||
			pvc.Labels[v1alpha1.LabelCache] != "example-project" {
			t.Fatalf("claim = %+v", pvc)
		}
		pv := s.schedule(pvc)
		attrs := pv.Spec.CSI.VolumeAttributes
		if attrs[v1alpha1.AttrWrite] != "true" || attrs[v1alpha1.AttrCache] != "example-project" || attrs[v1alpha1.AttrNamespace] != ns ||
			attrs[v1alpha1.AttrPodUID] != string(pod.UID) || attrs[v1alpha1.AttrKind] != "cache" {
			t.Errorf("attributes = %v", attrs)
		}
		if pv.Spec.ClaimRef.UID != pvc.UID || pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values[0] != "host-a" ||
			pv.Labels[v1alpha1.LabelNode] != "node-a" || pv.Finalizers[0] != v1alpha1.FinalizerNode || pv.Spec.CSI.Driver != "layercache.io" {
			t.Errorf("PV = %+v", pv)
		}

		// The PV controller binds; then the pod succeeds.
		patch := client.MergeFrom(pvc.DeepCopy())
		pvc.Spec.VolumeName = pv.Name
		if err := s.c.Patch(s.ctx, pvc, patch); err != nil {
			t.Fatal(err)
		}
		finished := metav1.NewTime(time.Now().Add(-time.Second))
		pod.Status = corev1.PodStatus{Phase: corev1.PodSucceeded, ContainerStatuses: []corev1.ContainerStatus{{Name: "build",
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, FinishedAt: finished}}}}}
		if err := s.c.Status().Update(s.ctx, pod); err != nil {
			t.Fatal(err)
		}
		s.eventually("the claim to be deleted", func() bool {
			return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(pvc), &corev1.PersistentVolumeClaim{}))
		})
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), pv); err != nil {
			t.Fatal(err)
		}
		if pv.Annotations[v1alpha1.AnnotationPodPhase] != "Succeeded" {
			t.Errorf("PV annotations = %v", pv.Annotations)
		}
		// The commit it may make was granted first: the Cache exists (its
		// first commit), and so does node-a's NodeCache, marked granted.
		nc := &v1alpha1.NodeCache{}
		if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("example-project", "node-a")}, nc); err != nil {
			t.Fatalf("no NodeCache granted: %v", err)
		}
		if nc.Spec.CommitGranted == nil || nc.Spec.Node != "node-a" || !slices.Contains(nc.Finalizers, v1alpha1.FinalizerNodeData) ||
			len(nc.OwnerReferences) != 1 || nc.OwnerReferences[0].Name != "example-project" {
			t.Errorf("granted NodeCache = %+v", nc)
		}
	})

	t.Run("fallback caches reach the PV", func(t *testing.T) {
		s.t = t
		ns := s.namespace("fallback")
		pod := buildPod(ns, "branch", "feature-x", "read", "default")
		claims := []v1alpha1.Claim{{Cache: "feature-x", ClaimName: "branch-feature-x-x1", Volume: "cache", Trust: "read",
			Size: "1Gi", StorageClass: "layercache", MountPath: "/cache", RestoreFrom: []string{"main", "release"}, MaxInodes: 5000}}
		data, _ := json.Marshal(claims)
		pod.Annotations[v1alpha1.AnnotationClaims] = string(data)
		s.create(pod)
		pvc := s.pvc(ns, "branch-feature-x-x1")
		if got := pvc.Annotations[v1alpha1.AnnotationRestoreFrom]; got != "main,release" {
			t.Fatalf("claim annotations = %v, want %s=main,release", pvc.Annotations, v1alpha1.AnnotationRestoreFrom)
		}
		pv := s.schedule(pvc)
		if got := pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrRestoreFrom]; got != "main,release" {
			t.Errorf("PV attributes = %v, want %s=main,release", pv.Spec.CSI.VolumeAttributes, v1alpha1.AttrRestoreFrom)
		}
		// The claim's inode bound (layercache.io/max-inodes) reaches the node.
		if got := pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrMaxInodes]; got != "5000" {
			t.Errorf("PV attributes = %v, want %s=5000", pv.Spec.CSI.VolumeAttributes, v1alpha1.AttrMaxInodes)
		}

		// A pod that names its own cache as a fallback gets no claim.
		bad := buildPod(ns, "loop", "feature-y", "read", "default")
		claims[0].Cache, claims[0].ClaimName, claims[0].RestoreFrom = "feature-y", "loop-feature-y-x1", []string{"feature-y"}
		bad.Spec.Volumes[0].PersistentVolumeClaim.ClaimName = claims[0].ClaimName
		data, _ = json.Marshal(claims)
		bad.Annotations[v1alpha1.AnnotationClaims] = string(data)
		bad.Labels[v1alpha1.LabelCache] = "feature-y"
		s.create(bad)
		s.eventually("a BadClaims event", func() bool {
			return strings.Contains(s.events(ns, "loop"), `restoreFrom: names the claim's own cache "feature-y"`)
		})
	})

	t.Run("a writer without RBAC gets a read-only volume and an event", func(t *testing.T) {
		s.t = t
		ns := s.namespace("untrusted")
		pod := buildPod(ns, "pr", "example-project", "write", "untrusted")
		s.create(pod)
		pv := s.schedule(s.pvc(ns, "pr-example-project-x1"))
		if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrWrite] != "false" {
			t.Errorf("attributes = %v", pv.Spec.CSI.VolumeAttributes)
		}
		s.eventually("a CommitDenied event", func() bool {
			return strings.Contains(s.events(ns, "pr"), "CommitDenied: service account untrusted may not commit")
		})
	})

	t.Run("a reader gets a read-only volume and no complaint", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		s.create(buildPod(ns, "reader", "example-project", "read", ""))
		pv := s.schedule(s.pvc(ns, "reader-example-project-x1"))
		if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrWrite] != "false" {
			t.Errorf("attributes = %v", pv.Spec.CSI.VolumeAttributes)
		}
		if ev := s.events(ns, "reader"); strings.Contains(ev, "Denied") {
			t.Errorf("events = %s", ev)
		}
	})

	t.Run("a hand-written claim is provisioned read-only with an event", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		class := "layercache"
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: "sneaky", Namespace: ns,
				Labels: map[string]string{v1alpha1.LabelCache: "example-project"}, Annotations: map[string]string{v1alpha1.LabelTrust: "write"}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
		}
		s.create(pvc)
		pv := s.schedule(pvc)
		if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrWrite] != "false" {
			t.Errorf("attributes = %v", pv.Spec.CSI.VolumeAttributes)
		}
		s.eventually("a NotOwnedByBuildPod event", func() bool { return strings.Contains(s.events(ns, "sneaky"), "NotOwnedByBuildPod") })
	})

	t.Run("an invalid cache name gets an event and no PV", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		class := "layercache"
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: "bad", Namespace: ns, Labels: map[string]string{v1alpha1.LabelCache: "Bad.Name"},
				Annotations: map[string]string{controllers.AnnotationSelectedNode: "node-a"}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
		}
		s.create(pvc)
		s.eventually("an InvalidCacheName event", func() bool { return strings.Contains(s.events(ns, "bad"), "InvalidCacheName") })
		if err := s.c.Get(s.ctx, client.ObjectKey{Name: controllers.PVName(pvc)}, &corev1.PersistentVolume{}); !apierrors.IsNotFound(err) {
			t.Errorf("a PV was provisioned for an invalid cache name: %v", err)
		}
	})

	t.Run("a host directory claim", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		class := "layercache-hostdir"
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: "scratch", Namespace: ns},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("5Gi")}}},
		}
		s.create(pvc)
		pv := s.schedule(pvc)
		if a := pv.Spec.CSI.VolumeAttributes; a[v1alpha1.AttrKind] != "hostdir" || a[v1alpha1.AttrWrite] != "false" || a[v1alpha1.AttrCache] != "" {
			t.Errorf("attributes = %v", a)
		}
	})

	t.Run("a pod deleted before it ended never commits", func(t *testing.T) {
		s.t = t
		ns := s.namespace("trusted")
		pod := buildPod(ns, "interrupted", "example-project", "write", "trusted")
		pod.Spec.NodeName = "node-a" // bound to a node: deletion waits for its (absent) kubelet
		s.create(pod)
		pvc := s.pvc(ns, "interrupted-example-project-x1")
		pv := s.schedule(pvc)
		patch := client.MergeFrom(pvc.DeepCopy())
		pvc.Spec.VolumeName = pv.Name
		if err := s.c.Patch(s.ctx, pvc, patch); err != nil {
			t.Fatal(err)
		}
		// It exits 0 on SIGTERM, after its deletion began.
		if err := s.c.Delete(s.ctx, pod); err != nil {
			t.Fatal(err)
		}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
			t.Fatal(err)
		}
		pod.Status = corev1.PodStatus{Phase: corev1.PodSucceeded, ContainerStatuses: []corev1.ContainerStatus{{Name: "build",
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{FinishedAt: metav1.Now()}}}}}
		if err := s.c.Status().Update(s.ctx, pod); err != nil {
			t.Fatal(err)
		}
		s.eventually("the PV to record the deletion", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), pv) == nil && pv.Annotations[v1alpha1.AnnotationPodPhase] == controllers.PhaseDeleted
		})
		// Nothing was granted: no Cache, no NodeCache.
		if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "example-project"}, &v1alpha1.Cache{}); !apierrors.IsNotFound(err) {
			t.Errorf("a Cache for a commit never granted: %v", err)
		}
		s.eventually("the claim to be deleted", func() bool {
			return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(pvc), &corev1.PersistentVolumeClaim{}))
		})
	})

	t.Run("a pod whose volume its node reports over its bound is deleted", func(t *testing.T) {
		s.t = t
		ns := s.namespace("trusted")
		running := func(name, node string) (*corev1.Pod, *corev1.PersistentVolume) {
			pod := buildPod(ns, name, "example-project", "write", "trusted")
			pod.Spec.NodeName = node
			s.create(pod)
			pvc := s.pvc(ns, name+"-example-project-x1")
			pv := s.schedule(pvc) // a PV for node-a
			patch := client.MergeFrom(pv.DeepCopy())
			metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationOverLimit, "volume holds 2Mi of writes, more than its size 1Mi")
			if err := s.c.Patch(s.ctx, pv, patch); err != nil {
				t.Fatal(err)
			}
			return pod, pv
		}
		// node-a's agent reports a volume of a pod that runs on node-b: the
		// pod is not its to stop.
		elsewhere, _ := running("elsewhere", "node-b")
		greedy, _ := running("greedy", "node-a")
		s.eventually("the greedy pod to be deleted", func() bool {
			got := &corev1.Pod{}
			err := s.c.Get(s.ctx, client.ObjectKeyFromObject(greedy), got)
			return apierrors.IsNotFound(err) || (err == nil && got.DeletionTimestamp != nil)
		})
		s.eventually("a VolumeSizeExceeded event", func() bool {
			return strings.Contains(s.events(ns, "greedy"), "VolumeSizeExceeded: Deleted: volume holds 2Mi of writes")
		})
		got := &corev1.Pod{}
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(elsewhere), got); err != nil || got.DeletionTimestamp != nil {
			t.Errorf("the pod of another node was deleted: %v, %v", err, got.DeletionTimestamp)
		}
	})

	t.Run("the Cache gathers its NodeCaches, and its ttl reaches them", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		ttl := metav1.Duration{Duration: time.Hour}
		c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "summary", Namespace: ns}, Spec: v1alpha1.CacheSpec{TTL: &ttl}}
		s.create(c)
		older, newer := metav1.NewTime(time.Now().Add(-time.Hour).Truncate(time.Second)), metav1.NewTime(time.Now().Truncate(time.Second))
		// A NodeCache of a node that does not exist is let go (below).
		s.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b", Labels: map[string]string{corev1.LabelHostname: "host-b"}}})
		s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 3, Size: resource.MustParse("2Gi"), LastCommitTime: &older})
		s.nodeCache(c, "node-b", v1alpha1.NodeCacheStatus{Generation: 1, Size: resource.MustParse("1Gi"), LastCommitTime: &newer})
		s.eventually("the summary", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c) == nil && c.Status.NodeNames == "node-b,node-a"
		})
		ready := meta.FindStatusCondition(c.Status.Conditions, controllers.ConditionReady)
		if !c.Status.Size.Equal(resource.MustParse("2Gi")) || !c.Status.LastCommitTime.Equal(&newer) || ready == nil || ready.Status != metav1.ConditionTrue ||
			len(c.Status.Nodes) != 2 || c.Status.Nodes[1].Node != "node-a" || c.Status.Nodes[1].Generation != 3 {
			t.Errorf("status = %+v", c.Status)
		}
		if !slices.Contains(c.Finalizers, v1alpha1.FinalizerCacheData) {
			t.Errorf("finalizers = %v", c.Finalizers)
		}
		s.eventually("the ttl on the NodeCaches", func() bool {
			nc := &v1alpha1.NodeCache{}
			return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("summary", "node-b")}, nc) == nil &&
				nc.Spec.TTL != nil && nc.Spec.TTL.Duration == time.Hour
		})
	})

	t.Run("deleting a Cache waits for its NodeCaches", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "doomed", Namespace: ns,
			// What node agents put on Caches before NodeCaches: it must not block.
			Finalizers: []string{v1alpha1.LegacyFinalizerCachePrefix + "old-node"}}}
		s.create(c)
		nc := s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 1})
		s.eventually("the manager's finalizer", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c) == nil && slices.Equal(c.Finalizers, []string{v1alpha1.FinalizerCacheData})
		})
		if err := s.c.Delete(s.ctx, c); err != nil {
			t.Fatal(err)
		}
		s.eventually("the NodeCache to be deleted", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), nc) == nil && nc.DeletionTimestamp != nil
		})
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c); err != nil {
			t.Fatalf("the Cache went before its node's data: %v", err)
		}
		// The node's agent deletes its data, then lets its NodeCache go.
		if _, err := finalizers.Remove(s.ctx, s.c, nc, v1alpha1.FinalizerNodeData); err != nil {
			t.Fatal(err)
		}
		s.eventually("the Cache to go", func() bool { return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c)) })
	})

	t.Run("what a deleted node held is let go", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		// A node name of 63 characters: valid, and as long as a label value gets.
		long := strings.Repeat("n", 60) + "-xy"
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: long, Labels: map[string]string{corev1.LabelHostname: long}}}
		s.create(node)
		c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "stranded", Namespace: ns}}
		s.create(c)
		nc := s.nodeCache(c, long, v1alpha1.NodeCacheStatus{Generation: 1})
		kept := s.nodeCache(c, "node-a", v1alpha1.NodeCacheStatus{Generation: 4})
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: "pv-on-" + long[:10], Labels: map[string]string{v1alpha1.LabelNode: v1alpha1.NodeLabelValue(long)},
				Finalizers: []string{v1alpha1.FinalizerNode}},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:    corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
				AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
				PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
					Driver: v1alpha1.DriverName, VolumeHandle: "pv-on-long"}},
			},
		}
		s.create(pv)
		pv.Status.Phase = corev1.VolumeReleased
		if err := s.c.Status().Update(s.ctx, pv); err != nil {
			t.Fatal(err)
		}
		// While the node exists, nothing is touched.
		time.Sleep(500 * time.Millisecond)
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), nc); err != nil || nc.DeletionTimestamp != nil {
			t.Fatalf("a live node's NodeCache was touched: %v %v", err, nc.DeletionTimestamp)
		}
		if err := s.c.Delete(s.ctx, node); err != nil {
			t.Fatal(err)
		}
		s.eventually("the gone node's NodeCache to go", func() bool { return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(nc), nc)) })
		s.eventually("the gone node's released PV to be deleted", func() bool {
			got := &corev1.PersistentVolume{}
			err := s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), got)
			return apierrors.IsNotFound(err) || (err == nil && got.DeletionTimestamp != nil && !slices.Contains(got.Finalizers, v1alpha1.FinalizerNode))
		})
		if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(kept), kept); err != nil || kept.DeletionTimestamp != nil {
			t.Fatalf("another node's NodeCache was touched: %v", err)
		}
		s.eventually("the Cache to list only the node that is left", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c) == nil && c.Status.NodeNames == "node-a"
		})
	})
}

// nodeCache creates node's NodeCache of c, as that node's agent does, with
// status st.
func (s *suite) nodeCache(c *v1alpha1.Cache, node string, st v1alpha1.NodeCacheStatus) *v1alpha1.NodeCache {
	s.t.Helper()
	nc := &v1alpha1.NodeCache{
		ObjectMeta: metav1.ObjectMeta{Namespace: c.Namespace, Name: v1alpha1.NodeCacheName(c.Name, node),
			Labels:     map[string]string{v1alpha1.LabelCache: c.Name, v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node)},
			Finalizers: []string{v1alpha1.FinalizerNodeData}},
		// Granted, as the manager does when a pod of the node may commit.
		Spec: v1alpha1.NodeCacheSpec{Cache: c.Name, Node: node, CommitGranted: &metav1.Time{Time: time.Now()}},
	}
	if err := ctrl.SetControllerReference(c, nc, s.c.Scheme()); err != nil {
		s.t.Fatal(err)
	}
	s.create(nc)
	st.Node, st.Layers = node, 1
	if st.Size.IsZero() {
		st.Size = resource.MustParse("1Mi")
	}
	before := nc.DeepCopy()
	nc.Status = st
	if err := s.c.Status().Patch(s.ctx, nc, client.MergeFrom(before)); err != nil {
		s.t.Fatal(err)
	}
	return nc
}

var skipNameValidation = true

// The manager's informers hold only labelled pods, and no object's
// managedFields: at hundreds of nodes and thousands of pods, those are most
// of what a cached object weighs.
func TestTheManagersCacheIsLean(t *testing.T) {
	env := testenv.Start(t)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "lean"}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	labelled, other := buildPod("lean", "build", "main", "", ""), buildPod("lean", "other", "", "", "")
	delete(other.Labels, v1alpha1.LabelCache)
	for _, obj := range []client.Object{labelled, other,
		&v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: "lean", Name: "main"}},
		&corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "lean", Name: "claim"},
			Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}} {
		if err := env.Client.Create(context.Background(), obj); err != nil {
			t.Fatal(err)
		}
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(obj), obj); err != nil || len(obj.GetManagedFields()) == 0 {
			t.Fatalf("the API server has no managedFields for %T %s (%v)", obj, obj.GetName(), err)
		}
		if !env.CachedCopy(t, controllers.CacheOptions(), obj) {
			if obj != other {
				t.Errorf("the manager's cache does not hold %T %s", obj, obj.GetName())
			}
			continue
		}
		if obj == other {
			t.Errorf("the manager's cache holds the unlabelled pod %s", obj.GetName())
		}
		if n := len(obj.GetManagedFields()); n > 0 {
			t.Errorf("the manager's cache holds %T %s with %d managedFields entries", obj, obj.GetName(), n)
		}
	}
}
