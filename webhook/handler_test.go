package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// cacheReader serves one Cache from memory, deep-copied as the informer
// cache does; it stands in for the manager's cache in the benchmark.
type cacheReader struct{ cache *v1alpha1.Cache }

func (r cacheReader) Get(_ context.Context, key client.ObjectKey, obj client.Object, _ ...client.GetOption) error {
	if r.cache == nil || key.Name != r.cache.Name || key.Namespace != r.cache.Namespace {
		return apierrors.NewNotFound(v1alpha1.GroupVersion.WithResource("caches").GroupResource(), key.Name)
	}
	r.cache.DeepCopyInto(obj.(*v1alpha1.Cache))
	return nil
}

func (r cacheReader) List(context.Context, client.ObjectList, ...client.ListOption) error {
	return fmt.Errorf("not implemented")
}

func newMutator(t testing.TB, cache *v1alpha1.Cache) *PodMutator {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	return &PodMutator{Cache: cacheReader{cache}, Decoder: admission.NewDecoder(scheme), Options: testOptions}
}

func admissionRequest(t testing.TB, pod *corev1.Pod) admission.Request {
	raw, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	return admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		Operation: admissionv1.Create, Namespace: "ci", Object: runtime.RawExtension{Raw: raw},
	}}
}

func tenNodeCache() *v1alpha1.Cache {
	c := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Name: "example-project", Namespace: "ci"}}
	for i := range 10 {
		at := metav1.NewTime(time.Unix(1_700_000_000+int64(i), 0))
		c.Status.Nodes = append(c.Status.Nodes, v1alpha1.NodeCacheStatus{Node: fmt.Sprintf("node-%d", i), Generation: int64(i), LastCommitTime: &at})
	}
	return c
}

// A pod the webhook already mutated (reinvocation) is left as it is.
func TestHandleIsIdempotent(t *testing.T) {
	m := newMutator(t, tenNodeCache())
	p := testPod(cacheLabel("example-project"), nil)
	p.Namespace = "" // as pods from templates arrive
	resp := m.Handle(context.Background(), admissionRequest(t, p))
	if !resp.Allowed || len(resp.Patches) == 0 {
		t.Fatalf("first admission: allowed=%v patches=%d %v", resp.Allowed, len(resp.Patches), resp.Result)
	}
	// Apply the patch by mutating the way the handler does, then admit again.
	again := testPod(cacheLabel("example-project"), nil)
	plan, err := makePlan(again, testOptions)
	if err != nil {
		t.Fatal(err)
	}
	if err := apply(again, plan, []*v1alpha1.Cache{tenNodeCache()}, testOptions, randomSuffix); err != nil {
		t.Fatal(err)
	}
	resp = m.Handle(context.Background(), admissionRequest(t, again))
	if !resp.Allowed || len(resp.Patches) != 0 {
		t.Fatalf("reinvocation changed the pod: %+v", resp.Patches)
	}
	var paths []string
	for _, p := range m.Handle(context.Background(), admissionRequest(t, testPod(cacheLabel("example-project"), nil))).Patches {
		paths = append(paths, p.Path)
	}
	for _, want := range []string{"/spec/affinity", "/metadata/annotations"} {
		if !slices.Contains(paths, want) {
			t.Errorf("patch paths %v lack %s", paths, want)
		}
	}
}

// BenchmarkAdmission measures one in-process admission (decode, validate,
// read a Cache of 10 nodes, mutate, compute the JSON patch) and reports its
// 99th percentile.
func BenchmarkAdmission(b *testing.B) {
	m := newMutator(b, tenNodeCache())
	req := admissionRequest(b, testPod(map[string]string{v1alpha1.LabelCache: "example-project", v1alpha1.LabelTrust: "write"},
		map[string]string{v1alpha1.AnnotationMountPath: "/root/.m2"}))
	ctx := context.Background()
	durations := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		resp := m.Handle(ctx, req)
		durations = append(durations, time.Since(start))
		if !resp.Allowed || len(resp.Patches) == 0 {
			b.Fatalf("not mutated: %v", resp.Result)
		}
	}
	b.StopTimer()
	slices.Sort(durations)
	b.ReportMetric(float64(durations[len(durations)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(durations[len(durations)/2].Microseconds()), "p50-µs")
}

// A cache that no node holds yet prefers the nodes of its first fallback
// that a node holds.
func TestFallbackNodesArePreferred(t *testing.T) {
	m := newMutator(t, tenNodeCache())
	pod := admitted(t, m, testPod(cacheLabel("feature-x"), map[string]string{v1alpha1.AnnotationRestoreFrom: "nothing-yet,example-project"}))
	if pod.Spec.Affinity == nil || pod.Spec.Affinity.NodeAffinity == nil {
		t.Fatal("no node affinity toward the fallback's nodes")
	}
	terms := pod.Spec.Affinity.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution
	if len(terms) != 10 || terms[0].Weight != 100 || terms[0].Preference.MatchFields[0].Values[0] != "node-9" {
		t.Fatalf("preferred terms = %+v, want the 10 nodes of example-project, node-9 first", terms)
	}
	// Without the annotation: no affinity (feature-x is on no node).
	if pod := admitted(t, m, testPod(cacheLabel("feature-x"), nil)); pod.Spec.Affinity != nil {
		t.Errorf("affinity without fallbacks: %+v", pod.Spec.Affinity)
	}
}
