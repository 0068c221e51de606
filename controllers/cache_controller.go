package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/logs"
	"github.com/layercache/layercache/internal/registry"
)

// Condition types and reasons of a Cache.
const (
	ConditionReady   = "Ready"
	ReasonCommitted  = "Committed"
	ReasonNoData     = "NoData"
	ReasonFrozen     = "ReadOnly"
	ReasonInRegistry = "InRegistry"
	// ReasonPointerRefused: a NodeCache reported an image the manager does
	// not adopt as the cache's registry pointer.
	ReasonPointerRefused = "PushedImageRefused"
	summaryMaxNodes      = 3
	summaryNodesMore     = ",..."
)

// CacheReconciler gathers a Cache's NodeCaches (one per node that holds
// its data, each written by that node's agent) into the Cache's status,
// its summary (the columns of `kubectl get caches`) and its Ready
// condition; copies the Cache's ttl to its NodeCaches; and, when the
// Cache is deleted, deletes its NodeCaches and holds the Cache until they
// are gone (each node's agent deletes its data first).
//
// With a registry, it also makes the newest pushed generation (from the
// NodeCaches' status.pushed) the Cache's status.registry and copies it to
// the NodeCaches, whose agents then bring it down; and it deletes the
// Cache's images from the registry once the nodes have let go.
type CacheReconciler struct {
	client.Client
	// Registry is nil without a registry.
	Registry *registry.Client
	Recorder record.EventRecorder

	// refused is, per NodeCache UID, the last image told as refused: each
	// report is told once, not at every reconcile.
	refused sync.Map
}

// Event reasons of a Cache.
const (
	ReasonRegistryDeleted      = "RegistryDeleted"
	ReasonRegistryDeleteFailed = "RegistryDeleteFailed"
	// registryDeleteGiveUp is how long a deleted Cache waits for the
	// registry to let its images be deleted, before it goes anyway.
	registryDeleteGiveUp = 10 * time.Minute
)

// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=layercache.io,resources=caches/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=layercache.io,resources=nodecaches,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=storage.k8s.io,resources=csinodes,verbs=get;list;watch

// SetupWithManager registers the reconciler. A node agent that registers
// its CSI driver (on a node that joins, or once it runs) wakes the Caches
// that every node prefetches.
func (r *CacheReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("cache").For(&v1alpha1.Cache{}).Owns(&v1alpha1.NodeCache{}).
		Watches(&storagev1.CSINode{}, handler.EnqueueRequestsFromMapFunc(r.prefetchingEverywhere),
			builder.WithPredicates(predicate.Funcs{
				CreateFunc: func(e event.CreateEvent) bool { return runsAgent(e.Object.(*storagev1.CSINode)) },
				UpdateFunc: func(e event.UpdateEvent) bool {
					return runsAgent(e.ObjectNew.(*storagev1.CSINode)) && !runsAgent(e.ObjectOld.(*storagev1.CSINode))
				},
				DeleteFunc: func(event.DeleteEvent) bool { return false },
			})).
		Complete(r)
}

// runsAgent tells whether a node's CSINode lists our driver: the node
// agent runs there and has registered with the kubelet.
func runsAgent(cn *storagev1.CSINode) bool {
	return slices.ContainsFunc(cn.Spec.Drivers, func(d storagev1.CSINodeDriver) bool { return d.Name == v1alpha1.DriverName })
}

// agentNodes lists the nodes that run the node agent (and are not being
// deleted): only they may be given a NodeCache, whose finalizer only an
// agent removes.
func (r *CacheReconciler) agentNodes(ctx context.Context) ([]string, error) {
	csiNodes := &storagev1.CSINodeList{}
	if err := r.List(ctx, csiNodes); err != nil {
		return nil, err
	}
	var names []string
	for i := range csiNodes.Items {
		if !runsAgent(&csiNodes.Items[i]) {
			continue
		}
		node := &corev1.Node{}
		if err := r.Get(ctx, client.ObjectKey{Name: csiNodes.Items[i].Name}, node); client.IgnoreNotFound(err) != nil {
			return nil, err
		} else if err == nil && node.DeletionTimestamp == nil {
			names = append(names, node.Name)
		}
	}
	return names, nil
}

// prefetchingEverywhere lists the Caches that every node prefetches.
func (r *CacheReconciler) prefetchingEverywhere(ctx context.Context, _ client.Object) []reconcile.Request {
	if r.Registry == nil {
		return nil
	}
	list := &v1alpha1.CacheList{}
	if err := r.List(ctx, list); err != nil {
		logf.FromContext(ctx).Error(err, "Listing Caches for a new node")
		return nil
	}
	var reqs []reconcile.Request
	for _, c := range list.Items {
		if c.Spec.Prefetch == v1alpha1.PrefetchAllNodes {
			reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&c)})
		}
	}
	return reqs
}

// prefetchOnAllNodes creates a NodeCache, holding the newest image, for
// every node that runs the agent and has none, if the Cache asks for it:
// each node's agent then pulls the image in the background.
func (r *CacheReconciler) prefetchOnAllNodes(ctx context.Context, c *v1alpha1.Cache, ncs []v1alpha1.NodeCache) error {
	if r.Registry == nil || c.Spec.Prefetch != v1alpha1.PrefetchAllNodes || !c.SyncsThroughRegistry() || c.Status.Registry == nil {
		return nil
	}
	nodes, err := r.agentNodes(ctx)
	if err != nil {
		return err
	}
	has := map[string]bool{}
	for _, nc := range ncs {
		has[nc.Spec.Node] = true
	}
	for _, n := range nodes {
		if has[n] {
			continue
		}
		nc, err := newNodeCache(c, n, r.Scheme())
		if err != nil {
			return err
		}
		if err := r.Create(ctx, nc); client.IgnoreAlreadyExists(err) != nil {
			return fmt.Errorf("creating NodeCache %s: %w", nc.Name, err)
		}
	}
	return nil
}

// Reconcile implements reconcile.Reconciler.
func (r *CacheReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	c := &v1alpha1.Cache{}
	if err := r.Get(ctx, req.NamespacedName, c); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	list := &v1alpha1.NodeCacheList{}
	if err := r.List(ctx, list, client.InNamespace(c.Namespace), client.MatchingLabels{v1alpha1.LabelCache: c.Name}); err != nil {
		return ctrl.Result{}, err
	}
	if c.DeletionTimestamp != nil {
		return ctrl.Result{}, r.reconcileDelete(ctx, c, list.Items)
	}
	if err := r.dropLegacyFinalizers(ctx, c); err != nil {
		return ctrl.Result{}, err
	}
	if _, err := finalizers.Add(ctx, r.Client, c, v1alpha1.FinalizerCacheData); err != nil {
		return ctrl.Result{}, err
	}
	before := c.DeepCopy()
	c.Status.Nodes = nil
	now := time.Now()
	if reg := c.Status.Registry; reg != nil && reg.CommitTime.After(now.Add(maxClockSkew)) {
		// Adopted before pointers were checked: it would pin the cache.
		c.Status.Registry = nil
	}
	for _, nc := range list.Items {
		if nc.Status.Pushed != nil && newerImage(nc.Status.Pushed, c.Status.Registry) {
			if err := r.acceptPushed(ctx, c, &nc, now); err != nil {
				if last, _ := r.refused.Swap(nc.UID, nc.Status.Pushed.Image); last != nc.Status.Pushed.Image {
					r.Recorder.Eventf(c, corev1.EventTypeWarning, ReasonPointerRefused, "Not adopting the image NodeCache %s reports: %v", nc.Name, err)
				}
			} else {
				c.Status.Registry = nc.Status.Pushed.DeepCopy()
			}
		}
		if nc.DeletionTimestamp == nil && nc.Status.Generation > 0 {
			entry := nc.Status.DeepCopy()
			entry.Node = nc.Spec.Node
			c.Status.Nodes = append(c.Status.Nodes, *entry)
		}
	}
	summarize(c, now)
	for i := range list.Items {
		if err := r.copySpec(ctx, c, &list.Items[i]); err != nil {
			return ctrl.Result{}, err
		}
	}
	if err := r.prefetchOnAllNodes(ctx, c, list.Items); err != nil {
		return ctrl.Result{}, err
	}
	if equality.Semantic.DeepEqual(before.Status, c.Status) {
		return ctrl.Result{}, nil
	}
	return ctrl.Result{}, r.Status().Patch(ctx, c, client.MergeFrom(before))
}

// reconcileDelete deletes the Cache's NodeCaches and lets the Cache go once
// they are gone: each node's agent deletes its data (once no volume uses
// it), then its NodeCache; the Node reconciler does it for a node that is
// gone.
func (r *CacheReconciler) reconcileDelete(ctx context.Context, c *v1alpha1.Cache, ncs []v1alpha1.NodeCache) error {
	for i := range ncs {
		if ncs[i].DeletionTimestamp == nil {
			if err := r.Delete(ctx, &ncs[i]); client.IgnoreNotFound(err) != nil {
				return fmt.Errorf("deleting NodeCache %s: %w", ncs[i].Name, err)
			}
		}
	}
	if len(ncs) > 0 {
		logf.FromContext(ctx).V(logs.Debug).Info("Waiting for the nodes to delete the cache's data", "cache", klog.KObj(c), "nodeCaches", len(ncs))
		return nil // the deletion of each NodeCache wakes us again
	}
	if !controllerutil.ContainsFinalizer(c, v1alpha1.FinalizerCacheData) {
		return nil
	}
	if err := r.deleteFromRegistry(ctx, c); err != nil {
		return err
	}
	_, err := finalizers.Remove(ctx, r.Client, c, v1alpha1.FinalizerCacheData)
	return err
}

// deleteFromRegistry deletes the Cache's images. While the registry fails,
// the Cache stays (retried with backoff), for up to registryDeleteGiveUp:
// then it goes, with a warning naming what is left.
func (r *CacheReconciler) deleteFromRegistry(ctx context.Context, c *v1alpha1.Cache) error {
	if r.Registry == nil {
		return nil
	}
	key := registry.Cache{Namespace: c.Namespace, Name: c.Name}
	repo, err := r.Registry.Repository(key)
	if err != nil {
		return nil // a name the registry cannot hold was never pushed
	}
	ctx2, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	n, err := r.Registry.DeleteCache(ctx2, key)
	switch {
	case err == nil:
		if n > 0 {
			r.Recorder.Eventf(c, corev1.EventTypeNormal, ReasonRegistryDeleted, "Deleted %d image(s) of the cache from %s", n, repo)
		}
		return nil
	case time.Since(c.DeletionTimestamp.Time) < registryDeleteGiveUp:
		r.Recorder.Eventf(c, corev1.EventTypeWarning, ReasonRegistryDeleteFailed, "Deleting the cache's images from %s failed (retrying): %v", repo, err)
		return fmt.Errorf("deleting the images of %s: %w", klog.KObj(c), err)
	default:
		r.Recorder.Eventf(c, corev1.EventTypeWarning, ReasonRegistryDeleteFailed, "Gave up deleting the cache's images from %s after %s; delete them there: %v", repo, registryDeleteGiveUp, err)
		return nil
	}
}

// maxClockSkew is how far ahead of the manager's clock a node's reported
// time may be.
const maxClockSkew = time.Minute

// acceptPushed checks the image a NodeCache reports before it becomes the
// cache's registry pointer, which every node pulls: it must come from the
// NodeCache of this cache on an existing node that the manager let commit
// it (spec.commitGranted), pushed by that node, name
// an image of this cache's own repository by digest, and not be dated
// ahead of the manager's clock (a fast clock or a compromised node would
// otherwise pin the cache for ever).
func (r *CacheReconciler) acceptPushed(ctx context.Context, c *v1alpha1.Cache, nc *v1alpha1.NodeCache, now time.Time) error {
	p := nc.Status.Pushed
	switch {
	case nc.Spec.Cache != c.Name || nc.Name != v1alpha1.NodeCacheName(c.Name, nc.Spec.Node):
		return fmt.Errorf("it is not the NodeCache of cache %s on node %s", c.Name, nc.Spec.Node)
	case p.Node != "" && p.Node != nc.Spec.Node:
		return fmt.Errorf("pushed by node %s, not by its own node %s", p.Node, nc.Spec.Node)
	case nc.Spec.CommitGranted == nil:
		return fmt.Errorf("the manager never let node %s commit the cache", nc.Spec.Node)
	case p.CommitTime.After(now.Add(maxClockSkew)) || p.PushTime != nil && p.PushTime.After(now.Add(maxClockSkew)):
		return fmt.Errorf("dated %s, ahead of the manager's clock (%s)", p.CommitTime.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if r.Registry != nil {
		repo, err := r.Registry.Repository(registry.Cache{Namespace: c.Namespace, Name: c.Name})
		if err != nil {
			return err
		}
		if !strings.HasPrefix(p.Image, repo.Name()+"@sha256:") {
			return fmt.Errorf("image %s is not in the cache's repository %s", p.Image, repo.Name())
		}
	}
	if err := r.Get(ctx, client.ObjectKey{Name: nc.Spec.Node}, &corev1.Node{}); err != nil {
		return fmt.Errorf("node %s: %w", nc.Spec.Node, err)
	}
	return nil
}

// newerImage tells whether a was committed after b (pushed after b, for
// the same commit time: a compacted chain pushed again).
func newerImage(a, b *v1alpha1.RegistryImage) bool {
	if b == nil {
		return true
	}
	if !a.CommitTime.Equal(&b.CommitTime) {
		return a.CommitTime.After(b.CommitTime.Time)
	}
	return a.PushTime != nil && (b.PushTime == nil || a.PushTime.After(b.PushTime.Time))
}

// dropLegacyFinalizers removes the per-node finalizers that node agents put
// on Caches before NodeCaches existed: nothing removes them any more.
func (r *CacheReconciler) dropLegacyFinalizers(ctx context.Context, c *v1alpha1.Cache) error {
	for _, f := range slices.Clone(c.Finalizers) {
		if strings.HasPrefix(f, v1alpha1.LegacyFinalizerCachePrefix) {
			if _, err := finalizers.Remove(ctx, r.Client, c, f); err != nil {
				return err
			}
		}
	}
	return nil
}

// copySpec gives a NodeCache its Cache's ttl and newest image in the
// registry: the node's agent reads them there, watching nothing else.
func (r *CacheReconciler) copySpec(ctx context.Context, c *v1alpha1.Cache, nc *v1alpha1.NodeCache) error {
	var image *v1alpha1.RegistryImage
	if c.SyncsThroughRegistry() {
		image = c.Status.Registry
	}
	if nc.DeletionTimestamp != nil || (equality.Semantic.DeepEqual(nc.Spec.TTL, c.Spec.TTL) && equality.Semantic.DeepEqual(nc.Spec.Registry, image)) {
		return nil
	}
	before := nc.DeepCopy()
	nc.Spec.TTL = c.Spec.TTL.DeepCopy()
	nc.Spec.Registry = image.DeepCopy()
	return client.IgnoreNotFound(r.Patch(ctx, nc, client.MergeFrom(before)))
}

// summarize sorts status.nodes (newest commit first: the webhook prefers
// them in that order) and fills the display fields and the Ready condition
// from them. A node whose commit time is ahead of the manager's clock is
// ranked as if it had none: a fast clock attracts no builds.
func summarize(c *v1alpha1.Cache, now time.Time) {
	nodes := c.Status.Nodes
	for i := range nodes {
		if t := nodes[i].LastCommitTime; t != nil && t.After(now.Add(maxClockSkew)) {
			nodes[i].LastCommitTime = nil
		}
	}
	slices.SortStableFunc(nodes, func(a, b v1alpha1.NodeCacheStatus) int {
		switch {
		case a.LastCommitTime == nil && b.LastCommitTime == nil:
			return strings.Compare(a.Node, b.Node)
		case a.LastCommitTime == nil:
			return 1
		case b.LastCommitTime == nil:
			return -1
		}
		if n := b.LastCommitTime.Compare(a.LastCommitTime.Time); n != 0 {
			return n
		}
		return strings.Compare(a.Node, b.Node)
	})
	var names []string
	var size *resource.Quantity
	var last *metav1.Time
	for i, n := range nodes {
		if i < summaryMaxNodes {
			names = append(names, n.Node)
		}
		if size == nil || n.Size.Cmp(*size) > 0 {
			s := n.Size.DeepCopy()
			size = &s
		}
		if n.LastCommitTime != nil && (last == nil || n.LastCommitTime.After(last.Time)) {
			last = n.LastCommitTime.DeepCopy()
		}
	}
	c.Status.NodeNames = strings.Join(names, ",")
	if len(nodes) > summaryMaxNodes {
		c.Status.NodeNames += summaryNodesMore
	}
	c.Status.Size, c.Status.LastCommitTime = size, last
	c.Status.ObservedGeneration = c.Generation
	cond := metav1.Condition{Type: ConditionReady, ObservedGeneration: c.Generation}
	switch {
	case c.Spec.ReadOnly:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonFrozen, "read-only: builds read it, nothing is committed"
	case len(nodes) == 0 && c.Status.Registry != nil:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonInRegistry, "no node holds it; in the registry as "+c.Status.Registry.Image
	case len(nodes) == 0:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, ReasonNoData, "no node holds this cache yet"
	default:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonCommitted, "held on "+strings.Join(names, ", ")
	}
	meta.SetStatusCondition(&c.Status.Conditions, cond)
}
