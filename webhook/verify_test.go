package webhook

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// admitted runs the handler on pod and returns the pod as the API server
// stores it (the handler's patch applied).
func admitted(t *testing.T, m *PodMutator, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	req := admissionRequest(t, pod)
	resp := m.Handle(context.Background(), req)
	if !resp.Allowed {
		t.Fatalf("denied: %v", resp.Result)
	}
	patch, err := json.Marshal(resp.Patches)
	if err != nil {
		t.Fatal(err)
	}
	out := req.Object.Raw
	if len(resp.Patches) > 0 {
		p, err := jsonpatch.DecodePatch(patch)
		if err != nil {
			t.Fatal(err)
		}
		if out, err = p.Apply(out); err != nil {
			t.Fatal(err)
		}
	}
	got := &corev1.Pod{}
	if err := json.Unmarshal(out, got); err != nil {
		t.Fatal(err)
	}
	return got
}

func withExtraCaches(p *corev1.Pod) *corev1.Pod {
	p.Annotations = map[string]string{v1alpha1.AnnotationCaches: "npm=/root/.npm,go=/go/pkg", v1alpha1.AnnotationSize: "2Gi",
		v1alpha1.AnnotationRestoreFrom: "main"}
	p.Labels[v1alpha1.LabelTrust] = "write"
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "cache", MountPath: "/m2"}}
	return p
}

// A pod this webhook mutated comes back when a later webhook changes it
// (reinvocation): it passes unchanged, even with a sidecar and a volume
// added after us.
func TestReinvocationPasses(t *testing.T) {
	m := newMutator(t, nil)
	first := admitted(t, m, withExtraCaches(testPod(cacheLabel("maven"), nil)))
	if len(claimsOf(t, first)) != 3 {
		t.Fatalf("claims = %+v", claimsOf(t, first))
	}
	if g := first.Spec.SchedulingGates; len(g) != 1 || g[0].Name != v1alpha1.SchedulingGate {
		t.Fatalf("gates = %v", g)
	}
	// Another webhook adds a sidecar and its volume.
	first.Spec.Containers = append(first.Spec.Containers, corev1.Container{Name: "proxy", Image: "envoy",
		VolumeMounts: []corev1.VolumeMount{{Name: "proxy-config", MountPath: "/etc/envoy"}}})
	first.Spec.Volumes = append(first.Spec.Volumes, corev1.Volume{Name: "proxy-config"})
	resp := m.Handle(context.Background(), admissionRequest(t, first))
	if !resp.Allowed || len(resp.Patches) != 0 {
		t.Fatalf("reinvocation: allowed=%v patches=%v result=%v", resp.Allowed, resp.Patches, resp.Result)
	}

	// A volume picked by where it is mounted (a Tekton workspace).
	ws := admitted(t, m, testPod(cacheLabel("gocache"), map[string]string{v1alpha1.AnnotationVolumeAt: "/workspace/cache"}, func(p *corev1.Pod) {
		p.Spec.Volumes = []corev1.Volume{{Name: "ws-k2x9q", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "ws-k2x9q", MountPath: "/workspace/cache"}}
	}))
	if c := claimsOf(t, ws); len(c) != 1 || c[0].Volume != "ws-k2x9q" || ws.Spec.Volumes[0].PersistentVolumeClaim == nil {
		t.Fatalf("volume-at: claims %+v, volumes %+v", c, ws.Spec.Volumes)
	}
	if resp := m.Handle(context.Background(), admissionRequest(t, ws)); !resp.Allowed || len(resp.Patches) != 0 {
		t.Fatalf("volume-at reinvocation: allowed=%v patches=%v result=%v", resp.Allowed, resp.Patches, resp.Result)
	}
}

// A pod that writes the claims annotation itself is denied unless it wrote
// exactly what the webhook would have: the manager creates what it lists.
func TestForgedClaimsAreDenied(t *testing.T) {
	m := newMutator(t, nil)
	good := admitted(t, m, withExtraCaches(testPod(cacheLabel("maven"), nil)))
	forge := func(change func(p *corev1.Pod, claims []v1alpha1.Claim)) *corev1.Pod {
		p := good.DeepCopy()
		claims := claimsOf(t, p)
		change(p, claims)
		data, _ := json.Marshal(claims)
		p.Annotations[v1alpha1.AnnotationClaims] = string(data)
		return p
	}
	tests := []struct {
		name string
		pod  *corev1.Pod
		want string
	}{
		{"a huge size", forge(func(_ *corev1.Pod, c []v1alpha1.Claim) { c[0].Size = "50Ti" }), "claim 1 is"},
		{"another class", forge(func(_ *corev1.Pod, c []v1alpha1.Claim) { c[1].StorageClass = "fast-ssd" }), "claim 2 is"},
		{"write for a reader", forge(func(p *corev1.Pod, _ []v1alpha1.Claim) { p.Labels[v1alpha1.LabelTrust] = "read" }), "claim 1 is"},
		{"a cache the labels do not ask for", forge(func(_ *corev1.Pod, c []v1alpha1.Claim) { c[2].Cache = "secrets" }), "claim 3 is"},
		{"a claim name of its choosing", forge(func(p *corev1.Pod, c []v1alpha1.Claim) {
			c[0].ClaimName = "someone-elses-claim"
			p.Spec.Volumes[0].PersistentVolumeClaim.ClaimName = "someone-elses-claim"
		}), "claim 1 is"},
		{"a claim its volume does not reference", forge(func(p *corev1.Pod, _ []v1alpha1.Claim) {
			p.Spec.Volumes[0].PersistentVolumeClaim.ClaimName = "other"
		}), `volume "cache" does not reference claim`},
		{"one claim too many", forge(func(p *corev1.Pod, c []v1alpha1.Claim) {
			p.Annotations[v1alpha1.AnnotationCaches] = "npm=/root/.npm"
		}), "lists 3 claims"},
		{"fallbacks the annotations do not ask for", forge(func(_ *corev1.Pod, c []v1alpha1.Claim) { c[0].RestoreFrom = []string{"secrets"} }), "claim 1 is"},
		{"not JSON", func() *corev1.Pod {
			p := good.DeepCopy()
			p.Annotations[v1alpha1.AnnotationClaims] = "[{"
			return p
		}(), "not a JSON list"},
		{"an empty list", func() *corev1.Pod {
			p := good.DeepCopy()
			p.Annotations[v1alpha1.AnnotationClaims] = "[]"
			return p
		}(), "not a JSON list"},
		{"a hand-made pod", func() *corev1.Pod {
			p := testPod(cacheLabel("maven"), map[string]string{v1alpha1.AnnotationClaims: `[{"cache":"maven","claimName":"big","volume":"cache","trust":"read","size":"50Ti","storageClass":"layercache"}]`})
			p.Spec.Volumes = []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "big"}}}}
			return p
		}(), "does not match this pod"},
	}
	for _, tt := range tests {
		resp := m.Handle(context.Background(), admissionRequest(t, tt.pod))
		if resp.Allowed || !strings.Contains(resp.Result.Message, tt.want) {
			t.Errorf("%s: allowed=%v message=%q, want a denial containing %q", tt.name, resp.Allowed, resp.Result.Message, tt.want)
		}
	}
}

func TestSizeAboveTheMaximumIsDenied(t *testing.T) {
	m := newMutator(t, nil)
	m.Options.MaxSize = resource.MustParse("100Gi")
	resp := m.Handle(context.Background(), admissionRequest(t, testPod(cacheLabel("maven"), map[string]string{v1alpha1.AnnotationSize: "200Gi"})))
	if resp.Allowed || !strings.Contains(resp.Result.Message, `annotation layercache.io/size="200Gi": must be at most 100Gi`) {
		t.Fatalf("allowed=%v message=%q", resp.Allowed, resp.Result.Message)
	}
}
