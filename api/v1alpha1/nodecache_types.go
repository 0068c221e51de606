package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodeCacheSpec names the cache and the node.
type NodeCacheSpec struct {
	// Cache is the name of the Cache (same namespace) this is a part of.
	Cache string `json:"cache"`
	// Node is the name of the node that holds the data.
	Node string `json:"node"`
	// TTL is the Cache's spec.ttl, copied here by the manager so that the
	// node's agent needs to watch nothing but its own NodeCaches.
	// +optional
	// +kubebuilder:validation:Type=string
	TTL *metav1.Duration `json:"ttl,omitempty"`
	// Registry is the Cache's status.registry, copied here by the manager:
	// the node's agent brings it down in the background (prefetch) when
	// the node is behind.
	// +optional
	Registry *RegistryImage `json:"registry,omitempty"`
	// CommitGranted is when the manager first let a volume of this cache
	// on this node commit: a writable volume whose pod then ended so that
	// it may (Succeeded, or Failed with commit-on-failure). The manager
	// takes the node's word on a registry image (status.pushed) only once
	// this is set: a node never granted a commit of a cache cannot steer
	// what the other nodes pull for it.
	// +optional
	CommitGranted *metav1.Time `json:"commitGranted,omitempty"`
}

// NodeCache is one Cache's data on one node: created by the manager when it
// grants the node a commit (or by that node's agent at a pull), owned by the Cache, its status written only
// by that agent. The manager gathers the NodeCaches of a Cache into the
// Cache's status. Each node's agent watches only its own NodeCaches, so one
// node's commit wakes no other node. Deleting a NodeCache deletes the data
// on its node (the finalizer layercache.io/node-data is the agent's), once
// no volume uses it.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,categories=layercache
// +kubebuilder:printcolumn:name="Cache",type=string,JSONPath=`.spec.cache`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.node`
// +kubebuilder:printcolumn:name="Generation",type=integer,JSONPath=`.status.generation`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.status.size`
// +kubebuilder:printcolumn:name="Last Commit",type=date,JSONPath=`.status.lastCommitTime`
type NodeCache struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec NodeCacheSpec `json:"spec"`
	// +optional
	Status NodeCacheStatus `json:"status,omitempty"`
}

// NodeCacheList is a list of NodeCaches.
//
// +kubebuilder:object:root=true
type NodeCacheList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeCache `json:"items"`
}

func init() {
	SchemeBuilder.Register(&NodeCache{}, &NodeCacheList{})
}

// FinalizerNodeData on a NodeCache holds it until its node's agent has
// deleted the cache's data on that node (or the node is gone).
const FinalizerNodeData = "layercache.io/node-data"

// FinalizerCacheData on a Cache is the manager's: it holds the Cache until
// its NodeCaches are gone, so that deleting a Cache deletes its data on
// every node first.
const FinalizerCacheData = "layercache.io/cache-data"

// NodeCacheName is the name of cache's NodeCache on node: the cache's
// name, a dot, and the node's label value (its name, or a hash of a long
// one): at most 127 characters, a valid object name for every valid cache
// and node name.
func NodeCacheName(cache, node string) string {
	return cache + "." + NodeLabelValue(node)
}
