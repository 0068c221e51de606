package controllers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/logs"
)

// LabelledPods selects the pods layercache cares about; the manager's cache
// holds only those.
func LabelledPods() labels.Selector {
	req, err := labels.NewRequirement(v1alpha1.LabelCache, selection.Exists, nil)
	if err != nil {
		panic(err)
	}
	return labels.NewSelector().Add(*req)
}

// PodReconciler creates the claims of a mutated build pod while it lives,
// and releases them when it ends: the outcome is recorded on the PV and the
// claim, the claim is deleted and freed of pvc-protection so that its PV is
// released at once (the kubelet still unmounts the terminated pod's
// volume; the node agent commits after that).
type PodReconciler struct {
	client.Client
	Recorder record.EventRecorder
	Options  Options
}

// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups="",resources=persistentvolumeclaims,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups="",resources=persistentvolumes,verbs=get;list;watch;create;update;patch
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get;list;watch

// SetupWithManager registers the reconciler.
func (r *PodReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("pod").
		For(&corev1.Pod{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			_, ok := o.GetAnnotations()[v1alpha1.AnnotationClaims]
			return ok
		}))).
		Owns(&corev1.PersistentVolumeClaim{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: concurrentReconciles}).
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *PodReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pod := &corev1.Pod{}
	if err := r.Get(ctx, req.NamespacedName, pod); err != nil {
		// A deleted pod's claims go with it (owner references).
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	claims, err := PodClaims(pod)
	if err != nil {
		r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonBadClaims, "Annotation %s: %s", v1alpha1.AnnotationClaims, err)
		return ctrl.Result{}, reconcile.TerminalError(err)
	}
	if phase, ended := outcome(pod); ended {
		// Only claims this pod controls are touched: no check needed.
		return ctrl.Result{}, r.release(ctx, pod, claims, phase)
	}
	if err := r.Options.checkClaims(pod, claims); err != nil {
		r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonBadClaims, "Annotation %s: %s: no claim is created", v1alpha1.AnnotationClaims, err)
		return ctrl.Result{}, reconcile.TerminalError(err)
	}
	if v1alpha1.NamespaceMustAllow(pod) {
		// The webhook checked it, unless it was down and the annotation
		// is the pod's own.
		ns := &corev1.Namespace{}
		if err := r.Get(ctx, client.ObjectKey{Name: pod.Namespace}, ns); err != nil {
			return ctrl.Result{}, err
		}
		if err := v1alpha1.CheckNamespace(pod, ns); err != nil {
			r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonBadClaims, "%s: no claim is created", err)
			return ctrl.Result{}, reconcile.TerminalError(err)
		}
	}
	ready, err := r.ensureClaims(ctx, pod, claims)
	if err != nil || !ready {
		return ctrl.Result{}, err
	}
	return ctrl.Result{}, r.ungate(ctx, pod)
}

// PodClaims reads the claims the webhook recorded on a pod.
func PodClaims(pod *corev1.Pod) ([]v1alpha1.Claim, error) {
	raw, ok := pod.Annotations[v1alpha1.AnnotationClaims]
	if !ok {
		return nil, nil
	}
	var claims []v1alpha1.Claim
	if err := json.Unmarshal([]byte(raw), &claims); err != nil {
		return nil, fmt.Errorf("not a JSON list of claims: %w", err)
	}
	return claims, nil
}

// outcome says whether the pod is done with its volumes, and how it ended.
// A pod whose deletion began before it ended never commits, whatever its
// containers exited with: its build was interrupted; nor does a pod that
// had an ephemeral (debug) container.
func outcome(pod *corev1.Pod) (string, bool) {
	ended := pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
	switch {
	case pod.DeletionTimestamp == nil && !ended:
		return "", false
	case len(pod.Spec.EphemeralContainers) > 0:
		// Someone ran a debug container in it: its writes are not only
		// the build's.
		return PhaseDebugged, true
	case pod.DeletionTimestamp == nil, endedBeforeDeletion(pod):
		return string(pod.Status.Phase), true
	default:
		return PhaseDeleted, true
	}
}

// endedBeforeDeletion: all containers had finished before the pod's
// deletion began (deletionTimestamp minus the grace period).
func endedBeforeDeletion(pod *corev1.Pod) bool {
	if pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed {
		return false
	}
	grace := time.Duration(0)
	if pod.DeletionGracePeriodSeconds != nil {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	began := pod.DeletionTimestamp.Add(-grace)
	var last time.Time
	for _, cs := range pod.Status.ContainerStatuses {
		t := cs.State.Terminated
		if t == nil {
			return false
		}
		if t.FinishedAt.After(last) {
			last = t.FinishedAt.Time
		}
	}
	return !last.IsZero() && last.Before(began)
}

// ensureClaims creates the pod's missing claims. It reports whether every
// claim exists and belongs to the pod, as seen in the manager's cache: a
// claim created now is not ready yet. Its watch event brings the pod back
// here, by when the scheduler's informer has most likely seen it too
// (ungating a pod whose claim the scheduler does not know yet fails it:
// "persistentvolumeclaim not found").
func (r *PodReconciler) ensureClaims(ctx context.Context, pod *corev1.Pod, claims []v1alpha1.Claim) (bool, error) {
	ready := true
	for _, c := range claims {
		pvc := &corev1.PersistentVolumeClaim{}
		err := r.Get(ctx, client.ObjectKey{Namespace: pod.Namespace, Name: c.ClaimName}, pvc)
		if err == nil {
			if !metav1.IsControlledBy(pvc, pod) {
				ready = false
				r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonClaimConflict,
					"Claim %s exists and belongs to something else: the pod cannot get its cache volume", c.ClaimName)
			}
			continue
		}
		if !apierrors.IsNotFound(err) {
			return false, err
		}
		pvc, err = newClaim(pod, c)
		if err != nil {
			r.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonBadClaims, "Claim %s: %s", c.ClaimName, err)
			return false, reconcile.TerminalError(err)
		}
		if err := controllerutil.SetControllerReference(pod, pvc, r.Scheme()); err != nil {
			return false, err
		}
		if err := r.Create(ctx, pvc); err != nil && !apierrors.IsAlreadyExists(err) {
			return false, fmt.Errorf("creating claim %s: %w", c.ClaimName, err)
		}
		ready = false
		logf.FromContext(ctx).Info("Created claim", "persistentVolumeClaim", klog.KObj(pvc), "cache", c.Cache, "trust", c.Trust)
		r.Recorder.Eventf(pod, corev1.EventTypeNormal, ReasonClaimCreated, "Created claim %s for cache %s (%s)", c.ClaimName, c.Cache, c.Trust)
	}
	return ready, nil
}

// ungate removes the webhook's scheduling gate: the pod's claims exist,
// the scheduler may place it. Other gates stay (optimistic lock: a
// concurrent removal of another gate is never undone).
func (r *PodReconciler) ungate(ctx context.Context, pod *corev1.Pod) error {
	ours := func(g corev1.PodSchedulingGate) bool { return g.Name == v1alpha1.SchedulingGate }
	if !slices.ContainsFunc(pod.Spec.SchedulingGates, ours) {
		return nil
	}
	before := pod.DeepCopy()
	pod.Spec.SchedulingGates = slices.DeleteFunc(pod.Spec.SchedulingGates, ours)
	if err := r.Patch(ctx, pod, client.MergeFromWithOptions(before, client.MergeFromWithOptimisticLock{})); err != nil {
		return client.IgnoreNotFound(err)
	}
	logf.FromContext(ctx).V(logs.Extended).Info("Claims exist: removed the scheduling gate", "pod", klog.KObj(pod))
	return nil
}

func newClaim(pod *corev1.Pod, c v1alpha1.Claim) (*corev1.PersistentVolumeClaim, error) {
	size, err := parsePositiveQuantity(c.Size)
	if err != nil {
		return nil, fmt.Errorf("size %q: %w", c.Size, err)
	}
	class := c.StorageClass
	ann := map[string]string{v1alpha1.LabelTrust: c.Trust}
	if len(c.RestoreFrom) > 0 {
		ann[v1alpha1.AnnotationRestoreFrom] = strings.Join(c.RestoreFrom, ",")
	}
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name: c.ClaimName, Namespace: pod.Namespace,
			Labels:      map[string]string{v1alpha1.LabelCache: c.Cache},
			Annotations: ann,
		},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: &class,
			// No other pod can mount it and slip writes into a commit.
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}},
		},
	}, nil
}

// release releases every claim of the ended pod; one that is gone
// meanwhile does not stop the others.
func (r *PodReconciler) release(ctx context.Context, pod *corev1.Pod, claims []v1alpha1.Claim, phase string) error {
	var errs []error
	for _, c := range claims {
		if err := r.releaseClaim(ctx, pod, c, phase); client.IgnoreNotFound(err) != nil {
			errs = append(errs, fmt.Errorf("releasing claim %s: %w", c.ClaimName, err))
		}
	}
	return errors.Join(errs...)
}

func (r *PodReconciler) releaseClaim(ctx context.Context, pod *corev1.Pod, c v1alpha1.Claim, phase string) error {
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: pod.Namespace, Name: c.ClaimName}, pvc); err != nil {
		return err
	}
	if !metav1.IsControlledBy(pvc, pod) {
		return nil
	}
	// The outcome goes on the PV (only there): the node agent reads it
	// there, after the claim is gone.
	if pvc.Spec.VolumeName != "" {
		if err := r.recordOnPV(ctx, pvc.Spec.VolumeName, pod, phase); err != nil {
			return err
		}
	}
	if pvc.DeletionTimestamp == nil {
		if err := r.Delete(ctx, pvc); err != nil {
			return err
		}
	}
	if _, err := finalizers.Remove(ctx, r.Client, pvc, FinalizerPVCProtection); err != nil {
		return err
	}
	logf.FromContext(ctx).Info("Released claim", "persistentVolumeClaim", klog.KObj(pvc), "phase", phase)
	r.Recorder.Eventf(pod, corev1.EventTypeNormal, ReasonReleased, "Pod ended (%s): released claim %s of cache %s", phase, pvc.Name, c.Cache)
	return nil
}

func (r *PodReconciler) recordOnPV(ctx context.Context, name string, pod *corev1.Pod, phase string) error {
	pv := &corev1.PersistentVolume{}
	if err := r.Get(ctx, client.ObjectKey{Name: name}, pv); err != nil {
		return client.IgnoreNotFound(err)
	}
	if _, done := pv.Annotations[v1alpha1.AnnotationPodPhase]; done {
		return nil // the first outcome recorded stands
	}
	commitOnFailure := pod.Annotations[v1alpha1.AnnotationCommitOnFailure] == "true"
	if err := r.grantCommit(ctx, pod, pv, mayCommit(phase, commitOnFailure)); err != nil {
		return err
	}
	patch := client.MergeFrom(pv.DeepCopy())
	metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationPodPhase, phase)
	metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationCommitOnFailure, fmt.Sprint(commitOnFailure))
	return client.IgnoreNotFound(r.Patch(ctx, pv, patch))
}
