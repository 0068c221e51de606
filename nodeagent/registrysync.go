package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/logs"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/registry/transfer"
)

// Event reasons of registry sync.
const (
	ReasonPushed     = "Pushed"
	ReasonPushFailed = "PushFailed"
	ReasonPulled     = "Pulled"
	ReasonPullFailed = "PullFailed"
)

const (
	// prefetchTimeout bounds a pull in the background.
	prefetchTimeout = 10 * time.Minute
	// pushTimeout bounds one push attempt (retried with backoff).
	pushTimeout = 30 * time.Minute
	// defaultMaxImportBytes bounds what a pulled layer may hold when the
	// Cache sets no spec.maxSize.
	defaultMaxImportBytes = 100 << 30
	maxImportEntries      = 10_000_000
)

// RegistrySyncer reconciles this node's NodeCaches with the registry: it
// pushes the node's trusted commits (a commit is the only way content gets
// into a cache, and only trusted pods' volumes are committed), pulls the
// newest pushed generation when a volume is set up on a node that is
// behind, and prefetches it in the background on the nodes that hold the
// cache. It is a controller of its own beside the NodeCacheReconciler: a
// push or a pull may take minutes and must hold up neither evictions nor
// deletions. It writes no status: it records pushes in the engine, and
// enqueues the NodeCache's report.
type RegistrySyncer struct {
	client.Client
	Store    *engine.Store
	NodeName string
	Registry *registry.Client
	Recorder record.EventRecorder
	Reports  *Reports
	// PullTimeout bounds a pull on a volume's setup.
	PullTimeout time.Duration

	mu    sync.Mutex
	locks map[engine.Key]chan struct{}
	// refused holds the identities of generations that can never be
	// pushed (they hold what an OCI layer cannot carry): each is reported
	// once and not tried again. An identity never comes back, so a later
	// commit is tried.
	refused map[string]bool
}

// SetupWithManager registers the reconciler.
func (s *RegistrySyncer) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("registrysync").For(&v1alpha1.NodeCache{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: 2}).Complete(s)
}

// Reconcile implements reconcile.Reconciler: push what this node committed
// and has not pushed, then bring down the Cache's newest image if this
// node is behind. Failures are retried with the controller's backoff, and
// after a restart every NodeCache is reconciled again.
func (s *RegistrySyncer) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	nc := &v1alpha1.NodeCache{}
	if err := s.Get(ctx, req.NamespacedName, nc); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if nc.Spec.Node != s.NodeName || nc.DeletionTimestamp != nil {
		return ctrl.Result{}, nil
	}
	key := engine.Key{Namespace: nc.Namespace, Name: nc.Spec.Cache}
	if key.Validate() != nil {
		return ctrl.Result{}, nil
	}
	cache := &v1alpha1.Cache{}
	if err := s.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, cache); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if cache.DeletionTimestamp != nil || !cache.SyncsThroughRegistry() {
		return ctrl.Result{}, nil
	}
	unlock, err := s.lock(ctx, key)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer unlock()
	info, err := s.Store.Inspect(key) // no data here: no head, a pull to do
	if err != nil && !errors.Is(err, engine.ErrNotFound) {
		return ctrl.Result{}, err
	}
	if h := info.Head; h != nil && shouldPush(*h, info.Pushed, cache.Status.Registry) && !s.isRefused(h.ID()) {
		if err := s.push(ctx, key, cache, *h); err != nil {
			return ctrl.Result{}, err
		}
	}
	// A node that holds the cache keeps up with it; one that holds none
	// pulls only when every node is to hold it: otherwise its data is gone
	// because it was evicted or deleted here, and stays gone.
	if want := nc.Spec.Registry; want != nil && behind(info.Head, want) && (info.Head != nil || cache.Spec.Prefetch == v1alpha1.PrefetchAllNodes) {
		ctx, cancel := context.WithTimeout(ctx, prefetchTimeout)
		defer cancel()
		return ctrl.Result{}, s.pull(ctx, "prefetch", key, cache, want)
	}
	return ctrl.Result{}, nil
}

// shouldPush: the head is this node's own content (not pulled), not
// pushed yet (by its identity, which never comes back), and no older than
// the Cache's newest image (an older commit must not replace a newer one:
// last writer wins).
func shouldPush(h engine.Generation, pushed *engine.PushRecord, newest *v1alpha1.RegistryImage) bool {
	if h.Labels[transfer.LabelDigest] != "" || len(h.Layers) == 0 {
		return false
	}
	if pushed != nil && pushed.ID == h.ID() {
		return false
	}
	return newest == nil || !micro(h.Committed()).Before(newest.CommitTime.Time)
}

func (s *RegistrySyncer) isRefused(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused[id]
}

// behind tells whether the node should pull want: it has nothing, or what
// it has was committed before want and is not want.
func behind(h *engine.Generation, want *v1alpha1.RegistryImage) bool {
	if h == nil {
		return true
	}
	if want.Digest() == h.Labels[transfer.LabelDigest] {
		return false
	}
	return want.CommitTime.After(micro(h.Committed()))
}

func micro(t time.Time) time.Time { return t.Truncate(time.Microsecond) }

// push sends generation h of key to the registry and records it in the
// engine. A generation that can never be pushed is reported once and
// given up (a terminal error); other failures are retried.
func (s *RegistrySyncer) push(ctx context.Context, key engine.Key, cache *v1alpha1.Cache, h engine.Generation) error {
	log := logf.FromContext(ctx).WithValues("cache", cacheRef(key), "generation", h.Number)
	ctx, cancel := context.WithTimeout(ctx, pushTimeout)
	defer cancel()
	start := time.Now()
	p, err := transfer.Push(ctx, s.Registry, s.Store, key, h, s.NodeName)
	registrySeconds.WithLabelValues("push").Add(time.Since(start).Seconds())
	registryBytes.WithLabelValues("push").Add(float64(p.Bytes))
	if errors.Is(err, engine.ErrNotEncodable) {
		registryTransfers.WithLabelValues("push", "failed").Inc()
		s.mu.Lock()
		s.refused[h.ID()] = true
		s.mu.Unlock()
		s.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonPushFailed, "Node %s: generation %d cannot be pushed (not tried again; the next commit will be): %v", s.NodeName, h.Number, err)
		return reconcile.TerminalError(err)
	}
	if err != nil {
		registryTransfers.WithLabelValues("push", "failed").Inc()
		s.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonPushFailed, "Node %s: pushing generation %d failed (retrying): %v", s.NodeName, h.Number, err)
		return err
	}
	registryTransfers.WithLabelValues("push", "ok").Inc()
	repo, _ := s.Registry.Repository(registry.Cache(key))
	image := repo.String() + "@" + p.Digest
	rec := engine.PushRecord{ID: h.ID(), Number: h.Number, Ref: image, Committed: h.Committed(), Pushed: time.Now().UTC()}
	if err := s.Store.RecordPush(key, rec); errors.Is(err, engine.ErrNotFound) {
		return nil // evicted or deleted here meanwhile: nothing to report
	} else if err != nil {
		return err
	}
	s.Reports.Enqueue(key)
	log.Info("Pushed", "image", image, "bytes", p.Bytes, "layersSent", p.LayersSent, "layers", p.Layers, "seconds", time.Since(start).Seconds())
	s.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonPushed, "Node %s: generation %d pushed as %s (%d of %d layers sent, %s)",
		s.NodeName, h.Number, image, p.LayersSent, p.Layers, quantity(p.Bytes))
	if n, err := s.Registry.Prune(ctx, registry.Cache(key), p.Digest); err != nil {
		log.Error(err, "Pruning old generations from the registry failed (the next push tries again)")
	} else if n > 0 {
		log.V(logs.Extended).Info("Pruned old generations from the registry", "deleted", n)
	}
	return nil
}

// pull brings want down as the cache's next generation on this node and
// has it reported. If the node committed newer content meanwhile, the
// engine refuses the import (ErrStale): not a failure, the newer commit
// stays and is pushed.
func (s *RegistrySyncer) pull(ctx context.Context, op string, key engine.Key, cache *v1alpha1.Cache, want *v1alpha1.RegistryImage) error {
	log := logf.FromContext(ctx).WithValues("cache", cacheRef(key), "image", want.Image)
	opts := transfer.PullOptions{Import: engine.ImportOptions{MaxBytes: defaultMaxImportBytes, MaxEntries: maxImportEntries}}
	if cache.Spec.MaxSize != nil {
		opts.Import.MaxBytes = cache.Spec.MaxSize.Value()
	}
	start := time.Now()
	res, err := transfer.Pull(ctx, s.Registry, s.Store, key, want.Digest(), opts)
	registrySeconds.WithLabelValues(op).Add(time.Since(start).Seconds())
	registryBytes.WithLabelValues(op).Add(float64(res.Bytes))
	if errors.Is(err, engine.ErrStale) {
		registryTransfers.WithLabelValues(op, "stale").Inc()
		log.V(logs.Extended).Info("Pulled an image older than the node's own head: kept the head", "op", op, "why", err.Error())
		return nil
	}
	if err != nil {
		registryTransfers.WithLabelValues(op, "failed").Inc()
		s.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonPullFailed, "Node %s: pulling %s failed (%s): %v", s.NodeName, want.Image, op, err)
		return fmt.Errorf("pulling %s: %w", want.Image, err)
	}
	registryTransfers.WithLabelValues(op, "ok").Inc()
	log.Info("Pulled", "op", op, "generation", res.Generation.Number, "bytes", res.Bytes,
		"layersFetched", res.LayersFetched, "layers", res.Layers, "seconds", time.Since(start).Seconds())
	s.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonPulled, "Node %s: %s pulled as generation %d (%s; %d of %d layers fetched, %s)",
		s.NodeName, want.Image, res.Generation.Number, op, res.LayersFetched, res.Layers, quantity(res.Bytes))
	s.Reports.Enqueue(key)
	return nil
}

// BeforeVolume brings the Cache's newest image down before a volume of key
// is created on this node, if the node is behind: within PullTimeout, and
// otherwise (registry down, slow, corrupt) the volume starts from what the
// node has, with a PullFailed event.
func (s *RegistrySyncer) BeforeVolume(ctx context.Context, key engine.Key) {
	if s == nil {
		return
	}
	cache := &v1alpha1.Cache{}
	if err := s.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, cache); err != nil {
		if !apierrors.IsNotFound(err) {
			logf.FromContext(ctx).Error(err, "Reading the Cache before a volume's setup; starting from what the node has", "cache", cacheRef(key))
		}
		return
	}
	want := cache.Status.Registry
	if want == nil || cache.DeletionTimestamp != nil || !cache.SyncsThroughRegistry() {
		return
	}
	isBehind := func() bool {
		info, err := s.Store.Inspect(key)
		if err != nil && !errors.Is(err, engine.ErrNotFound) {
			logf.FromContext(ctx).Error(err, "Inspecting the cache before a volume's setup", "cache", cacheRef(key))
			return false
		}
		return behind(info.Head, want)
	}
	if !isBehind() {
		return // up to date: no need to wait for a transfer in progress
	}
	ctx, cancel := context.WithTimeout(ctx, s.PullTimeout)
	defer cancel()
	unlock, err := s.lock(ctx, key)
	if err != nil {
		registryTransfers.WithLabelValues("pull", "failed").Inc()
		s.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonPullFailed, "Node %s: another transfer of the cache was still running after %s; the build starts from what the node has", s.NodeName, s.PullTimeout)
		return
	}
	defer unlock()
	if !isBehind() { // a prefetch got it meanwhile
		return
	}
	// On failure the event says why; the build starts from what the node
	// has. On success the node holds the cache now, and the report of its
	// NodeCache (enqueued, off the volume's path) brings later prefetches.
	_ = s.pull(ctx, "pull", key, cache, want)
}

// lock serialises pushes and pulls of one cache on this node, giving up
// when ctx ends.
func (s *RegistrySyncer) lock(ctx context.Context, key engine.Key) (func(), error) {
	s.mu.Lock()
	if s.locks == nil {
		s.locks, s.refused = map[engine.Key]chan struct{}{}, map[string]bool{}
	}
	ch, ok := s.locks[key]
	if !ok {
		ch = make(chan struct{}, 1)
		s.locks[key] = ch
	}
	s.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
