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
	"sigs.k8s.io/controller-runtime/pkg/controller"
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

// PVReconciler finishes the volumes of this node's PVs once they are
// released (their claim deleted when the pod ended) and the kubelet has
// unpublished them: it commits a cache volume if write was allowed and the
// pod succeeded (or failed, with commit-on-failure), else discards it;
// updates the Cache; removes the volume's data, its finalizer and the PV.
// Everything it needs is on the PV and on disk, so it resumes after a
// restart without committing twice or losing a commit.
type PVReconciler struct {
	client.Client
	Store    *engine.Store
	NodeName string
	Recorder record.EventRecorder
	// Compact receives caches to compact after a commit (off the commit
	// path); may be nil.
	Compact chan<- engine.Key
	// Reports has a committed cache's NodeCache reported.
	Reports *Reports
	// MaxInodes is the node's bound on a volume's files and directories
	// (zero: DefaultMaxVolumeInodes), checked once more at commit, as the
	// size is: the periodic check may not have seen the last writes.
	MaxInodes int64
}

// +kubebuilder:rbac:groups="",resources=persistentvolumes,verbs=get;list;watch;update;patch;delete
// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=get
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch

// SetupWithManager registers the reconciler. The manager's cache holds only
// this node's PVs (see CacheOptions).
func (r *PVReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("persistentvolume").For(&corev1.PersistentVolume{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: pvWorkers}).Complete(r)
}

// pvWorkers is how many released PVs are finished at once: commits and
// discards of different caches run side by side (those of one cache take
// its lock in turn), so that one volume's long discard holds up no other
// cache's.
const pvWorkers = 4

// Reconcile implements reconcile.Reconciler.
func (r *PVReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
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

func (r *PVReconciler) published(pv *corev1.PersistentVolume) (bool, error) {
	var points []string
	var err error
	if pv.Spec.CSI.VolumeAttributes[v1alpha1.AttrKind] == v1alpha1.KindHostDir {
		points, err = r.Store.HostDirMountPoints(pv.Name)
	} else {
		points, err = r.Store.MountPoints(pv.Name)
	}
	return len(points) > 0, err
}

func (r *PVReconciler) finishCacheVolume(ctx context.Context, pv *corev1.PersistentVolume) error {
	attrs, err := v1alpha1.ParseVolumeContext(pv.Spec.CSI.VolumeAttributes)
	if err != nil {
		logf.FromContext(ctx).Error(err, "PV names no valid cache: nothing to do", "persistentVolume", klog.KObj(pv))
		return r.Store.Discard(pv.Name)
	}
	key := engine.Key{Namespace: attrs.Namespace, Name: attrs.Cache}
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
	cache := &v1alpha1.Cache{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, cache); apierrors.IsNotFound(err) {
		cache = nil
	} else if err != nil {
		return err
	}
	if v.Writable && v.NoCommit == "" && v.CommitLayer == "" {
		// Measured once more: the last writes came after the last check.
		usage := func() (int64, int64, error) { return r.Store.VolumeUsage(v.ID) }
		if v.NoCommit, err = overBound(ctx, v.ID, pv, r.MaxInodes, usage); err != nil {
			return err
		}
	}
	if result, reason, message := commitDecision(r.NodeName, v, pv, cache); result != "" {
		commits.WithLabelValues(result).Inc()
		if reason != "" && cache != nil {
			kind := corev1.EventTypeWarning
			if reason == ReasonDiscarded {
				kind = corev1.EventTypeNormal
			}
			r.Recorder.Event(cache, kind, reason, message)
		}
		return r.discard(pv.Name, key)
	}
	return r.commit(ctx, pv, key, v, cache)
}

// discard discards volume id of cache key, and has the cache's NodeCache
// reported: one the manager created for this commit is withdrawn if the
// node holds nothing else of the cache.
func (r *PVReconciler) discard(id string, key engine.Key) error {
	if err := r.Store.Discard(id); err != nil {
		return err
	}
	r.Reports.Enqueue(key)
	return nil
}

// commitDecision says why volume v of pv must not be committed: the
// result for the commits metric, and the event to tell the user (none for
// a read-only volume). Empty: commit it.
func commitDecision(node string, v *engine.Volume, pv *corev1.PersistentVolume, cache *v1alpha1.Cache) (result, reason, message string) {
	phase := pv.Annotations[v1alpha1.AnnotationPodPhase]
	commitOnFailure := pv.Annotations[v1alpha1.AnnotationCommitOnFailure] == "true"
	ok := phase == string(corev1.PodSucceeded) || (phase == string(corev1.PodFailed) && commitOnFailure)
	pod := v.Labels[LabelPod]
	switch {
	case !v.Writable:
		return "denied", "", ""
	case v.NoCommit != "":
		return "refused", ReasonCommitRefused, fmt.Sprintf("Writes of %s discarded on node %s: %s", pod, node, v.NoCommit)
	case !ok:
		return "discarded", ReasonDiscarded, fmt.Sprintf("Writes of %s discarded: its pod ended %s", pod, orUnknown(phase))
	case cache != nil && cache.Spec.ReadOnly:
		return "denied", ReasonCommitDenied, fmt.Sprintf("Writes of %s discarded: the cache is read-only (spec.readOnly)", pod)
	}
	return "", "", ""
}

// commit commits volume v within the Cache's spec.maxSize (cache may be
// nil: no Cache yet), and has the commit reported.
func (r *PVReconciler) commit(ctx context.Context, pv *corev1.PersistentVolume, key engine.Key, v *engine.Volume, cache *v1alpha1.Cache) error {
	var opts engine.CommitOptions
	if cache != nil && cache.Spec.MaxSize != nil {
		opts.MaxBytes = cache.Spec.MaxSize.Value()
	}
	pod := v.Labels[LabelPod]
	start := time.Now()
	res, err := r.Store.CommitWith(pv.Name, opts)
	if size := (*engine.SizeError)(nil); errors.As(err, &size) {
		commits.WithLabelValues("refused").Inc()
		r.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonCommitRefused,
			"Writes of %s discarded on node %s: the cache would be %s, more than its spec.maxSize %s",
			pod, r.NodeName, quantity(size.Bytes), cache.Spec.MaxSize.String())
		return r.discard(pv.Name, key)
	}
	if err != nil {
		commits.WithLabelValues("failed").Inc()
		if cache != nil {
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
	logf.FromContext(ctx).Info("Committed", "cache", cacheRef(key), "generation", res.Generation, "id", res.ID, "layers", res.ChainLength, "pod", pod)
	if r.Compact != nil {
		select {
		case r.Compact <- key:
		default: // the compactor is busy; the periodic pass will get to it
		}
	}
	return r.reportCommit(ctx, key, res.Generation, res.ChainLength, pod)
}

// reportCommit tells the user about the commit (on the Cache, which the
// manager created when it granted the commit), and has this node's new
// state reported (by the NodeCache reconciler). If it fails, the retry
// finds the volume gone and the generation it committed on disk, and
// reports it then.
func (r *PVReconciler) reportCommit(ctx context.Context, key engine.Key, generation int64, layers int, pod string) error {
	cache, err := getCache(ctx, r.Client, key)
	if err != nil {
		return fmt.Errorf("reporting the commit of generation %d of %s: %w", generation, key, err)
	}
	r.Reports.Enqueue(key)
	if cache == nil {
		logf.FromContext(ctx).Info("Committed a cache that has no Cache object", "cache", cacheRef(key), "generation", generation)
		return nil
	}
	r.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonCommitted, "Node %s: generation %d committed by %s (%d layers)",
		r.NodeName, generation, pod, layers)
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
