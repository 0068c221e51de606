//go:build e2e

package e2e

import (
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// agentToken is a token of the node agent's service account: bound to the
// agent pod on node (it then carries the node's name, as the agent's own
// projected token does), or to nothing if node is empty.
func (e *env) agentToken(node string) client.Client {
	e.t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(600))}}
	if node != "" {
		pod := e.agentOn(node)
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tok, err := cs.CoreV1().ServiceAccounts("layercache-system").CreateToken(e.ctx, "layercache-node-agent", req, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	admin, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := rest.AnonymousClientConfig(admin)
	cfg.BearerToken = tok.Status.Token
	cl, err := client.New(cfg, client.Options{Scheme: c.Scheme()})
	if err != nil {
		e.t.Fatal(err)
	}
	return cl
}

// One node's agent token reaches only its own node's objects (the
// ValidatingAdmissionPolicy of config/node-agent): another node's
// NodeCache status and a PV that is not layercache's are out of its reach,
// and a token of the agent's service account without a node name reaches
// nothing. On main, with RBAC alone, node2's token patched both.
func TestAgentTokenReachesOnlyItsNode(t *testing.T) {
	e := newEnv(t)
	e.needNodes()
	nc := &v1alpha1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.NodeCacheName("contained", "node3"), Namespace: e.ns},
		Spec: v1alpha1.NodeCacheSpec{Cache: "contained", Node: "node3"}}
	e.create(nc)
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: e.ns + "-foreign"},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			PersistentVolumeSource:        corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/nonexistent"}},
		},
	}
	e.create(pv)
	t.Cleanup(func() { _ = c.Delete(e.ctx, pv) })

	statusPatch := func(cl client.Client) error {
		got := &v1alpha1.NodeCache{}
		if err := c.Get(e.ctx, client.ObjectKeyFromObject(nc), got); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(got.DeepCopy())
		got.Status = v1alpha1.NodeCacheStatus{Node: "node3", Generation: 99, Layers: 1, Size: resource.MustParse("1Ki")}
		return cl.Status().Patch(e.ctx, got, patch)
	}
	reclaim := func(cl client.Client) error {
		got := &corev1.PersistentVolume{}
		if err := c.Get(e.ctx, client.ObjectKeyFromObject(pv), got); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(got.DeepCopy())
		got.Spec.PersistentVolumeReclaimPolicy = corev1.PersistentVolumeReclaimDelete
		return cl.Patch(e.ctx, got, patch)
	}
	for name, cl := range map[string]client.Client{"node2's agent token": e.agentToken("node2"), "a token without a node": e.agentToken("")} {
		if err := statusPatch(cl); !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("%s patched node3's NodeCache status: %v", name, err)
		}
		if err := reclaim(cl); !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("%s set a foreign PV's reclaim policy: %v", name, err)
		}
	}
	// node3's own agent may write its NodeCache's status.
	if err := statusPatch(e.agentToken("node3")); err != nil {
		t.Errorf("node3's agent token was refused its own NodeCache's status: %v", err)
	}
	got := &corev1.PersistentVolume{}
	if err := c.Get(e.ctx, client.ObjectKeyFromObject(pv), got); err != nil || got.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimRetain {
		t.Errorf("the foreign PV's reclaim policy is %s (%v)", got.Spec.PersistentVolumeReclaimPolicy, err)
	}
}
