// Package webhook is layercache's mutating admission webhook for pods: a
// pod labelled layercache.io/cache gets a volume that references a
// generated PVC (the manager creates it), mounts, the claim's parameters in
// an annotation, and a preferred node affinity toward the nodes that hold
// the cache. It has no side effects: it writes nothing to the API.
package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=get;list;watch

// Path is where the pod webhook is served.
const Path = "/mutate--v1-pod"

// lookupTimeout bounds a Cache read: without it the pod still gets its
// volume, only without the affinity.
const lookupTimeout = time.Second

// PodMutator is the admission handler.
type PodMutator struct {
	// Cache reads Caches from the manager's informer cache; APIReader
	// reads the API directly when the cache has no such Cache.
	Cache, APIReader client.Reader
	Decoder          admission.Decoder
	Options          Options
	// suffix makes the random part of claim names (tests pin it).
	suffix func() string
}

// Setup registers the webhook with the manager's webhook server, and has
// the manager watch Caches from the start so that reads never wait for an
// informer to sync.
func Setup(mgr manager.Manager, opts Options) error {
	if opts.StorageClass == "" {
		opts.StorageClass = v1alpha1.DefaultStorageClass
	}
	if opts.DefaultSize.IsZero() {
		return fmt.Errorf("webhook: the default volume size must be positive")
	}
	if _, err := mgr.GetCache().GetInformer(context.Background(), &v1alpha1.Cache{}); err != nil {
		return fmt.Errorf("webhook: watching Caches: %w", err)
	}
	m := &PodMutator{
		Cache: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Decoder: admission.NewDecoder(mgr.GetScheme()), Options: opts,
	}
	var h http.Handler = &webhook.Admission{Handler: m}
	if opts.Wrap != nil {
		h = opts.Wrap(h)
	}
	mgr.GetWebhookServer().Register(Path, h)
	return nil
}

// Handle implements admission.Handler.
func (m *PodMutator) Handle(ctx context.Context, req admission.Request) admission.Response {
	if req.Operation != admissionv1.Create {
		return admission.Allowed("layercache mutates pods at creation only")
	}
	pod := &corev1.Pod{}
	if err := m.Decoder.Decode(req, pod); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	// Pods from templates have no namespace (and no name) yet.
	if pod.Namespace == "" {
		pod.Namespace = req.Namespace
	}
	if _, ok := pod.Labels[v1alpha1.LabelCache]; !ok {
		return admission.Allowed("no " + v1alpha1.LabelCache + " label")
	}
	if raw, ok := pod.Annotations[v1alpha1.AnnotationClaims]; ok {
		// Reinvocation, or a pod that wrote the annotation itself: the
		// manager acts on it, so it must be exactly what we would write.
		if err := verifyClaims(pod, raw, m.Options); err != nil {
			return admission.Denied("layercache: " + err.Error())
		}
		return admission.Allowed("already mutated by layercache")
	}
	p, err := makePlan(pod, m.Options)
	if err != nil {
		return admission.Denied("layercache: " + err.Error())
	}
	if err := m.checkNamespace(ctx, pod); err != nil {
		return admission.Denied("layercache: " + err.Error())
	}
	caches := make([]*v1alpha1.Cache, len(p.requests))
	for i, r := range p.requests {
		caches[i] = m.lookup(ctx, pod.Namespace, r.cache)
	}
	// A cache that no node holds yet starts from its first fallback that
	// one does: prefer that one's nodes.
	if c := caches[0]; c == nil || len(c.Status.Nodes) == 0 {
		for _, name := range p.restoreFrom {
			if f := m.lookup(ctx, pod.Namespace, name); f != nil && len(f.Status.Nodes) > 0 {
				caches = append(caches, f)
				break
			}
		}
	}
	suffix := m.suffix
	if suffix == nil {
		suffix = randomSuffix
	}
	if err := apply(pod, p, caches, m.Options, suffix); err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	data, err := json.Marshal(pod)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	resp := admission.PatchResponseFromRaw(req.Object.Raw, data)
	resp.Warnings = p.warnings
	return resp
}

// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get

// checkNamespace refuses a privileged or host-namespace pod a cache, and
// setuid to a pod that asks for it, unless its namespace opts in
// (v1alpha1.LabelPrivileged, v1alpha1.LabelSetuid).
func (m *PodMutator) checkNamespace(ctx context.Context, pod *corev1.Pod) error {
	if !v1alpha1.NamespaceMustAllow(pod) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	ns := &corev1.Namespace{}
	if err := m.APIReader.Get(ctx, client.ObjectKey{Name: pod.Namespace}, ns); err != nil {
		return fmt.Errorf("namespace %s could not be read to see whether it allows what the pod asks for: %w", pod.Namespace, err)
	}
	return v1alpha1.CheckNamespace(pod, ns)
}

// lookup returns the Cache, or nil if there is none or it cannot be read in
// time: the affinity is a preference, never a reason to fail a pod.
func (m *PodMutator) lookup(ctx context.Context, ns, name string) *v1alpha1.Cache {
	ctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	key := client.ObjectKey{Namespace: ns, Name: name}
	c := &v1alpha1.Cache{}
	err := m.Cache.Get(ctx, key, c)
	if apierrors.IsNotFound(err) && m.APIReader != nil {
		err = m.APIReader.Get(ctx, key, c)
	}
	if err != nil {
		if !apierrors.IsNotFound(err) {
			logf.FromContext(ctx).Error(err, "Reading the Cache failed; no node affinity added", "cache", klog.KRef(ns, name))
		}
		return nil
	}
	return c
}
