package nodeagent

import (
	"context"
	"sync"

	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
)

// Reports is how the node agent's actors ask for a cache's state on this
// node to be reported: they change the cache through the engine, then
// enqueue its NodeCache here, and the NodeCacheReconciler, the only writer
// of NodeCache status, reports what the engine says. Requests for the same
// cache collapse in the controller's queue. Requests made before the
// controller starts are kept until it does.
type Reports struct {
	node string

	mu      sync.Mutex
	queue   workqueue.TypedRateLimitingInterface[reconcile.Request]
	pending []reconcile.Request
	measure map[engine.Key]bool
}

// NewReports returns the report queue of node's agent.
func NewReports(node string) *Reports {
	return &Reports{node: node, measure: map[engine.Key]bool{}}
}

// Enqueue asks for cache key's state on this node to be reported.
func (r *Reports) Enqueue(key engine.Key) { r.enqueue(key, false) }

// EnqueueMeasured does the same and has the cache's disk use measured
// again (walking every layer), as after GC.
func (r *Reports) EnqueueMeasured(key engine.Key) { r.enqueue(key, true) }

func (r *Reports) enqueue(key engine.Key, measure bool) {
	if r == nil {
		return
	}
	req := reconcile.Request{NamespacedName: client.ObjectKey{Namespace: key.Namespace, Name: v1alpha1.NodeCacheName(key.Name, r.node)}}
	r.mu.Lock()
	defer r.mu.Unlock()
	if measure {
		r.measure[key] = true
	}
	if r.queue == nil {
		r.pending = append(r.pending, req)
		return
	}
	r.queue.Add(req)
}

// takeMeasure says whether a measure was asked for key, and forgets it.
func (r *Reports) takeMeasure(key engine.Key) bool {
	if r == nil {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.measure[key]
	delete(r.measure, key)
	return m
}

// Source is the controller source that feeds the NodeCacheReconciler.
func (r *Reports) Source() source.Source {
	return source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.queue = q
		for _, req := range r.pending {
			q.Add(req)
		}
		r.pending = nil
		return nil
	})
}
