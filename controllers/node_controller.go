package controllers

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/finalizers"
)

// ReasonNodeGone is the event reason on a Cache whose data on a node is
// forgotten because the node is gone.
const ReasonNodeGone = "NodeGone"

// NodeReconciler cleans up after nodes that are gone, as topolvm's node
// controller does: a node's agent holds finalizers on that node's
// NodeCaches and PVs, and nothing else would ever remove them once the
// node is deleted (a Cache or a namespace would then never finish
// deleting). Its requests are keyed by the node's label value (the name,
// or a hash of a long one: see v1alpha1.NodeLabelValue), which is what
// NodeCaches and PVs carry; Node, NodeCache and PV events all lead here,
// so the sweep also runs for what a restarted manager finds.
type NodeReconciler struct {
	client.Client
	Recorder record.EventRecorder
}

// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=persistentvolumes,verbs=get;list;watch;update;patch;delete
// +kubebuilder:rbac:groups=layercache.io,resources=nodecaches,verbs=get;list;watch;update;patch;delete

// SetupWithManager registers the reconciler.
func (r *NodeReconciler) SetupWithManager(mgr ctrl.Manager) error {
	byLabel := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		if v := o.GetLabels()[v1alpha1.LabelNode]; v != "" {
			return []reconcile.Request{{NamespacedName: client.ObjectKey{Name: v}}}
		}
		return nil
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("node").
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			return []reconcile.Request{{NamespacedName: client.ObjectKey{Name: v1alpha1.NodeLabelValue(o.GetName())}}}
		})).
		Watches(&v1alpha1.NodeCache{}, byLabel).
		Watches(&corev1.PersistentVolume{}, byLabel).
		Complete(r)
}

// Reconcile implements reconcile.Reconciler. req.Name is a node label value.
func (r *NodeReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	gone, name, err := r.nodeGone(ctx, req.Name)
	if err != nil || !gone {
		return ctrl.Result{}, err
	}
	log := logf.FromContext(ctx).WithValues("node", name)
	sel := client.MatchingLabels{v1alpha1.LabelNode: req.Name}
	ncs := &v1alpha1.NodeCacheList{}
	if err := r.List(ctx, ncs, sel); err != nil {
		return ctrl.Result{}, err
	}
	var errs []error
	for i := range ncs.Items {
		nc := &ncs.Items[i]
		if _, err := finalizers.Remove(ctx, r.Client, nc, v1alpha1.FinalizerNodeData); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := r.Delete(ctx, nc); client.IgnoreNotFound(err) != nil {
			errs = append(errs, err)
			continue
		}
		log.Info("Node is gone: forgot its data of a cache", "nodeCache", klog.KObj(nc))
		cache := &v1alpha1.Cache{}
		if r.Get(ctx, client.ObjectKey{Namespace: nc.Namespace, Name: nc.Spec.Cache}, cache) == nil {
			r.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonNodeGone, "Node %s is gone: the cache's data there is forgotten", nc.Spec.Node)
		}
	}
	pvs := &corev1.PersistentVolumeList{}
	if err := r.List(ctx, pvs, sel); err != nil {
		return ctrl.Result{}, errors.Join(append(errs, err)...)
	}
	for i := range pvs.Items {
		if err := r.forgetVolume(ctx, &pvs.Items[i]); err != nil {
			errs = append(errs, fmt.Errorf("PV %s: %w", pvs.Items[i].Name, err))
		}
	}
	return ctrl.Result{}, errors.Join(errs...)
}

// nodeGone says whether no Node (or only one being deleted) has label
// value v, and returns the name it had, for logs, if it can tell.
func (r *NodeReconciler) nodeGone(ctx context.Context, v string) (bool, string, error) {
	nodes := &corev1.NodeList{}
	if err := r.List(ctx, nodes); err != nil {
		return false, "", err
	}
	for _, n := range nodes.Items {
		if v1alpha1.NodeLabelValue(n.Name) == v && n.DeletionTimestamp == nil {
			return false, n.Name, nil
		}
	}
	return true, v, nil
}

// forgetVolume frees a PV of a gone node of the node agent's finalizer, and
// deletes it once released (its pod is gone): nobody is left to commit or
// clean up its data.
func (r *NodeReconciler) forgetVolume(ctx context.Context, pv *corev1.PersistentVolume) error {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != v1alpha1.DriverName {
		return nil
	}
	if _, err := finalizers.Remove(ctx, r.Client, pv, v1alpha1.FinalizerNode); err != nil {
		return err
	}
	released := pv.Status.Phase == corev1.VolumeReleased || pv.Status.Phase == corev1.VolumeFailed
	if released && pv.DeletionTimestamp == nil {
		logf.FromContext(ctx).Info("Node is gone: deleting its released volume", "persistentVolume", klog.KObj(pv))
		return client.IgnoreNotFound(r.Delete(ctx, pv))
	}
	return nil
}
