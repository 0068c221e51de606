package controllers

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
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
	// MaxVolumeSize bounds every claim of our classes, hand-written ones
	// too (default DefaultMaxVolumeSize).
	MaxVolumeSize resource.Quantity
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

// Reconcile implements reconcile.Reconciler. It decides what the volume
// is (the claim checked, the trust decision made and its events recorded)
// once, here, and builds the PV from that decision with a pure function.
func (r *Provisioner) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.Get(ctx, req.NamespacedName, pvc); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	nodeName := pvc.Annotations[AnnotationSelectedNode]
	if pvc.Spec.VolumeName != "" || nodeName == "" || pvc.DeletionTimestamp != nil || pvc.Spec.StorageClassName == nil {
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
	node := &corev1.Node{}
	if err := r.Get(ctx, client.ObjectKey{Name: nodeName}, node); err != nil {
		return ctrl.Result{}, fmt.Errorf("reading selected node %s: %w", nodeName, err)
	}
	if err := r.checkClass(pvc, class); err != nil {
		return ctrl.Result{}, err
	}
	vc, err := r.volumeContext(ctx, pvc, class)
	if err != nil {
		return ctrl.Result{}, err
	}
	vc.Node = node.Name
	pv, err := newPV(pvc, class, node, vc)
	if err != nil {
		return ctrl.Result{}, err
	}
	if err := r.Create(ctx, pv); err != nil && !apierrors.IsAlreadyExists(err) {
		return ctrl.Result{}, fmt.Errorf("creating PV %s: %w", pv.Name, err)
	}
	logf.FromContext(ctx).Info("Provisioned volume", "persistentVolume", klog.KObj(pv), "node", klog.KRef("", nodeName),
		"kind", vc.Kind, "cache", vc.Cache, "write", vc.Write)
	r.Recorder.Eventf(pvc, corev1.EventTypeNormal, ReasonProvisioned, "Provisioned %s on node %s (%s)", pv.Name, nodeName, describe(vc))
	return ctrl.Result{}, nil
}

// checkClass refuses classes whose reclaim policy is not Delete: the node
// agent removes a volume's data, and then its PV, once the volume is
// released, so a Retain (or Recycle) class would promise what never
// happens.
func (r *Provisioner) checkClass(pvc *corev1.PersistentVolumeClaim, class *storagev1.StorageClass) error {
	max := r.MaxVolumeSize
	if max.IsZero() {
		max = DefaultMaxVolumeSize
	}
	if size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; size.Cmp(max) > 0 {
		r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonProvisionError,
			"The claim asks for %s, more than the largest cache volume allowed, %s (--max-volume-size): no volume is provisioned", size.String(), max.String())
		return reconcile.TerminalError(fmt.Errorf("size %s over --max-volume-size %s", size.String(), max.String()))
	}
	if class.ReclaimPolicy == nil || *class.ReclaimPolicy == corev1.PersistentVolumeReclaimDelete {
		return nil
	}
	r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonProvisionError,
		"StorageClass %s: reclaimPolicy %s is not supported, only Delete (a volume's data is removed when it is released): no volume is provisioned",
		class.Name, *class.ReclaimPolicy)
	return reconcile.TerminalError(fmt.Errorf("StorageClass %s: reclaim policy %s", class.Name, *class.ReclaimPolicy))
}

// volumeContext decides what the claim's volume is: its kind, its cache
// and fallbacks (checked), and whether it may be committed (the trust
// decision, whose refusal is told to the claim and its pod).
func (r *Provisioner) volumeContext(ctx context.Context, pvc *corev1.PersistentVolumeClaim, class *storagev1.StorageClass) (v1alpha1.VolumeContext, error) {
	vc := v1alpha1.VolumeContext{Kind: class.Parameters[v1alpha1.ParameterKind], Namespace: pvc.Namespace}
	switch vc.Kind {
	case v1alpha1.KindHostDir:
		return vc, nil
	case v1alpha1.KindCache, "":
		vc.Kind = v1alpha1.KindCache
	default:
		r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonProvisionError, "StorageClass %s: parameter %s=%q must be %q or %q",
			class.Name, v1alpha1.ParameterKind, vc.Kind, v1alpha1.KindCache, v1alpha1.KindHostDir)
		return vc, reconcile.TerminalError(fmt.Errorf("unknown kind %q", vc.Kind))
	}
	vc.Cache = pvc.Labels[v1alpha1.LabelCache]
	if errs := validation.IsDNS1123Label(vc.Cache); len(errs) > 0 {
		r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonInvalidCache,
			"Label %s=%q must be a DNS-1123 label: no volume is provisioned", v1alpha1.LabelCache, vc.Cache)
		return vc, reconcile.TerminalError(fmt.Errorf("invalid cache name %q", vc.Cache))
	}
	if list, ok := pvc.Annotations[v1alpha1.AnnotationRestoreFrom]; ok {
		from, err := v1alpha1.ParseRestoreFrom(list, vc.Cache)
		if err != nil {
			r.Recorder.Eventf(pvc, corev1.EventTypeWarning, ReasonInvalidCache, "Annotation %s=%q: %s: no volume is provisioned", v1alpha1.AnnotationRestoreFrom, list, err)
			return vc, reconcile.TerminalError(err)
		}
		vc.RestoreFrom = from
	}
	d, err := decideWrite(ctx, r.Client, pvc, vc.Cache)
	if err != nil {
		return vc, err
	}
	if d.claim != nil {
		// A build pod's claim: its fallbacks (its inode bound, setuid) are
		// those the webhook checked, whatever the PVC says now.
		vc.RestoreFrom, vc.MaxInodes, vc.Setuid = d.claim.RestoreFrom, d.claim.MaxInodes, d.claim.Setuid
	}
	vc.Write = d.allowed
	if d.pod != nil {
		vc.PodUID = string(d.pod.UID)
	}
	if d.reason != "" {
		r.Recorder.Event(pvc, corev1.EventTypeWarning, d.reason, d.message)
		if d.pod != nil {
			r.Recorder.Event(d.pod, corev1.EventTypeWarning, d.reason, d.message)
		}
	}
	return vc, nil
}

func describe(vc v1alpha1.VolumeContext) string {
	if vc.Kind == v1alpha1.KindHostDir {
		return "host directory"
	}
	what := "cache " + vc.Cache
	if len(vc.RestoreFrom) > 0 {
		what += ", falling back to " + strings.Join(vc.RestoreFrom, ",")
	}
	if vc.Write {
		return what + ", commits allowed"
	}
	return what + ", read-only"
}

// newPV is the PV of claim pvc of class on node, for the volume context
// decided: a CSI PV pinned to the node, held by the node agent's finalizer.
func newPV(pvc *corev1.PersistentVolumeClaim, class *storagev1.StorageClass, node *corev1.Node, vc v1alpha1.VolumeContext) (*corev1.PersistentVolume, error) {
	hostname := node.Labels[corev1.LabelHostname]
	if hostname == "" {
		return nil, reconcile.TerminalError(fmt.Errorf("node %s has no %s label", node.Name, corev1.LabelHostname))
	}
	mode := corev1.PersistentVolumeFilesystem
	return &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{
			Name:        PVName(pvc),
			Labels:      map[string]string{v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node.Name)},
			Annotations: map[string]string{AnnotationProvisionedBy: v1alpha1.DriverName},
			Finalizers:  []string{v1alpha1.FinalizerNode},
		},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: pvc.Spec.Resources.Requests[corev1.ResourceStorage]},
			AccessModes:                   pvc.Spec.AccessModes,
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
			StorageClassName:              class.Name,
			VolumeMode:                    &mode,
			ClaimRef: &corev1.ObjectReference{
				APIVersion: "v1", Kind: "PersistentVolumeClaim",
				Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID,
			},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: v1alpha1.DriverName, VolumeHandle: PVName(pvc), VolumeAttributes: vc.Attributes(),
			}},
			NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{
					Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpIn, Values: []string{hostname},
				}},
			}}}},
		},
	}, nil
}
