package controllers_test

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/testenv"
)

// The manager's rights past RBAC, and the frozen layercache.io/ keys
// (config/manager/policy.yaml), with the manager's own ClusterRole, on a
// real API server. On main, RBAC alone let the manager's identity swap the
// image of an unrelated pod and delete any claim, and anyone who may patch
// a claim add a restore-from to it.
func TestManagerPolicyAndFrozenKeys(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	env.Apply(t, "config/rbac/role.yaml", "config/rbac/role_binding.yaml", "config/manager/policy.yaml")
	admin := env.Client
	manager := env.ServiceAccount(t, "layercache-system", "layercache-controller-manager", nil)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "policy-"}}
	if err := admin.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	pod := func(name string, labels map[string]string, gates ...string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns.Name, Labels: labels,
			Annotations: map[string]string{v1alpha1.AnnotationCommitOnFailure: "false"}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "busybox"}}}}
		for _, g := range gates {
			p.Spec.SchedulingGates = append(p.Spec.SchedulingGates, corev1.PodSchedulingGate{Name: g})
		}
		if err := admin.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	claim := func(name, class string) *corev1.PersistentVolumeClaim {
		c := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns.Name,
			Labels: map[string]string{v1alpha1.LabelCache: "main"}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &class, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}}}
		if err := admin.Create(ctx, c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	unrelated := pod("unrelated", nil)
	build := pod("build", map[string]string{v1alpha1.LabelCache: "main"}, v1alpha1.SchedulingGate, "other.example.com/gate")
	ours, theirs := claim("ours", "layercache"), claim("theirs", "fast-ssd")

	change := func(c client.Client, obj client.Object, mutate func()) error {
		if err := admin.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(obj.DeepCopyObject().(client.Object))
		mutate()
		return c.Patch(ctx, obj, patch)
	}
	swapImage := func(p *corev1.Pod) func() { return func() { p.Spec.Containers[0].Image = "evil" } }
	// The policies take effect once the API server has compiled them, each
	// in its own time: probe both, with dry runs that change nothing.
	probes := map[string]func() error{
		"layercache-manager": func() error { return changeDry(ctx, admin, manager, unrelated, swapImage(unrelated)) },
		"layercache-frozen-keys": func() error {
			return changeDry(ctx, admin, admin, build, func() { build.Annotations[v1alpha1.AnnotationCommitOnFailure] = "true" })
		},
	}
	for name, probe := range probes {
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			err := probe()
			if apierrors.IsForbidden(err) || apierrors.IsInvalid(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the policy %s never took effect: %v", name, err)
			}
		}
	}
	denied := map[string]func() error{
		"the manager: an unrelated pod's image": func() error { return change(manager, unrelated, swapImage(unrelated)) },
		"the manager: a build pod's image":      func() error { return change(manager, build, swapImage(build)) },
		"the manager: a build pod's labels":     func() error { return change(manager, build, func() { build.Labels["x"] = "y" }) },
		"the manager: a gate added": func() error {
			return change(manager, build, func() {
				build.Spec.SchedulingGates = append(build.Spec.SchedulingGates, corev1.PodSchedulingGate{Name: "new"})
			})
		},
		"the manager: another class's claim deleted": func() error { return manager.Delete(ctx, theirs) },
		"the manager: an unrelated pod deleted":      func() error { return manager.Delete(ctx, unrelated) },
		"anyone: a restore-from added to a claim": func() error {
			return change(admin, ours, func() { metav1.SetMetaDataAnnotation(&ours.ObjectMeta, v1alpha1.AnnotationRestoreFrom, "secrets") })
		},
		"anyone: a pod's commit-on-failure changed": func() error {
			return change(admin, build, func() { build.Annotations[v1alpha1.AnnotationCommitOnFailure] = "true" })
		},
		"anyone: a pod's cache label removed": func() error { return change(admin, build, func() { delete(build.Labels, v1alpha1.LabelCache) }) },
	}
	for what, do := range denied {
		if err := do(); !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("%s: %v, want refused", what, err)
		}
	}
	allowed := map[string]func() error{
		"the manager: a build pod's gate removed": func() error {
			return change(manager, build, func() { build.Spec.SchedulingGates = build.Spec.SchedulingGates[1:] })
		},
		"anyone: another annotation of a pod": func() error {
			return change(admin, build, func() { build.Annotations["example.com/note"] = "x" })
		},
		"the manager: a claim of our class deleted": func() error { return manager.Delete(ctx, ours) },
		"the manager: a build pod deleted":          func() error { return manager.Delete(ctx, build) },
	}
	for _, what := range []string{"the manager: a build pod's gate removed", "anyone: another annotation of a pod", "the manager: a claim of our class deleted",
		"the manager: a build pod deleted"} {
		if err := allowed[what](); err != nil {
			t.Errorf("%s: refused: %v", what, err)
		}
	}
}

// changeDry is a dry run, by c, of mutate on obj (read fresh by admin): the
// admission chain runs, nothing is stored.
func changeDry(ctx context.Context, admin, c client.Client, obj client.Object, mutate func()) error {
	if err := admin.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		return err
	}
	patch := client.MergeFrom(obj.DeepCopyObject().(client.Object))
	mutate()
	return c.Patch(ctx, obj, patch, client.DryRunAll)
}
