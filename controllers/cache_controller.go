package controllers

import (
	"context"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// Condition types and reasons of a Cache.
const (
	ConditionReady   = "Ready"
	ReasonCommitted  = "Committed"
	ReasonNoData     = "NoData"
	ReasonFrozen     = "ReadOnly"
	summaryMaxNodes  = 3
	summaryNodesMore = ",..."
)

// CacheReconciler keeps a Cache's summary (the columns of `kubectl get
// caches`) and Ready condition in line with the per-node entries that the
// node agents write.
type CacheReconciler struct {
	client.Client
}

// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=get;list;watch
// +kubebuilder:rbac:groups=layercache.io,resources=caches/status,verbs=get;update;patch

// SetupWithManager registers the reconciler.
func (r *CacheReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("cache").For(&v1alpha1.Cache{}).Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *CacheReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	c := &v1alpha1.Cache{}
	if err := r.Get(ctx, req.NamespacedName, c); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	before := c.DeepCopy()
	summarize(c)
	if equality.Semantic.DeepEqual(before.Status, c.Status) {
		return ctrl.Result{}, nil
	}
	return ctrl.Result{}, r.Status().Patch(ctx, c, client.MergeFrom(before))
}

// summarize fills the display fields and the Ready condition from
// status.nodes (newest commit first).
func summarize(c *v1alpha1.Cache) {
	nodes := slices.Clone(c.Status.Nodes)
	slices.SortStableFunc(nodes, func(a, b v1alpha1.NodeCacheStatus) int {
		switch {
		case a.LastCommitTime == nil && b.LastCommitTime == nil:
			return strings.Compare(a.Node, b.Node)
		case a.LastCommitTime == nil:
			return 1
		case b.LastCommitTime == nil:
			return -1
		}
		return b.LastCommitTime.Compare(a.LastCommitTime.Time)
	})
	var names []string
	var size *resource.Quantity
	var last *metav1.Time
	for i, n := range nodes {
		if i < summaryMaxNodes {
			names = append(names, n.Node)
		}
		if size == nil || n.Size.Cmp(*size) > 0 {
			s := n.Size.DeepCopy()
			size = &s
		}
		if n.LastCommitTime != nil && (last == nil || n.LastCommitTime.After(last.Time)) {
			last = n.LastCommitTime.DeepCopy()
		}
	}
	c.Status.NodeNames = strings.Join(names, ",")
	if len(nodes) > summaryMaxNodes {
		c.Status.NodeNames += summaryNodesMore
	}
	c.Status.Size, c.Status.LastCommitTime = size, last
	c.Status.ObservedGeneration = c.Generation
	cond := metav1.Condition{Type: ConditionReady, ObservedGeneration: c.Generation}
	switch {
	case c.Spec.ReadOnly:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonFrozen, "read-only: builds read it, nothing is committed"
	case len(nodes) == 0:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, ReasonNoData, "no node holds this cache yet"
	default:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonCommitted, "held on "+strings.Join(names, ", ")
	}
	meta.SetStatusCondition(&c.Status.Conditions, cond)
}
