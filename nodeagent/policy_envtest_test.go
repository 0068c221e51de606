package nodeagent

import (
	"context"
	"strings"
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

// agentClient acts as the node agent's service account, with a bound
// token's node name (none if node is empty).
func agentClient(t *testing.T, env *testenv.Env, node string) client.Client {
	var extra map[string][]string
	if node != "" {
		extra = map[string][]string{"authentication.kubernetes.io/node-name": {node}}
	}
	return env.ServiceAccount(t, "layercache-system", "layercache-node-agent", extra)
}

func policyPV(name, driver string, attrs, labels map[string]string) *corev1.PersistentVolume {
	return &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Finalizers: []string{v1alpha1.FinalizerNode}},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: driver, VolumeHandle: name, VolumeAttributes: attrs}},
		},
	}
}

// The node agents' admission policy (config/node-agent/policy.yaml), with
// the agent's own RBAC, on a real API server: an agent's token reaches only
// layercache PVs and NodeCaches of its own node, and changes on a PV only
// its finalizers; a token without a node name reaches nothing. On main,
// with RBAC alone, every one of the refused requests passed.
func TestAgentReachesOnlyItsOwnNode(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	env.Apply(t, "config/node-agent/role.yaml", "config/node-agent/role_binding.yaml", "config/node-agent/policy.yaml")
	admin := env.Client
	for _, pv := range []*corev1.PersistentVolume{
		policyPV("pv-a", v1alpha1.DriverName, map[string]string{v1alpha1.AttrNode: "node-a"}, nil),
		policyPV("pv-a2", v1alpha1.DriverName, map[string]string{v1alpha1.AttrNode: "node-a"}, nil),
		policyPV("pv-b", v1alpha1.DriverName, map[string]string{v1alpha1.AttrNode: "node-b"}, nil),
		// Provisioned before the node attribute: the node label says.
		policyPV("pv-old-a", v1alpha1.DriverName, nil, map[string]string{v1alpha1.LabelNode: "node-a"}),
		// Another driver's, labelled as ours.
		policyPV("pv-foreign", "other.example.com", map[string]string{v1alpha1.AttrNode: "node-a"}, map[string]string{v1alpha1.LabelNode: "node-a"}),
	} {
		if err := admin.Create(ctx, pv); err != nil {
			t.Fatal(err)
		}
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "policy-"}}
	if err := admin.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	nodeCache := func(node string) *v1alpha1.NodeCache {
		return &v1alpha1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.NodeCacheName("c", node), Namespace: ns.Name},
			Spec: v1alpha1.NodeCacheSpec{Cache: "c", Node: node}}
	}
	if err := admin.Create(ctx, nodeCache("node-b")); err != nil {
		t.Fatal(err)
	}
	a, noNode := agentClient(t, env, "node-a"), agentClient(t, env, "")

	// The policy takes effect once the API server has compiled it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		pv := &corev1.PersistentVolume{}
		if err := admin.Get(ctx, client.ObjectKey{Name: "pv-b"}, pv); err != nil {
			t.Fatal(err)
		}
		pv.Spec.PersistentVolumeReclaimPolicy = corev1.PersistentVolumeReclaimDelete
		err := a.Update(ctx, pv, client.DryRunAll)
		if apierrors.IsInvalid(err) || apierrors.IsForbidden(err) && strings.Contains(err.Error(), "ValidatingAdmissionPolicy") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the policy never took effect: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	removeFinalizer := func(c client.Client, name string) error {
		pv := &corev1.PersistentVolume{}
		if err := admin.Get(ctx, client.ObjectKey{Name: name}, pv); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(pv.DeepCopy())
		pv.Finalizers = nil
		return c.Patch(ctx, pv, patch)
	}
	changePV := func(c client.Client, name string, change func(*corev1.PersistentVolume)) error {
		pv := &corev1.PersistentVolume{}
		if err := admin.Get(ctx, client.ObjectKey{Name: name}, pv); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(pv.DeepCopy())
		change(pv)
		return c.Patch(ctx, pv, patch)
	}
	patchStatus := func(c client.Client, node string) error {
		nc := &v1alpha1.NodeCache{}
		if err := admin.Get(ctx, client.ObjectKeyFromObject(nodeCache(node)), nc); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(nc.DeepCopy())
		nc.Status = v1alpha1.NodeCacheStatus{Node: node, Generation: 7, Layers: 1, Size: resource.MustParse("1Ki")}
		return c.Status().Patch(ctx, nc, patch)
	}
	deletePV := func(c client.Client, name string) error {
		return c.Delete(ctx, &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}})
	}
	reclaimDelete := func(pv *corev1.PersistentVolume) {
		pv.Spec.PersistentVolumeReclaimPolicy = corev1.PersistentVolumeReclaimDelete
	}
	annotate := func(pv *corev1.PersistentVolume) {
		pv.Annotations = map[string]string{v1alpha1.AnnotationPodPhase: "Succeeded"}
	}

	overLimit := func(pv *corev1.PersistentVolume) {
		metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationOverLimit, "volume over its size")
	}

	denied := map[string]func() error{
		"another node's PV: over its bound":       func() error { return changePV(a, "pv-b", overLimit) },
		"another node's PV: its finalizer":        func() error { return removeFinalizer(a, "pv-b") },
		"another node's PV: deleted":              func() error { return deletePV(a, "pv-b") },
		"another driver's PV: its reclaim policy": func() error { return changePV(a, "pv-foreign", reclaimDelete) },
		"another driver's PV: deleted":            func() error { return deletePV(a, "pv-foreign") },
		"its own PV: its reclaim policy":          func() error { return changePV(a, "pv-a", reclaimDelete) },
		"its own PV: the pod's phase":             func() error { return changePV(a, "pv-a", annotate) },
		"a PV: created": func() error {
			return a.Create(ctx, policyPV("pv-new", v1alpha1.DriverName, map[string]string{v1alpha1.AttrNode: "node-a"}, nil))
		},
		"another node's NodeCache: its status": func() error { return patchStatus(a, "node-b") },
		"another node's NodeCache: created":    func() error { return a.Create(ctx, nodeCache("node-c")) },
		"another node's NodeCache: deleted":    func() error { return a.Delete(ctx, nodeCache("node-b")) },
		"its own NodeCache: created granted": func() error {
			nc := nodeCache("node-a")
			nc.Name = v1alpha1.NodeCacheName("granted", "node-a")
			nc.Spec.Cache, nc.Spec.CommitGranted = "granted", &metav1.Time{Time: time.Now()}
			return a.Create(ctx, nc)
		},
		"no node name: its own PV's finalizer": func() error { return removeFinalizer(noNode, "pv-a") },
		"no node name: a NodeCache's status":   func() error { return patchStatus(noNode, "node-b") },
		"its own NodeCache: moved to another node": func() error {
			nc := &v1alpha1.NodeCache{}
			if err := admin.Get(ctx, client.ObjectKeyFromObject(nodeCache("node-a")), nc); err != nil {
				return err
			}
			nc.Spec.Node = "node-b"
			return a.Update(ctx, nc)
		},
	}
	allowed := []struct {
		what string
		do   func() error
	}{
		{"its own NodeCache: created", func() error { return a.Create(ctx, nodeCache("node-a")) }},
		{"its own NodeCache: its status", func() error { return patchStatus(a, "node-a") }},
		{"its own PV: over its bound", func() error { return changePV(a, "pv-a", overLimit) }},
		{"its own PV: its finalizer", func() error { return removeFinalizer(a, "pv-a") }},
		{"its own PV of before the node attribute: its finalizer", func() error { return removeFinalizer(a, "pv-old-a") }},
		{"its own PV: deleted", func() error { return deletePV(a, "pv-a2") }},
		{"its own NodeCache: deleted", func() error { return a.Delete(ctx, nodeCache("node-a")) }},
	}
	for _, step := range allowed[:2] {
		if err := step.do(); err != nil {
			t.Errorf("%s: refused: %v", step.what, err)
		}
	}
	for what, do := range denied {
		if err := do(); err == nil {
			t.Errorf("%s: allowed, want refused", what)
		} else if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("%s: %v, want refused by the policy", what, err)
		}
	}
	for _, step := range allowed[2:] {
		if err := step.do(); err != nil {
			t.Errorf("%s: refused: %v", step.what, err)
		}
	}
}
