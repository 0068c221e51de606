package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/logs"
)

// ReasonVolumeSizeExceeded: a volume's writes outgrew its size; its pod is
// evicted and the writes are never committed.
const ReasonVolumeSizeExceeded = "VolumeSizeExceeded"

// DefaultSizeCheckInterval is how often SizeLimiter measures the volumes.
const DefaultSizeCheckInterval = 5 * time.Second

// DefaultMaxVolumeInodes bounds the files and directories of a volume's
// writes: empty files take no blocks, but each takes an inode of the
// node's file system.
const DefaultMaxVolumeInodes = 1_000_000

// +kubebuilder:rbac:groups="",resources=pods/eviction,verbs=create

// SizeLimiter enforces the size of cache volumes (their claim's size,
// layercache.io/size), as the kubelet enforces an emptyDir's sizeLimit:
// it measures each volume's own writes (its upper layer, never the cache
// below it) periodically, and when a volume holds more than its PV's
// capacity, it marks the volume so that its writes are never committed and
// evicts its pod through the Eviction API, with an event saying what was
// exceeded. The store's filesystem has no project quotas here, so
// measuring is the only bound: a build can overshoot by what it writes in
// one interval.
type SizeLimiter struct {
	// Client reads this node's PVs (from the cache) and evicts pods.
	Client   client.Client
	Store    *engine.Store
	Recorder record.EventRecorder
	Interval time.Duration
	// MaxInodes bounds each volume's files and directories (zero:
	// DefaultMaxVolumeInodes).
	MaxInodes int64
	// evicted remembers the volumes whose pod was evicted, so that each
	// gets one event and one eviction.
	evicted map[string]bool
}

// NeedLeaderElection implements manager.LeaderElectionRunnable: every
// node agent runs its own.
func (l *SizeLimiter) NeedLeaderElection() bool { return false }

// Start implements manager.Runnable.
func (l *SizeLimiter) Start(ctx context.Context) error {
	interval := l.Interval
	if interval <= 0 {
		interval = DefaultSizeCheckInterval
	}
	ctx = logf.IntoContext(ctx, logf.FromContext(ctx).WithName("sizes"))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if err := l.Check(ctx); err != nil {
				logf.FromContext(ctx).Error(err, "Checking volume sizes failed")
			}
		}
	}
}

// Check measures every cache volume once and acts on those over their size.
func (l *SizeLimiter) Check(ctx context.Context) error {
	if l.evicted == nil {
		l.evicted = map[string]bool{}
	}
	vols, err := l.Store.Volumes()
	if err != nil {
		return err
	}
	live := map[string]bool{}
	var errs []error
	for _, v := range vols {
		live[v.ID] = true
		if l.evicted[v.ID] || v.CommitLayer != "" {
			continue
		}
		pv := &corev1.PersistentVolume{}
		if err := l.Client.Get(ctx, client.ObjectKey{Name: v.ID}, pv); err != nil {
			// No PV (any more): the orphan sweep removes the volume.
			errs = append(errs, client.IgnoreNotFound(err))
			continue
		}
		limit := pv.Spec.Capacity.Storage()
		if limit.IsZero() {
			continue
		}
		used, inodes, err := l.Store.VolumeUsage(v.ID)
		if errors.Is(err, engine.ErrNotFound) {
			continue // committed or discarded meanwhile
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		logf.FromContext(ctx).V(logs.Trace).Info("Measured volume", "volume", v.ID, "bytes", used, "inodes", inodes, "limit", limit.Value())
		maxInodes := l.MaxInodes
		if maxInodes <= 0 {
			maxInodes = DefaultMaxVolumeInodes
		}
		switch {
		case used > limit.Value():
			errs = append(errs, l.exceeded(ctx, v, fmt.Sprintf("volume %s of cache %s holds %s of writes, more than its size %s (%s)",
				v.ID, v.Cache.Name, quantity(used), limit.String(), v1alpha1.AnnotationSize)))
		case inodes > maxInodes:
			errs = append(errs, l.exceeded(ctx, v, fmt.Sprintf("volume %s of cache %s holds %d files and directories, more than the node's bound %d (--max-volume-inodes)",
				v.ID, v.Cache.Name, inodes, maxInodes)))
		}
	}
	for id := range l.evicted {
		if !live[id] {
			delete(l.evicted, id)
		}
	}
	return errors.Join(errs...)
}

func (l *SizeLimiter) exceeded(ctx context.Context, v *engine.Volume, what string) error {
	if err := l.Store.ForbidCommit(v.ID, what); err != nil && !errors.Is(err, engine.ErrNotFound) {
		return fmt.Errorf("forbidding the commit of volume %s: %w", v.ID, err)
	}
	volumeSizeExceeded.Inc()
	ns, name, _ := strings.Cut(v.Labels[LabelPod], "/")
	uid := types.UID(v.Labels[v1alpha1.AttrPodUID])
	if ns == "" || name == "" || uid == "" {
		logf.FromContext(ctx).Info("Volume over its size, with no pod to evict: its writes will be discarded", "volume", v.ID, "why", what)
		l.evicted[v.ID] = true
		return nil
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: uid}}
	eviction := &policyv1.Eviction{
		ObjectMeta:    metav1.ObjectMeta{Namespace: ns, Name: name},
		DeleteOptions: &metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}},
	}
	err := l.Client.SubResource("eviction").Create(ctx, pod, eviction)
	switch {
	case apierrors.IsNotFound(err), apierrors.IsConflict(err):
		// The pod is gone (or is another pod of the same name now).
	case err != nil:
		// A PodDisruptionBudget, say: try again at the next check. The
		// writes are already marked, they will never be committed.
		return fmt.Errorf("evicting pod %s/%s: %w", ns, name, err)
	default:
		l.Recorder.Eventf(pod, corev1.EventTypeWarning, ReasonVolumeSizeExceeded, "Evicted: %s; its writes will not be committed", what)
	}
	logf.FromContext(ctx).Info("Evicted a pod whose volume outgrew its size", "pod", klog.KRef(ns, name), "volume", v.ID, "why", what)
	l.evicted[v.ID] = true
	return nil
}
