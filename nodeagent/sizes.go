package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/logs"
)

// DefaultSizeCheckInterval is how often SizeLimiter measures the volumes.
const DefaultSizeCheckInterval = 5 * time.Second

// DefaultMaxVolumeInodes bounds the files and directories of a volume's
// writes: empty files take no blocks, but each takes an inode of the
// node's file system.
const DefaultMaxVolumeInodes = 1_000_000

// SizeLimiter enforces the size of cache volumes (their claim's size,
// layercache.io/size), as the kubelet enforces an emptyDir's sizeLimit:
// it measures each volume's own writes (its upper layer, never the cache
// below it) periodically, and when a volume holds more than its PV's
// capacity (or more inodes than MaxInodes), it marks the volume so that
// its writes are never committed, makes it read-only (its pods' writes
// fail with EROFS) and says so on the PV (AnnotationOverLimit): the
// manager then deletes the pod, if the claim is a build pod's. The store's filesystem has no project quotas here, so
// measuring is the only bound: a build can overshoot by what it writes in
// one interval.
type SizeLimiter struct {
	// Client reads this node's PVs (from the cache) and annotates them.
	Client   client.Client
	Store    *engine.Store
	Recorder record.EventRecorder
	Interval time.Duration
	// MaxInodes bounds each volume's files and directories (zero:
	// DefaultMaxVolumeInodes).
	MaxInodes int64
	// evicted remembers the volumes reported over their bound.
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

// Check measures every cache volume and host directory once and acts on
// those over their bound.
func (l *SizeLimiter) Check(ctx context.Context) error {
	if l.evicted == nil {
		l.evicted = map[string]bool{}
	}
	vols, err := l.Store.Volumes()
	if err != nil {
		return err
	}
	dirs, err := l.Store.HostDirs()
	if err != nil {
		return err
	}
	live := map[string]bool{}
	var errs []error
	for _, v := range vols {
		live[v.ID] = true
		switch {
		case v.CommitLayer != "":
		case l.evicted[v.ID]:
			// Mounted again meanwhile, it is read-only again.
			errs = append(errs, l.Store.StopWrites(v.ID))
		default:
			errs = append(errs, l.check(ctx, v.ID, v, func() (int64, int64, error) { return l.Store.VolumeUsage(v.ID) }))
		}
	}
	for _, id := range dirs {
		live[id] = true
		if l.evicted[id] {
			errs = append(errs, l.Store.StopHostDirWrites(id))
		} else {
			errs = append(errs, l.check(ctx, id, nil, func() (int64, int64, error) { return l.Store.HostDirUsage(id) }))
		}
	}
	for id := range l.evicted {
		if !live[id] {
			delete(l.evicted, id)
		}
	}
	return errors.Join(errs...)
}

// check measures volume id (v: a cache volume; nil: a host directory)
// against its PV and acts if it is over.
func (l *SizeLimiter) check(ctx context.Context, id string, v *engine.Volume, usage func() (int64, int64, error)) error {
	pv := &corev1.PersistentVolume{}
	if err := l.Client.Get(ctx, client.ObjectKey{Name: id}, pv); err != nil {
		// No PV (any more): the orphan sweep removes the volume.
		return client.IgnoreNotFound(err)
	}
	what, err := overBound(ctx, id, pv, l.MaxInodes, usage)
	if err != nil || what == "" {
		return err
	}
	return l.exceeded(ctx, id, v, pv, what)
}

// exceeded marks cache volume v (nil for a host directory) so that its
// writes are never committed, makes it read-only, and tells the manager on
// its PV, which deletes the pod (the agent's rights reach no pod); the
// manager checks first that the pod runs on this node. A claim written by
// hand has no pod for the manager to delete: read-only is what stops it.
func (l *SizeLimiter) exceeded(ctx context.Context, id string, v *engine.Volume, pv *corev1.PersistentVolume, what string) error {
	stop := l.Store.StopHostDirWrites
	if v != nil {
		if err := l.Store.ForbidCommit(id, what); err != nil && !errors.Is(err, engine.ErrNotFound) {
			return fmt.Errorf("forbidding the commit of volume %s: %w", id, err)
		}
		stop = l.Store.StopWrites
	}
	var stopErr error
	if err := stop(id); err != nil {
		stopErr = fmt.Errorf("making volume %s read-only: %w", id, err)
	}
	if _, done := pv.Annotations[v1alpha1.AnnotationOverLimit]; !done {
		patch := client.MergeFrom(pv.DeepCopy())
		metav1.SetMetaDataAnnotation(&pv.ObjectMeta, v1alpha1.AnnotationOverLimit, what)
		if err := l.Client.Patch(ctx, pv, patch); client.IgnoreNotFound(err) != nil {
			return fmt.Errorf("reporting volume %s over its bound: %w", id, err)
		}
		volumeSizeExceeded.Inc()
	}
	logf.FromContext(ctx).Info("Volume over its bound: it is read-only, its writes will not be committed, and its pod is stopped", "volume", id, "why", what)
	l.evicted[id] = true
	return stopErr
}

// overBound measures volume id (usage: its writes) against its PV's
// capacity and the node's inode bound (zero: DefaultMaxVolumeInodes), and
// says what they exceed; empty if nothing (or if the volume is gone).
func overBound(ctx context.Context, id string, pv *corev1.PersistentVolume, maxInodes int64, usage func() (int64, int64, error)) (string, error) {
	limit := pv.Spec.Capacity.Storage()
	if limit.IsZero() {
		return "", nil
	}
	used, inodes, err := usage()
	if errors.Is(err, engine.ErrNotFound) {
		return "", nil // committed or discarded meanwhile
	}
	if err != nil {
		return "", err
	}
	logf.FromContext(ctx).V(logs.Trace).Info("Measured volume", "volume", id, "bytes", used, "inodes", inodes, "limit", limit.Value())
	if maxInodes <= 0 {
		maxInodes = DefaultMaxVolumeInodes
	}
	bound := "the node's bound %d (--max-volume-inodes)"
	if c := pv.Spec.CSI; c != nil {
		if n, err := v1alpha1.ParseMaxInodes(c.VolumeAttributes[v1alpha1.AttrMaxInodes]); err == nil && n < maxInodes {
			maxInodes, bound = n, "its bound %d ("+v1alpha1.AnnotationMaxInodes+")"
		}
	}
	what := "volume " + id
	if c := pv.Spec.CSI; c != nil && c.VolumeAttributes[v1alpha1.AttrCache] != "" {
		what += " of cache " + c.VolumeAttributes[v1alpha1.AttrCache]
	}
	switch {
	case used > limit.Value():
		return fmt.Sprintf("%s holds %s of writes, more than its size %s (%s)", what, quantity(used), limit.String(), v1alpha1.AnnotationSize), nil
	case inodes > maxInodes:
		return fmt.Sprintf("%s holds %d files and directories, more than "+bound, what, inodes, maxInodes), nil
	}
	return "", nil
}
