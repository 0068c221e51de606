package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/logs"
	"github.com/layercache/layercache/internal/registry"
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

// Syncer keeps this node's caches in step with the registry: it pushes
// the node's trusted commits (a commit is the only way content gets into
// a cache, and only trusted pods' volumes are committed), pulls the
// newest pushed generation when a volume is set up on a node that is
// behind, and prefetches it in the background on the nodes that hold the
// cache. It is the reconciler of this node's NodeCaches for that, apart
// from CacheReconciler: a push or a pull may take minutes and must hold
// up neither evictions nor deletions.
type Syncer struct {
	client.Client
	Store    *engine.Store
	NodeName string
	Registry *registry.Client
	Recorder record.EventRecorder
	// PullTimeout bounds a pull on a volume's setup.
	PullTimeout time.Duration

	mu     sync.Mutex
	locks  map[engine.Key]chan struct{}
	pushed map[engine.Key]int64 // the generation last pushed, per cache
}

func (s *Syncer) pushedGeneration(key engine.Key) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pushed[key]
}

// SetupWithManager registers the reconciler.
func (s *Syncer) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("registrysync").For(&v1alpha1.NodeCache{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: 2}).Complete(s)
}

// Reconcile implements reconcile.Reconciler: push what this node committed
// and has not pushed, then bring down the Cache's newest image if this
// node is behind. Failures are retried with the controller's backoff, and
// after a restart every NodeCache is reconciled again.
func (s *Syncer) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
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
	// The NodeCache read may predate the status our last push wrote: the
	// generation pushed is also remembered here, so it is not sent twice.
	if h := info.Head; h != nil && shouldPush(*h, nc, cache.Status.Registry) && s.pushedGeneration(key) != h.Number {
		if err := s.push(ctx, nc, cache, *h); err != nil {
			return ctrl.Result{}, err
		}
		s.mu.Lock()
		s.pushed[key] = h.Number
		s.mu.Unlock()
	}
	if want := nc.Spec.Registry; want != nil && behind(info.Head, want) {
		ctx, cancel := context.WithTimeout(ctx, prefetchTimeout)
		defer cancel()
		if err := s.pull(ctx, "prefetch", key, cache, want); err != nil {
			return ctrl.Result{}, err
		}
		return ctrl.Result{}, ensureCacheAndReport(ctx, s.Client, s.Store, s.NodeName, key)
	}
	return ctrl.Result{}, nil
}

// shouldPush: the head is this node's own content (not pulled), not
// pushed yet, and no older than the Cache's newest image (an older commit
// must not replace a newer one: last writer wins).
func shouldPush(h engine.Generation, nc *v1alpha1.NodeCache, newest *v1alpha1.RegistryImage) bool {
	if h.Labels[registry.LabelDigest] != "" || len(h.Layers) == 0 {
		return false
	}
	if p := nc.Status.Pushed; p != nil && p.Generation == h.Number {
		return false
	}
	return newest == nil || !micro(h.Committed()).Before(newest.CommitTime.Time)
}

// behind tells whether the node should pull want: it has nothing, or what
// it has was committed before want and is not want.
func behind(h *engine.Generation, want *v1alpha1.RegistryImage) bool {
	if h == nil {
		return true
	}
	if want.Digest() == h.Labels[registry.LabelDigest] {
		return false
	}
	return want.CommitTime.After(micro(h.Committed()))
}

func micro(t time.Time) time.Time { return t.Truncate(time.Microsecond) }

func (s *Syncer) push(ctx context.Context, nc *v1alpha1.NodeCache, cache *v1alpha1.Cache, h engine.Generation) error {
	key := engine.Key{Namespace: nc.Namespace, Name: nc.Spec.Cache}
	log := logf.FromContext(ctx).WithValues("cache", cacheRef(key), "generation", h.Number)
	ctx, cancel := context.WithTimeout(ctx, pushTimeout)
	defer cancel()
	start := time.Now()
	p, err := s.Registry.Push(ctx, s.Store, key, h, s.NodeName)
	registrySeconds.WithLabelValues("push").Add(time.Since(start).Seconds())
	registryBytes.WithLabelValues("push").Add(float64(p.Bytes))
	if err != nil {
		registryTransfers.WithLabelValues("push", "failed").Inc()
		s.Recorder.Eventf(cache, corev1.EventTypeWarning, ReasonPushFailed, "Node %s: pushing generation %d failed (retrying): %v", s.NodeName, h.Number, err)
		return err
	}
	registryTransfers.WithLabelValues("push", "ok").Inc()
	repo, _ := s.Registry.Repository(key)
	now := metav1.Now()
	image := &v1alpha1.RegistryImage{
		Image: repo.String() + "@" + p.Digest, CommitTime: metav1.NewMicroTime(micro(h.Committed())),
		Node: s.NodeName, Generation: h.Number, PushTime: &now,
	}
	before := nc.DeepCopy()
	nc.Status.Pushed = image
	if err := s.Status().Patch(ctx, nc, client.MergeFrom(before)); err != nil {
		return client.IgnoreNotFound(err)
	}
	log.Info("Pushed", "image", image.Image, "bytes", p.Bytes, "layersSent", p.LayersSent, "layers", p.Layers, "seconds", time.Since(start).Seconds())
	s.Recorder.Eventf(cache, corev1.EventTypeNormal, ReasonPushed, "Node %s: generation %d pushed as %s (%d of %d layers sent, %s)",
		s.NodeName, h.Number, image.Image, p.LayersSent, p.Layers, quantity(p.Bytes))
	if n, err := s.Registry.Prune(ctx, key, p.Digest); err != nil {
		log.Error(err, "Pruning old generations from the registry failed (the next push tries again)")
	} else if n > 0 {
		log.V(logs.Extended).Info("Pruned old generations from the registry", "deleted", n)
	}
	return nil
}

// pull brings want down as the cache's next generation on this node and
// reports it in the node's NodeCache.
func (s *Syncer) pull(ctx context.Context, op string, key engine.Key, cache *v1alpha1.Cache, want *v1alpha1.RegistryImage) error {
	log := logf.FromContext(ctx).WithValues("cache", cacheRef(key), "image", want.Image)
	opts := registry.PullOptions{Import: engine.ImportOptions{MaxBytes: defaultMaxImportBytes, MaxEntries: maxImportEntries}}
	if cache.Spec.MaxSize != nil {
		opts.Import.MaxBytes = cache.Spec.MaxSize.Value()
	}
	start := time.Now()
	res, err := s.Registry.Pull(ctx, s.Store, key, want.Digest(), opts)
	registrySeconds.WithLabelValues(op).Add(time.Since(start).Seconds())
	registryBytes.WithLabelValues(op).Add(float64(res.Bytes))
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
	return nil
}

// BeforeVolume brings the Cache's newest image down before a volume of key
// is created on this node, if the node is behind: within PullTimeout, and
// otherwise (registry down, slow, corrupt) the volume starts from what the
// node has, with a PullFailed event.
func (s *Syncer) BeforeVolume(ctx context.Context, key engine.Key) {
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
	if s.pull(ctx, "pull", key, cache, want) != nil {
		return // the event says why; the build starts from what the node has
	}
	// The node holds the cache now: its NodeCache brings later prefetches.
	// Off the volume's path.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := ensureCacheAndReport(ctx, s.Client, s.Store, s.NodeName, key); err != nil {
			logf.Log.Error(err, "Reporting a pulled generation", "cache", cacheRef(key))
		}
	}()
}

// lock serialises pushes and pulls of one cache on this node, giving up
// when ctx ends.
func (s *Syncer) lock(ctx context.Context, key engine.Key) (func(), error) {
	s.mu.Lock()
	if s.locks == nil {
		s.locks, s.pushed = map[engine.Key]chan struct{}{}, map[engine.Key]int64{}
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
