package controllers

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// Provisioner provisions a PV for every claim of a StorageClass whose
// provisioner is layercache.io, once the scheduler has picked a node for
// it (WaitForFirstConsumer): a CSI PV pinned to that node, whose volume
// attributes tell the node agent the cache and whether it may commit.
type Provisioner struct {
	client.Client
	Recorder record.EventRecorder
}

// +kubebuilder:rbac:groups=storage.k8s.io,resources=storageclasses,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch

// SetupWithManager registers the provisioner.
func (r *Provisioner) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("provisioner").
		For(&corev1.PersistentVolumeClaim{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			pvc := o.(*corev1.PersistentVolumeClaim)
			return pvc.Spec.VolumeName == "" && pvc.Annotations[AnnotationSelectedNode] != ""
		}))).
		WithOptions(controller.Options{MaxConcurrentReconciles: concurrentReconciles}).
		Complete(r)
}

// PVName is the PV provisioned for a claim.
func PVName(pvc *corev1.PersistentVolumeClaim) string { return "pvc-" + string(pvc.UID) }

// Reconcile implements reconcile.Reconciler.
func (r *Provisioner) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.Get(ctx, req.NamespacedName, pvc); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	node := pvc.Annotations[AnnotationSelectedNode]
	if pvc.Spec.VolumeName != "" || node == "" || pvc.DeletionTimestamp != nil || pvc.Spec.StorageClassName == nil {
		return ctrl.Result{}, nil
	}
	class := &storagev1.StorageClass{}
	if err := r.Get(ctx, client.ObjectKey{Name: *pvc.Spec.StorageClassName}, class); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if class.Provisioner != v1alpha1.DriverName {
		return ctrl.Result{}, nil
	}
	existing := &corev1.PersistentVolume{}
	if err := r.Get(ctx, client.ObjectKey{Name: PVName(pvc)}, existing); err == nil {
		return ctrl.Result{}, nil // provisioned; the PV controller binds it
	} else if !apierrors.IsNotFound(err) {
		return ctrl.Result{}, err
	}
	pv, err := r.newPV(ctx, pvc, class, node)
	if err != nil || pv == nil {
		return ctrl.Result{}, err
	}
	if err := r.Create(ctx, pv); err != nil && !apierrors.IsAlreadyExists(err) {
		return ctrl.Result{}, fmt.Errorf("creating PV %s: %w", pv.Name, err)
	}
	attrs := pv.Spec.CSI.VolumeAttributes
	logf.FromContext(ctx).Info("Provisioned volume", "persistentVolume", klog.KObj(pv), "node", klog.KRef("", node),
		"kind", attrs[v1alpha1.AttrKind], "cache", attrs[v1alpha1.AttrCache], "write", attrs[v1alpha1.AttrWrite])
	r.Recorder.Eventf(pvc, corev1.EventTypeNormal, ReasonProvisioned, "Provisioned %s on node %s (%s)", pv.Name, node, describe(attrs))
	return ctrl.Result{}, nil
}

// checkRestoreFrom checks a claim's fallback caches: DNS-1123 labels,
// other than its own cache.
func checkRestoreFrom(list, cache string) error {
	for _, f := range strings.Split(list, ",") {
		if len(validation.IsDNS1123Label(f)) > 0 || f == cache {
			return fmt.Errorf("fallback cache %q must be a DNS-1123 label other than the claim's cache", f)
		}
	}
	return nil
}

func describe(attrs map[string]string) string {
	if attrs[v1alpha1.AttrKind] == v1alpha1.KindHostDir {
		return "host directory"
	}
	what := "cache " + attrs[v1alpha1.AttrCache]
	if from := attrs[v1alpha1.AttrRestoreFrom]; from != "" {
		what += ", falling back to " + from
	}
	if attrs[v1alpha1.AttrWrite] == "true" {
		return what + ", commits allowed"
	}
	return what + ", read-only"
}

func (r *Provisioner) newPV(ctx context.Context, pvc *corev1.PersistentVolumeClaim, class *storagev1.StorageClass, nodeName string) (*corev1.PersistentVolume, error) {
	kind := class.Parameters[v1alpha1.ParameterKind]
	if kind == "" {
		kind = v1alpha1.KindCache
	}
	attrs := map[string]string{v1alpha1.AttrKind: kind, v1alpha1.AttrNamespace: pvc.Namespace, v1alpha1.AttrWrite: "false"}
	switch kind {
	case v1alpha1.KindHostDir:
	case v1alpha1.KindCache:
		cache := pvc.Labels[v1alpha1.LabelCache]
		if errs := validation.IsDNS1123Label(cache); len(errs) > 0 {
			r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonInvalidCache,
				"Label %s=%q must be a DNS-1123 label: no volume is provisioned", v1alpha1.LabelCache, cache)
			return nil, reconcile.TerminalError(fmt.Errorf("invalid cache name %q", cache))
		}
		attrs[v1alpha1.AttrCache] = cache
		if from, ok := pvc.Annotations[v1alpha1.AnnotationRestoreFrom]; ok {
			if err := checkRestoreFrom(from, cache); err != nil {
				r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonInvalidCache, "Annotation %s=%q: %s: no volume is provisioned", v1alpha1.AnnotationRestoreFrom, from, err)
				return nil, reconcile.TerminalError(err)
			}
			attrs[v1alpha1.AttrRestoreFrom] = from
		}
		d, err := decideWrite(ctx, r.Client, pvc, cache)
		if err != nil {
			return nil, err
		}
		attrs[v1alpha1.AttrWrite] = strconv.FormatBool(d.allowed)
		if d.pod != nil {
			attrs[v1alpha1.AttrPodUID] = string(d.pod.UID)
		}
		if d.reason != "" {
			r.Recorder.Event(pvc, corev1.EventTypeWarning, d.reason, d.message)
			if d.pod != nil {
				r.Recorder.Event(d.pod, corev1.EventTypeWarning, d.reason, d.message)
			}
		}
	default:
		r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonProvisionError, "StorageClass %s: parameter %s=%q must be %q or %q",
			class.Name, v1alpha1.ParameterKind, kind, v1alpha1.KindCache, v1alpha1.KindHostDir)
		return nil, reconcile.TerminalError(fmt.Errorf("unknown kind %q", kind))
	}

	node := &corev1.Node{}
	if err := r.Get(ctx, client.ObjectKey{Name: nodeName}, node); err != nil {
		return nil, fmt.Errorf("reading selected node %s: %w", nodeName, err)
	}
	hostname := node.Labels[corev1.LabelHostname]
	if hostname == "" {
		return nil, reconcile.TerminalError(fmt.Errorf("node %s has no %s label", nodeName, corev1.LabelHostname))
	}
	reclaim := corev1.PersistentVolumeReclaimDelete
	if class.ReclaimPolicy != nil {
		reclaim = *class.ReclaimPolicy
	}
	mode := corev1.PersistentVolumeFilesystem
	return &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{
			Name:        PVName(pvc),
			Labels:      map[string]string{v1alpha1.LabelNode: v1alpha1.NodeLabelValue(nodeName)},
			Annotations: map[string]string{AnnotationProvisionedBy: v1alpha1.DriverName},
			Finalizers:  []string{v1alpha1.FinalizerNode},
		},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: pvc.Spec.Resources.Requests[corev1.ResourceStorage]},
			AccessModes:                   pvc.Spec.AccessModes,
			PersistentVolumeReclaimPolicy: reclaim,
			StorageClassName:              class.Name,
			VolumeMode:                    &mode,
			ClaimRef: &corev1.ObjectReference{
				APIVersion: "v1", Kind: "PersistentVolumeClaim",
				Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID,
			},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: v1alpha1.DriverName, VolumeHandle: PVName(pvc), VolumeAttributes: attrs,
			}},
			NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{
					Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpIn, Values: []string{hostname},
				}},
			}}}},
		},
	}, nil
}
