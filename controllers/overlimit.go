package controllers

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// ReasonVolumeSizeExceeded: a volume's writes outgrew their bound; the
// manager deleted the pod, and the writes are never committed.
const ReasonVolumeSizeExceeded = "VolumeSizeExceeded"

// OverLimitReconciler stops a build pod whose volume its node's agent
// reported over its bound (v1alpha1.AnnotationOverLimit on the PV): it
// deletes the pod, once it has checked that the PV's claim belongs to that
// pod and that the pod runs on the PV's node, so that an agent reaches
// only its own node's build pods. The pod is deleted, not evicted: the
// writes are already refused, and a PodDisruptionBudget must not let it
// go on filling the node (the kubelet's own emptyDir sizeLimit eviction
// ignores budgets too).
type OverLimitReconciler struct {
	client.Client
	Recorder record.EventRecorder
}

// +kubebuilder:rbac:groups="",resources=pods,verbs=delete

// SetupWithManager registers the reconciler.
func (r *OverLimitReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("overlimit").
		For(&corev1.PersistentVolume{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			_, ok := o.GetAnnotations()[v1alpha1.AnnotationOverLimit]
			return ok
		}))).
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *OverLimitReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pv := &corev1.PersistentVolume{}
	if err := r.Get(ctx, req.NamespacedName, pv); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	why, ok := pv.Annotations[v1alpha1.AnnotationOverLimit]
	if !ok || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != v1alpha1.DriverName || pv.Spec.ClaimRef == nil {
		return ctrl.Result{}, nil
	}
	pod, err := r.podOf(ctx, pv)
	if err != nil || pod == nil {
		return ctrl.Result{}, err
	}
	if !onNodeOf(pod, pv) {
		logf.FromContext(ctx).Info("Ignoring a volume reported over its bound: its pod runs on another node",
			"persistentVolume", pv.Name, "pod", klog.KObj(pod), "node", pod.Spec.NodeName)
		return ctrl.Result{}, nil
	}
	uid := pod.UID
	if err := r.Delete(ctx, pod, client.Preconditions{UID: &uid}); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	logf.FromContext(ctx).Info("Deleted a pod whose volume outgrew its bound", "pod", klog.KObj(pod), "persistentVolume", pv.Name, "why", why)
	r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonVolumeSizeExceeded, "Deleted: %s; its writes will not be committed", why)
	return ctrl.Result{}, nil
}

// podOf is the running pod that controls pv's claim; nil if there is none.
func (r *OverLimitReconciler) podOf(ctx context.Context, pv *corev1.PersistentVolume) (*corev1.Pod, error) {
	ref := pv.Spec.ClaimRef
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: ref.Namespace, Name: ref.Name}, pvc); err != nil || pvc.UID != ref.UID {
		return nil, client.IgnoreNotFound(err)
	}
	owner := metav1.GetControllerOf(pvc)
	if owner == nil || owner.Kind != "Pod" {
		return nil, nil
	}
	pod := &corev1.Pod{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: pvc.Namespace, Name: owner.Name}, pod); err != nil || pod.UID != owner.UID {
		return nil, client.IgnoreNotFound(err)
	}
	if _, ended := outcome(pod); ended || pod.DeletionTimestamp != nil {
		return nil, nil
	}
	return pod, nil
}

// onNodeOf tells whether pod runs on the node pv is for.
func onNodeOf(pod *corev1.Pod, pv *corev1.PersistentVolume) bool {
	if pod.Spec.NodeName == "" {
		return false
	}
	if node := pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrNode]; node != "" {
		return node == pod.Spec.NodeName
	}
	return pv.Labels[v1alpha1.LabelNode] == v1alpha1.NodeLabelValue(pod.Spec.NodeName)
}
