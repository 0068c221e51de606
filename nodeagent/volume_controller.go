package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/logs"
)

// Event reasons a user sees.
const (
	ReasonCommitted    = "Committed"
	ReasonCommitDenied = "CommitDenied"
	ReasonCommitFailed = "CommitFailed"
	// ReasonCommitRefused: the writes broke a size bound (the volume's
	// size, the Cache's spec.maxSize) and were discarded.
	ReasonCommitRefused = "CommitRefused"
	ReasonDiscarded     = "Discarded"
	ReasonCacheEvicted  = "CacheEvicted"
	ReasonCacheDeleted  = "CacheDeleted"

	// waitUnpublished is how often a released PV is checked until the
	// kubelet has unmounted its volume.
	waitUnpublished = 2 * time.Second
)

// VolumeReconciler finishes the volumes of this node's PVs once they are
// released (their claim deleted when the pod ended) and the kubelet has
// unpublished them: it commits a cache volume if write was allowed and the
// pod succeeded (or failed, with commit-on-failure), else discards it;
// updates the Cache; removes the volume's data, its finalizer and the PV.
// Everything it needs is on the PV and on disk, so it resumes after a
// restart without committing twice or losing a commit.
type VolumeReconciler struct {
	client.Client
	Store    *engine.Store
	NodeName string
	Recorder record.EventRecorder
	// Compact receives caches to compact after a commit (off the commit
	// path); may be nil.
	Compact chan<- engine.Key
}

// +kubebuilder:rbac:groups="",resources=persistentvolumes,verbs=get;list;watch;update;patch;delete
// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=get;create
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch

// SetupWithManager registers the reconciler. The manager's cache holds only
// this node's PVs (see CacheOptions).
func (r *VolumeReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("volume").For(&corev1.PersistentVolume{}).Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *VolumeReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pv := &corev1.PersistentVolume{}
	if err := r.Get(ctx, req.NamespacedName, pv); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != v1alpha1.DriverName || !controllerutil.ContainsFinalizer(pv, v1alpha1.FinalizerNode) {
		return ctrl.Result{}, nil
	}
	released := pv.DeletionTimestamp != nil || pv.Status.Phase == corev1.VolumeReleased || pv.Status.Phase == corev1.VolumeFailed
	if !released {
		return ctrl.Result{}, nil
	}
	if err := engine.ValidateVolumeID(pv.Name); err != nil {
		// Not a PV we provisioned: nothing on this node can be its volume.
		return ctrl.Result{}, reconcile.TerminalError(fmt.Errorf("PV %s: %w", pv.Name, err))
	}
	mounted, err := r.published(pv)
	if err != nil {
		return ctrl.Result{}, err
	}
	if mounted {
		// The kubelet unmounts a terminated pod's volumes soon after.
		return ctrl.Result{RequeueAfter: waitUnpublished}, nil
	}
	if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrKind] == v1alpha1.KindHostDir {
		err = r.Store.RemoveHostDir(pv.Name)
	} else {
		err = r.finishCacheVolume(ctx, pv)
	}
	if err != nil {
		return ctrl.Result{}, err
	}
	if _, err := finalizers.Remove(ctx, r.Client, pv, v1alpha1.FinalizerNode); err != nil {
		return ctrl.Result{}, err
	}
	if pv.DeletionTimestamp == nil {
		if err := r.Delete(ctx, pv); client.IgnoreNotFound(err) != nil {
			return ctrl.Result{}, err
		}
	}
	logf.FromContext(ctx).V(logs.Extended).Info("Released volume finished and deleted", "persistentVolume", klog.KObj(pv))
	return ctrl.Result{}, nil
}

func (r *VolumeReconciler) published(pv *corev1.PersistentVolume) (bool, error) {
	var points []string
	var err error
	if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrKind] == v1alpha1.KindHostDir {
		points, err = r.Store.HostDirMountPoints(pv.Name)
	} else {
		points, err = r.Store.MountPoints(pv.Name)
	}
	return len(points) > 0, err
}

func (r *VolumeReconciler) finishCacheVolume(ctx context.Context, pv *corev1.PersistentVolume) error {
	log := logf.FromContext(ctx)
	attrs := pv.Spec.CSI.VolumeAttributes
	key := engine.Key{Namespace: attrs[v1alpha1.AttrNamespace], Name: attrs[v1alpha1.AttrCache]}
	if err := key.Validate(); err != nil {
		log.Error(err, "PV names no valid cache: nothing to do", "persistentVolume", klog.KObj(pv))
		return r.Store.Discard(pv.Name)
	}
	v, err := r.Store.Volume(pv.Name)
	if errors.Is(err, engine.ErrNotFound) {
		// Never published here, or finished before a restart or a failed
		// report: if it was committed, report that (again).
		g, err := r.Store.CommittedBy(key, pv.Name)
		if err != nil || g == nil {
			return err
		}
		return r.reportCommit(ctx, key, g.Number, len(g.Layers), g.Labels[LabelPod])
	}
	if err != nil {
		return err
	}
	phase := pv.Annotations[v1alpha1.AnnotationPodPhase]
	commitOnFailure := pv.Annotations[v1alpha1.AnnotationCommitOnFailure] == "true"
	ok := phase == string(corev1.PodSucceeded) || (phase == string(corev1.PodFailed) && commitOnFailure)
	cache := &v1alpha1.Cache{}
	cacheErr := r.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, cache)
	if cacheErr != nil && !apierrors.IsNotFound(cacheErr) {
		return cacheErr
	}
	found := cacheErr == nil
	pod := v.Labels[LabelPod]
	switch {
	case !v.Writable:
		commits.WithLabelValues("denied").Inc()
		return r.Store.Discard(pv.Name)
	case v.NoCommit != "":
		commits.WithLabelValues("refused").Inc()
		if found {
			r.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonCommitRefused, "Writes of %s discarded on node %s: %s", pod, r.NodeName, v.NoCommit)
		}
		return r.Store.Discard(pv.Name)
	case !ok:
		commits.WithLabelValues("discarded").Inc()
		if found {
			r.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonDiscarded, "Writes of %s discarded: its pod ended %s", pod, orUnknown(phase))
		}
		return r.Store.Discard(pv.Name)
	case found && cache.Spec.ReadOnly:
		commits.WithLabelValues("denied").Inc()
		r.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonCommitDenied, "Writes of %s discarded: the cache is read-only (spec.readOnly)", pod)
		return r.Store.Discard(pv.Name)
	}

	var opts engine.CommitOptions
	if found && cache.Spec.MaxSize != nil {
		opts.MaxBytes = cache.Spec.MaxSize.Value()
	}
	start := time.Now()
	res, err := r.Store.CommitWith(pv.Name, opts)
	if size := (*engine.SizeError)(nil); errors.As(err, &size) {
		commits.WithLabelValues("refused").Inc()
		r.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonCommitRefused,
			"Writes of %s discarded on node %s: the cache would be %s, more than its spec.maxSize %s",
			pod, r.NodeName, quantity(size.Bytes), cache.Spec.MaxSize.String())
		return r.Store.Discard(pv.Name)
	}
	if err != nil {
		commits.WithLabelValues("failed").Inc()
		if found {
			r.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonCommitFailed, "Committing the writes of %s on node %s failed: %s", pod, r.NodeName, err)
		}
		return fmt.Errorf("committing volume %s: %w", pv.Name, err)
	}
	commitSeconds.Observe(time.Since(start).Seconds())
	if !res.Committed {
		commits.WithLabelValues("discarded").Inc()
		return nil // nothing written
	}
	commits.WithLabelValues("committed").Inc()
	log.Info("Committed", "cache", cacheRef(key), "generation", res.Generation, "layers", res.ChainLength, "pod", pod)
	if r.Compact != nil {
		select {
		case r.Compact <- key:
		default: // the compactor is busy; the periodic pass will get to it
		}
	}
	// If this fails, the retry finds the volume gone and the generation
	// it committed on disk, and reports it then.
	return r.reportCommit(ctx, key, res.Generation, res.ChainLength, pod)
}

// reportCommit puts this node's new state in the Cache's status and tells
// the user about the commit. Both are idempotent.
func (r *VolumeReconciler) reportCommit(ctx context.Context, key engine.Key, generation int64, layers int, pod string) error {
	if err := ensureCacheAndReport(ctx, r.Client, r.Store, r.NodeName, key); err != nil {
		return fmt.Errorf("reporting the commit of generation %d of %s: %w", generation, key, err)
	}
	cache := &v1alpha1.Cache{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, cache); err == nil {
		r.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonCommitted, "Node %s: generation %d committed by %s (%d layers)",
			r.NodeName, generation, pod, layers)
	}
	return nil
}

func quantity(bytes int64) string {
	return resource.NewQuantity(bytes, resource.BinarySI).String()
}

func orUnknown(s string) string {
	if s == "" {
		return "(outcome unknown)"
	}
	return s
}
