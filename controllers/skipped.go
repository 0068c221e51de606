package controllers

import (
	"context"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// ReasonCacheSkipped is the event of a labelled pod that was admitted
// without its cache: the webhook (which fails open) did not answer.
const ReasonCacheSkipped = "CacheSkipped"

var podsUncached = prometheus.NewCounter(prometheus.CounterOpts{
	Name: "layercache_pods_uncached_total",
	Help: "Labelled pods admitted without their cache because the webhook did not answer (counted again for a pod still running when the manager restarts).",
})

func init() { metrics.Registry.MustRegister(podsUncached) }

// SkippedReconciler is the backstop of the fail-open webhook: the API
// server admits a labelled pod unchanged when the webhook does not answer
// (failurePolicy Ignore), and says so only in its audit log. The
// reconciler gives such a pod an event and counts it. It never changes the
// pod: the build runs uncached, as written.
type SkippedReconciler struct {
	client.Client
	// APIReader lists events (the manager caches none).
	APIReader client.Reader
	Recorder  record.EventRecorder
	// Exempt are the namespaces the webhook never sees (its own and
	// kube-system): their labelled pods are not skipped, only not ours.
	Exempt []string

	mu   sync.Mutex
	seen map[types.NamespacedName]types.UID // told, until the pod is gone
}

// +kubebuilder:rbac:groups="",resources=events,verbs=list

// SetupWithManager registers the reconciler for labelled pods without the
// claims annotation.
func (r *SkippedReconciler) SetupWithManager(mgr ctrl.Manager) error {
	unmutated := predicate.NewPredicateFuncs(func(o client.Object) bool {
		_, labelled := o.GetLabels()[v1alpha1.LabelCache]
		_, mutated := o.GetAnnotations()[v1alpha1.AnnotationClaims]
		return labelled && !mutated && !slices.Contains(r.Exempt, o.GetNamespace())
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("skipped").
		For(&corev1.Pod{}, builder.WithPredicates(unmutated, predicate.Funcs{
			// A pod is admitted once: its creation (or the first list)
			// tells, its deletion forgets it.
			UpdateFunc: func(event.UpdateEvent) bool { return false },
		})).
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *SkippedReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[types.NamespacedName]types.UID{}
	}
	pod := &corev1.Pod{}
	if err := r.Get(ctx, req.NamespacedName, pod); err != nil {
		if apierrors.IsNotFound(err) {
			delete(r.seen, req.NamespacedName)
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if pod.DeletionTimestamp != nil || r.seen[req.NamespacedName] == pod.UID {
		return ctrl.Result{}, nil
	}
	// A pod admitted while no replica led may have ended since, and a
	// restarted manager sees again the pods it told: the event itself
	// says whether it was told (events live an hour).
	told, err := r.told(ctx, pod)
	if err != nil {
		return ctrl.Result{}, err
	}
	r.seen[req.NamespacedName] = pod.UID
	if told {
		return ctrl.Result{}, nil
	}
	podsUncached.Inc()
	r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonCacheSkipped,
		"The layercache webhook was unreachable when this pod was created: it runs without cache %q", pod.Labels[v1alpha1.LabelCache])
	return ctrl.Result{}, nil
}

// told: the pod has its CacheSkipped event.
func (r *SkippedReconciler) told(ctx context.Context, pod *corev1.Pod) (bool, error) {
	events := &corev1.EventList{}
	err := r.APIReader.List(ctx, events, client.InNamespace(pod.Namespace), client.MatchingFieldsSelector{
		Selector: fields.AndSelectors(fields.OneTermEqualSelector("involvedObject.uid", string(pod.UID)),
			fields.OneTermEqualSelector("reason", ReasonCacheSkipped))})
	return len(events.Items) > 0, err
}
