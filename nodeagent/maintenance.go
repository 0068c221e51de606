package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/layercache/layercache/engine"
)

// defaultOrphanGrace protects a volume that is being published right now
// from the orphan sweep.
const defaultOrphanGrace = time.Minute

// Maintenance is the node's background work, off every request path:
// compaction after commits, and periodically GC, removal of volumes whose
// PV is gone (after a crash or a forced deletion), and eviction of the
// least recently used caches above the disk budget.
type Maintenance struct {
	// APIReader reads PVs directly (the cache holds only live ones).
	APIReader client.Reader
	// Client records events on Caches; Recorder records them.
	Client   client.Client
	Recorder record.EventRecorder
	NodeName string
	Store    *engine.Store
	// Reports has the caches that maintenance changed reported.
	Reports  *Reports
	Compact  <-chan engine.Key
	Interval time.Duration
	// DiskBudget, if positive, is the most bytes the node's caches may use.
	DiskBudget int64
	// OrphanGrace is how old a volume without a PV must be to be removed
	// (zero means one minute).
	OrphanGrace time.Duration
}

// NeedLeaderElection implements manager.LeaderElectionRunnable.
func (m *Maintenance) NeedLeaderElection() bool { return false }

// Start implements manager.Runnable.
func (m *Maintenance) Start(ctx context.Context) error {
	log := logf.FromContext(ctx).WithName("maintenance")
	ctx = logf.IntoContext(ctx, log)
	if err := m.ForgetIfReplaced(ctx); err != nil {
		log.Error(err, "Checking whether the node was replaced failed")
	}
	m.Pass(ctx) // at start: resume after a restart
	tick := time.NewTicker(m.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case key := <-m.Compact:
			m.compact(ctx, key)
		case <-tick.C:
			m.Pass(ctx)
		}
	}
}

func (m *Maintenance) compact(ctx context.Context, key engine.Key) {
	res, err := m.Store.CompactIfNeeded(key)
	if err != nil {
		logf.FromContext(ctx).Error(err, "Compaction failed", "cache", cacheRef(key))
		return
	}
	if res.Compacted {
		logf.FromContext(ctx).Info("Compacted", "cache", cacheRef(key), "from", res.From, "generation", res.Generation)
		m.Reports.EnqueueMeasured(key)
	}
}

// +kubebuilder:rbac:groups="",resources=nodes,verbs=get

// ForgetIfReplaced deletes the caches of a store whose Node was deleted
// from the cluster and has registered again (its UID changed): while it was
// gone, the manager let its NodeCaches go, and its Caches may have been
// deleted since, so its data is stale and must not come back. A cache that
// a volume still uses stays. The store records the Node's UID.
func (m *Maintenance) ForgetIfReplaced(ctx context.Context) error {
	node := &corev1.Node{}
	if err := m.APIReader.Get(ctx, client.ObjectKey{Name: m.NodeName}, node); err != nil {
		return fmt.Errorf("reading node %s: %w", m.NodeName, err)
	}
	owner, err := m.Store.Owner()
	if err != nil || owner == string(node.UID) {
		return err
	}
	if owner != "" {
		keys, err := m.Store.Keys()
		if err != nil {
			return err
		}
		for _, k := range keys {
			if err := m.Store.DeleteCache(k); err != nil && !errors.Is(err, engine.ErrNotFound) {
				logf.FromContext(ctx).Error(err, "Keeping a cache of the node's previous life", "cache", cacheRef(k))
			}
		}
		logf.FromContext(ctx).Info("The node was deleted and has registered again: forgot the caches it held", "caches", len(keys))
	}
	return m.Store.SetOwner(string(node.UID))
}

// Pass runs one round of maintenance; errors are logged, not returned:
// the next round tries again.
func (m *Maintenance) Pass(ctx context.Context) {
	log := logf.FromContext(ctx)
	if err := m.removeOrphans(ctx); err != nil {
		log.Error(err, "Removing orphaned volumes failed")
	}
	keys, err := m.Store.Keys()
	if err != nil {
		log.Error(err, "Listing caches failed")
		return
	}
	for _, k := range keys {
		m.compact(ctx, k)
	}
	if res, err := m.Store.GC(); err != nil {
		log.Error(err, "GC failed")
	} else if res != (engine.GCResult{}) {
		log.Info("GC", "layers", res.Layers, "generations", res.Generations, "caches", res.Caches, "temporary", res.Temporary)
	}
	// Sizes change when GC frees layers: have them measured here, not on
	// every NodeCache event. At start, this also reports what a restart
	// interrupted.
	for _, k := range keys {
		m.Reports.EnqueueMeasured(k)
	}
	if m.DiskBudget > 0 {
		if err := m.enforceBudget(ctx, keys); err != nil {
			log.Error(err, "Enforcing the disk budget failed")
		}
	}
}

// removeOrphans discards volumes whose PV no longer exists: their pod's
// outcome is unknown, so they are never committed.
func (m *Maintenance) removeOrphans(ctx context.Context) error {
	vols, err := m.Store.Volumes()
	if err != nil {
		return err
	}
	var errs []error
	for _, v := range vols {
		grace := m.OrphanGrace
		if grace == 0 {
			grace = defaultOrphanGrace
		}
		if time.Since(v.Created) < grace || !m.pvGone(ctx, v.ID, &errs) {
			continue
		}
		if points, err := m.Store.MountPoints(v.ID); err != nil || len(points) > 0 {
			continue
		}
		logf.FromContext(ctx).Info("Discarding orphaned volume: its PV is gone", "volume", v.ID, "cache", cacheRef(v.Cache))
		errs = append(errs, m.Store.Discard(v.ID))
	}
	dirs, err := m.Store.HostDirs()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, id := range dirs {
		if !m.pvGone(ctx, id, &errs) {
			continue
		}
		if points, err := m.Store.HostDirMountPoints(id); err != nil || len(points) > 0 {
			continue
		}
		logf.FromContext(ctx).Info("Removing orphaned host directory: its PV is gone", "volume", id)
		errs = append(errs, m.Store.RemoveHostDir(id))
	}
	return errors.Join(errs...)
}

func (m *Maintenance) pvGone(ctx context.Context, name string, errs *[]error) bool {
	err := m.APIReader.Get(ctx, client.ObjectKey{Name: name}, &corev1.PersistentVolume{})
	if err != nil && !apierrors.IsNotFound(err) {
		*errs = append(*errs, err)
	}
	return apierrors.IsNotFound(err)
}

// enforceBudget evicts the least recently used caches that no volume uses
// until the node's caches fit in the budget.
func (m *Maintenance) enforceBudget(ctx context.Context, keys []engine.Key) error {
	type entry struct {
		key      engine.Key
		bytes    int64
		lastUsed time.Time
		inUse    bool
	}
	var entries []entry
	var total int64
	for _, k := range keys {
		info, err := m.Store.Inspect(k)
		if err != nil {
			continue
		}
		u, err := m.Store.Usage(k)
		if err != nil {
			return err
		}
		total += u.Bytes
		entries = append(entries, entry{k, u.Bytes, info.LastUsed, len(info.Volumes) > 0})
	}
	slices.SortFunc(entries, func(a, b entry) int { return a.lastUsed.Compare(b.lastUsed) })
	for _, e := range entries {
		if total <= m.DiskBudget {
			return nil
		}
		if e.inUse {
			continue
		}
		// The engine checks again, under the cache's lock, that no volume
		// uses it: one created since the listing keeps it.
		if err := m.Store.EvictIfIdle(e.key, 0); errors.Is(err, engine.ErrInUse) || errors.Is(err, engine.ErrNotFound) {
			continue
		} else if err != nil {
			return err
		}
		evicted(ctx, m.Client, m.Recorder, m.NodeName, e.key,
			fmt.Sprintf("least recently used while the node's caches exceed the disk budget (%d > %d bytes)", total, m.DiskBudget))
		m.Reports.Enqueue(e.key) // its NodeCache is withdrawn
		total -= e.bytes
	}
	return nil
}
