package controllers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/controllers"
	"github.com/layercache/layercache/internal/testenv"
)

func withClaims(p *corev1.Pod, claims ...v1alpha1.Claim) *corev1.Pod {
	data, _ := json.Marshal(claims)
	p.Annotations[v1alpha1.AnnotationClaims] = string(data)
	return p
}

func TestForgedClaimsAndTheSchedulingGate(t *testing.T) {
	s := start(t)

	t.Run("the gate goes once the claims exist", func(t *testing.T) {
		s.t = t
		ns := s.namespace()
		pod := buildPod(ns, "gated", "example-project", "read", "")
		pod.Spec.SchedulingGates = []corev1.PodSchedulingGate{{Name: "other.example.com/gate"}, {Name: v1alpha1.SchedulingGate}}
		s.create(pod)
		s.pvc(ns, "gated-example-project-x1")
		s.eventually("our gate to go", func() bool {
			return s.c.Get(s.ctx, client.ObjectKeyFromObject(pod), pod) == nil && len(pod.Spec.SchedulingGates) == 1
		})
		if pod.Spec.SchedulingGates[0].Name != "other.example.com/gate" {
			t.Errorf("gates = %v: another controller's gate must stay", pod.Spec.SchedulingGates)
		}
	})

	forged := []struct {
		name   string
		change func(*corev1.Pod, *v1alpha1.Claim)
		want   string
	}{
		{"another storage class", func(_ *corev1.Pod, c *v1alpha1.Claim) { c.StorageClass = "fast-ssd" }, `storage class "fast-ssd": only "layercache" is allowed`},
		{"a huge size", func(_ *corev1.Pod, c *v1alpha1.Claim) { c.Size = "50Ti" }, "size 50Ti is more than the largest allowed, 100Gi"},
		{"a claim no volume references", func(p *corev1.Pod, c *v1alpha1.Claim) { c.ClaimName = "someone-elses" }, `the pod has no volume "cache" that references it`},
		{"a cache the pod does not ask for", func(_ *corev1.Pod, c *v1alpha1.Claim) { c.Cache = "someone-elses-cache" },
			`cache "someone-elses-cache" is neither the pod's label layercache.io/cache nor in its annotation layercache.io/caches`},
		{"more trust than the label", func(p *corev1.Pod, c *v1alpha1.Claim) { c.Trust = "write" }, `trust "write", but the pod's label layercache.io/trust asks for "read"`},
	}
	for _, tt := range forged {
		t.Run("a forged annotation creates nothing: "+tt.name, func(t *testing.T) {
			s.t = t
			ns := s.namespace()
			pod := buildPod(ns, "forged", "example-project", "read", "")
			claim := v1alpha1.Claim{Cache: "example-project", ClaimName: "forged-example-project-x1", Volume: "cache", Trust: "read",
				Size: "1Gi", StorageClass: "layercache", MountPath: "/cache"}
			tt.change(pod, &claim)
			s.create(withClaims(pod, claim))
			s.eventually("a BadClaims event", func() bool { return strings.Contains(s.events(ns, "forged"), tt.want) })
			list := &corev1.PersistentVolumeClaimList{}
			if err := s.c.List(s.ctx, list, client.InNamespace(ns)); err != nil || len(list.Items) != 0 {
				t.Fatalf("claims created for a forged annotation: %v %v", err, list.Items)
			}
		})
	}
}

// A claim that vanishes while its pod's claims are being released (deleted
// by hand, say) does not stop the release of the pod's other claims.
func TestReleaseGoesOnPastAVanishedClaim(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	c := env.Client
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "release-"}}
	if err := c.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: ns.Name}}); err != nil {
		t.Fatal(err)
	}
	pod := buildPod(ns.Name, "two", "a", "read", "")
	pod.Annotations[v1alpha1.AnnotationCaches] = "b=/b"
	claims := []v1alpha1.Claim{
		{Cache: "a", ClaimName: "two-a-x1", Volume: "cache", Trust: "read", Size: "1Gi", StorageClass: "layercache", MountPath: "/cache"},
		{Cache: "b", ClaimName: "two-b-x1", Volume: "layercache-1", Trust: "read", Size: "1Gi", StorageClass: "layercache", MountPath: "/b"},
	}
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "layercache-1", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "two-b-x1"}}})
	pod.Spec.Volumes[0].PersistentVolumeClaim.ClaimName = "two-a-x1"
	if err := c.Create(ctx, withClaims(pod, claims...)); err != nil {
		t.Fatal(err)
	}
	for _, cl := range claims {
		class := "layercache"
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: cl.ClaimName, Namespace: ns.Name, Finalizers: []string{controllers.FinalizerPVCProtection}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
		}
		if err := ctrl.SetControllerReference(pod, pvc, env.Scheme); err != nil {
			t.Fatal(err)
		}
		if err := c.Create(ctx, pvc); err != nil {
			t.Fatal(err)
		}
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodFailed}
	if err := c.Status().Update(ctx, pod); err != nil {
		t.Fatal(err)
	}

	direct, err := client.NewWithWatch(env.Config, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	// The first claim vanishes for real between its read and its update.
	vanished := false
	intercepted := interceptor.NewClient(direct, interceptor.Funcs{
		Patch: func(ctx context.Context, cl client.WithWatch, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
			if obj.GetName() == "two-a-x1" && !vanished {
				vanished = true
				gone := &corev1.PersistentVolumeClaim{}
				if err := cl.Get(ctx, client.ObjectKeyFromObject(obj), gone); err != nil {
					return err
				}
				gone.Finalizers = nil
				if err := cl.Update(ctx, gone); err != nil {
					return err
				}
				if err := cl.Delete(ctx, gone); err != nil {
					return err
				}
			}
			return cl.Patch(ctx, obj, patch, opts...)
		},
	})
	r := &controllers.PodReconciler{Client: intercepted, Recorder: record.NewFakeRecorder(100)}
	var logged bytes.Buffer
	ctx = logf.IntoContext(ctx, zap.New(zap.WriteTo(&logged)))
	if _, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKeyFromObject(pod)}); err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	if !vanished {
		t.Fatal("the first claim was never updated: the test did not run its case")
	}
	second := &corev1.PersistentVolumeClaim{}
	err = c.Get(ctx, client.ObjectKey{Namespace: ns.Name, Name: "two-b-x1"}, second)
	if err == nil && (second.DeletionTimestamp == nil || slices.Contains(second.Finalizers, controllers.FinalizerPVCProtection)) {
		t.Fatalf("the second claim was not released: deletion %v, finalizers %v", second.DeletionTimestamp, second.Finalizers)
	}
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	// Objects are logged as {name, namespace}, as klog.KObj gives them.
	if want := `"persistentVolumeClaim":{"name":"two-b-x1","namespace":"` + ns.Name + `"}`; !strings.Contains(logged.String(), want) {
		t.Errorf("log lacks %s:\n%s", want, logged.String())
	}
}

// A class of our provisioner whose reclaim policy is not Delete gets no
// volume, with an event saying why: the node agent removes a released
// volume's data and its PV, so Retain would promise what never happens.
// Before, the policy was copied onto the PV and then ignored.
func TestRetainClassesAreRefused(t *testing.T) {
	s := start(t)
	ns := s.namespace()
	retain := corev1.PersistentVolumeReclaimRetain
	wait := storagev1.VolumeBindingWaitForFirstConsumer
	class := "layercache-retain-" + ns
	s.create(&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: class}, Provisioner: v1alpha1.DriverName,
		ReclaimPolicy: &retain, VolumeBindingMode: &wait, Parameters: map[string]string{v1alpha1.ParameterKind: v1alpha1.KindHostDir}})
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "kept", Annotations: map[string]string{controllers.AnnotationSelectedNode: "node-a"}},
		Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
	}
	s.create(pvc)
	s.eventually("a ProvisioningFailed event", func() bool {
		return strings.Contains(s.events(ns, "kept"), "reclaimPolicy Retain is not supported, only Delete")
	})
	if err := s.c.Get(s.ctx, client.ObjectKey{Name: controllers.PVName(pvc)}, &corev1.PersistentVolume{}); !apierrors.IsNotFound(err) {
		t.Errorf("a PV was provisioned for a Retain class: %v", err)
	}
}

// A hand-written claim of our class bigger than --max-volume-size gets no
// volume, and says why (on main, a 1Ei claim got a 1Ei PV).
func TestOversizedClaimsAreRefused(t *testing.T) {
	s := startWith(t, controllers.Options{MaxVolumeSize: resource.MustParse("20Gi")})
	ns := s.namespace()
	class := "layercache-hostdir"
	claim := func(name, size string) *corev1.PersistentVolumeClaim {
		return &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: map[string]string{controllers.AnnotationSelectedNode: "node-a"}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}}},
		}
	}
	huge, fits := claim("huge", "1Ei"), claim("fits", "20Gi")
	s.create(huge)
	s.create(fits)
	s.eventually("a ProvisioningFailed event", func() bool {
		return strings.Contains(s.events(ns, "huge"), "asks for 1Ei, more than the largest cache volume allowed, 20Gi")
	})
	s.eventually("the PV of the claim that fits", func() bool {
		return s.c.Get(s.ctx, client.ObjectKey{Name: controllers.PVName(fits)}, &corev1.PersistentVolume{}) == nil
	})
	if err := s.c.Get(s.ctx, client.ObjectKey{Name: controllers.PVName(huge)}, &corev1.PersistentVolume{}); !apierrors.IsNotFound(err) {
		t.Errorf("a PV was provisioned for a 1Ei claim: %v", err)
	}
}

// The webhook fails open: a labelled pod the API server admitted without
// it (no claims annotation) gets one CacheSkipped event and is left as
// written; a pod of an exempt namespace, or one the webhook mutated, gets
// none.
func TestPodsAdmittedWithoutTheWebhookAreTold(t *testing.T) {
	s := startWith(t, controllers.Options{Namespace: "layercache-system"})
	ns := s.namespace()
	skipped := buildPod(ns, "skipped", "c", "write", "")
	delete(skipped.Annotations, v1alpha1.AnnotationClaims)
	skipped.Spec.Volumes[0].VolumeSource = corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}
	mutated := buildPod(ns, "mutated", "c", "read", "")
	s.create(skipped)
	s.create(mutated)
	s.eventually("the CacheSkipped event", func() bool {
		return strings.Contains(s.events(ns, "skipped"), controllers.ReasonCacheSkipped+": The layercache webhook was unreachable")
	})
	// The mutated pod's claim is created: the manager has seen it.
	s.pvc(ns, "mutated-c-x1")
	if ev := s.events(ns, "mutated"); strings.Contains(ev, controllers.ReasonCacheSkipped) {
		t.Errorf("a mutated pod was told it was skipped: %s", ev)
	}
	got := &corev1.Pod{}
	if err := s.c.Get(s.ctx, client.ObjectKeyFromObject(skipped), got); err != nil {
		t.Fatal(err)
	}
	if got.Spec.Volumes[0].EmptyDir == nil || len(got.Spec.SchedulingGates) != 0 || got.Annotations[v1alpha1.AnnotationClaims] != "" {
		t.Errorf("the skipped pod was changed: %+v", got.Spec.Volumes)
	}
	pvcs := &corev1.PersistentVolumeClaimList{}
	if err := s.c.List(s.ctx, pvcs, client.InNamespace(ns)); err != nil || len(pvcs.Items) != 1 {
		t.Errorf("want only the mutated pod's claim, have %d (%v)", len(pvcs.Items), err)
	}
	// An update tells nothing more (the recorder would count a repeat).
	patch := client.MergeFrom(got.DeepCopy())
	got.Labels["touched"] = "yes"
	if err := s.c.Patch(s.ctx, got, patch); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	list := &corev1.EventList{}
	if err := s.c.List(s.ctx, list, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	for _, ev := range list.Items {
		if ev.Reason == controllers.ReasonCacheSkipped && (ev.InvolvedObject.Name != "skipped" || ev.Count != 1) {
			t.Errorf("CacheSkipped for %s, %d times; want once for skipped", ev.InvolvedObject.Name, ev.Count)
		}
	}
}

// Metadata changed after admission steers nothing: a restore-from added to
// a build pod's pending claim is not what its volume falls back to (the
// pod's verified claim says), and a pod in which an ephemeral (debug)
// container ran never commits. On main, the PV took the PVC's restore-from
// and the debugged pod's outcome was Succeeded.
func TestMetadataChangedAfterAdmission(t *testing.T) {
	s := start(t)
	ns := s.namespace()
	pod := buildPod(ns, "build", "main", "read", "")
	s.create(pod)
	pvc := s.pvc(ns, "build-main-x1")
	patch := client.MergeFrom(pvc.DeepCopy())
	metav1.SetMetaDataAnnotation(&pvc.ObjectMeta, v1alpha1.AnnotationRestoreFrom, "secrets")
	if err := s.c.Patch(s.ctx, pvc, patch); err != nil {
		t.Fatal(err)
	}
	pv := s.schedule(pvc)
	if from, ok := pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrRestoreFrom]; ok {
		t.Errorf("the volume falls back to %q, which the PVC said after admission", from)
	}
	patch = client.MergeFrom(pvc.DeepCopy())
	pvc.Spec.VolumeName = pv.Name
	if err := s.c.Patch(s.ctx, pvc, patch); err != nil {
		t.Fatal(err)
	}
	pod.Spec.EphemeralContainers = []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{
		Name: "debug", Image: "busybox", ImagePullPolicy: corev1.PullIfNotPresent, TerminationMessagePolicy: corev1.TerminationMessageReadFile}}}
	if err := s.c.SubResource("ephemeralcontainers").Update(s.ctx, pod); err != nil {
		t.Fatal(err)
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodSucceeded}
	if err := s.c.Status().Update(s.ctx, pod); err != nil {
		t.Fatal(err)
	}
	s.eventually("the outcome on the PV", func() bool {
		return s.c.Get(s.ctx, client.ObjectKeyFromObject(pv), pv) == nil && pv.Annotations[v1alpha1.AnnotationPodPhase] != ""
	})
	if got := pv.Annotations[v1alpha1.AnnotationPodPhase]; got != controllers.PhaseDebugged {
		t.Errorf("a debugged pod's outcome is %q, want %q", got, controllers.PhaseDebugged)
	}
}

// A privileged pod that arrived with a claims annotation while the webhook
// was down (it fails open) gets no claim, unless its namespace allows it.
func TestPrivilegedPodsGetNoClaim(t *testing.T) {
	s := start(t)
	ns := s.namespace()
	root := buildPod(ns, "root", "podman", "read", "")
	root.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: ptr(true)}
	s.create(root)
	s.eventually("the refusal", func() bool {
		return strings.Contains(s.events(ns, "root"), "container build is privileged: such a pod owns its node")
	})
	if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "root-podman-x1"}, &corev1.PersistentVolumeClaim{}); !apierrors.IsNotFound(err) {
		t.Errorf("a privileged pod got its claim: %v", err)
	}
	allowing := s.namespace()
	s.labelNamespace(allowing, v1alpha1.LabelPrivileged, v1alpha1.PrivilegedAllow)
	allowed := buildPod(allowing, "root", "podman", "read", "")
	allowed.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: ptr(true)}
	s.create(allowed)
	s.pvc(allowing, "root-podman-x1")
}

func ptr[T any](v T) *T { return &v }

func (s *suite) labelNamespace(ns, key, value string) {
	s.t.Helper()
	nsObj := &corev1.Namespace{}
	if err := s.c.Get(s.ctx, client.ObjectKey{Name: ns}, nsObj); err != nil {
		s.t.Fatal(err)
	}
	metav1.SetMetaDataLabel(&nsObj.ObjectMeta, key, value)
	if err := s.c.Update(s.ctx, nsObj); err != nil {
		s.t.Fatal(err)
	}
}

// A pod's volumes are setuid only if it asks (layercache.io/setuid) and its
// namespace allows it: where the webhook did not check (it was down, the
// claims annotation is the pod's own), the manager creates no claim for a
// pod whose namespace does not allow it, nor for a claim that says setuid
// when the pod does not ask.
func TestSetuidClaimsOnlyWhereTheNamespaceAllows(t *testing.T) {
	s := start(t)
	setuidPod := func(ns, name string, ask, claim bool) *corev1.Pod {
		p := buildPod(ns, name, "tools", "read", "")
		c := v1alpha1.Claim{Cache: "tools", ClaimName: name + "-tools-x1", Volume: "cache", Trust: "read",
			Size: "1Gi", StorageClass: "layercache", MountPath: "/cache", Setuid: claim}
		data, _ := json.Marshal([]v1alpha1.Claim{c})
		p.Annotations[v1alpha1.AnnotationClaims] = string(data)
		if ask {
			p.Annotations[v1alpha1.AnnotationSetuid] = "true"
		}
		return p
	}
	ns := s.namespace()
	s.create(setuidPod(ns, "refused", true, true))
	s.create(setuidPod(ns, "forged", false, true))
	s.eventually("the refusals", func() bool {
		return strings.Contains(s.events(ns, "refused"), "label namespace "+ns+" layercache.io/setuid=allow") &&
			strings.Contains(s.events(ns, "forged"), "setuid true, but the pod's annotation layercache.io/setuid")
	})
	for _, name := range []string{"refused-tools-x1", "forged-tools-x1"} {
		if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: name}, &corev1.PersistentVolumeClaim{}); !apierrors.IsNotFound(err) {
			t.Errorf("claim %s was created: %v", name, err)
		}
	}

	allowing := s.namespace()
	s.labelNamespace(allowing, v1alpha1.LabelSetuid, v1alpha1.SetuidAllow)
	for _, ask := range []bool{true, false} {
		name := "plain"
		if ask {
			name = "setuid"
		}
		s.create(setuidPod(allowing, name, ask, ask))
		pv := s.schedule(s.pvc(allowing, name+"-tools-x1"))
		if got := pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrSetuid]; (got == "true") != ask {
			t.Errorf("pod %s: its PV says %s=%q", name, v1alpha1.AttrSetuid, got)
		}
	}
}
