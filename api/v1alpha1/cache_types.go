package v1alpha1

import (
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CacheSpec is what a user may set on a cache. Everything is optional: a
// Cache is created by the manager when it grants the first commit.
type CacheSpec struct {
	// ReadOnly freezes the cache: builds still read it, nothing is
	// committed.
	// +optional
	ReadOnly bool `json:"readOnly,omitempty"`

	// TTL evicts the cache's data from a node after it has not been used
	// there for this long (for example "168h").
	// +optional
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
	TTL *metav1.Duration `json:"ttl,omitempty"`

	// MaxSize bounds the cache's size on a node: what a build sees, the
	// layers of its current generation, files shared between layers counted
	// once. A commit that would make it larger is refused (event
	// CommitRefused) and its writes are discarded.
	// +optional
	MaxSize *resource.Quantity `json:"maxSize,omitempty"`

	// RegistrySync says whether the cache follows builds across nodes
	// through the registry the node agents are configured with (their
	// --registry flag): Enabled (the default) pushes trusted commits and
	// pulls them on other nodes; Disabled keeps the cache on the nodes
	// that commit it. Without a registry, it changes nothing.
	// +optional
	// +kubebuilder:validation:Enum=Enabled;Disabled
	RegistrySync RegistrySync `json:"registrySync,omitempty"`

	// Prefetch says which nodes bring each new image of the cache down
	// from the registry in the background: HoldingNodes (the default),
	// those that hold the cache; AllNodes, every node, so that a build
	// starts warm wherever it lands (a node added later included).
	// +optional
	// +kubebuilder:validation:Enum=HoldingNodes;AllNodes
	Prefetch Prefetch `json:"prefetch,omitempty"`
}

// Prefetch selects the nodes that prefetch a cache.
type Prefetch string

// Prefetch values.
const (
	PrefetchHoldingNodes Prefetch = "HoldingNodes"
	PrefetchAllNodes     Prefetch = "AllNodes"
)

// Digest is the image's manifest digest (what follows the "@").
func (i *RegistryImage) Digest() string {
	_, digest, _ := strings.Cut(i.Image, "@")
	return digest
}

// RegistrySync turns registry sync on or off for one cache.
type RegistrySync string

// RegistrySync values.
const (
	RegistrySyncEnabled  RegistrySync = "Enabled"
	RegistrySyncDisabled RegistrySync = "Disabled"
)

// SyncsThroughRegistry tells whether the cache's commits go to the
// registry.
func (c *Cache) SyncsThroughRegistry() bool { return c.Spec.RegistrySync != RegistrySyncDisabled }

// RegistryImage is a generation of a cache pushed to the registry.
type RegistryImage struct {
	// Image is REPOSITORY@DIGEST: nodes pull by digest, never by a tag,
	// so that nobody else writing a tag changes what a build gets.
	Image string `json:"image"`

	// CommitTime is when the generation was committed: the newest wins.
	CommitTime metav1.MicroTime `json:"commitTime"`

	// Node is the node that committed and pushed it.
	// +optional
	Node string `json:"node,omitempty"`

	// Generation is the generation's number on that node.
	// +optional
	Generation int64 `json:"generation,omitempty"`

	// PushTime is when the push finished.
	// +optional
	PushTime *metav1.Time `json:"pushTime,omitempty"`
}

// NodeCacheStatus is the cache's state on one node.
type NodeCacheStatus struct {
	// Node is the node's name.
	Node string `json:"node"`

	// Generation is the cache's current generation on the node.
	Generation int64 `json:"generation"`

	// Layers is the length of the generation's layer chain.
	Layers int32 `json:"layers"`

	// Size is the disk space the cache uses on the node.
	Size resource.Quantity `json:"size"`

	// LastCommitTime is when the current generation was committed.
	// +optional
	LastCommitTime *metav1.Time `json:"lastCommitTime,omitempty"`

	// LastCommitPod is the namespace/name of the pod that committed it.
	// +optional
	LastCommitPod string `json:"lastCommitPod,omitempty"`

	// LastUsedTime is when a volume of the cache was last created on the
	// node (what TTL eviction measures from).
	// +optional
	LastUsedTime *metav1.Time `json:"lastUsedTime,omitempty"`

	// Pushed is the newest generation this node pushed to the registry.
	// +optional
	Pushed *RegistryImage `json:"pushed,omitempty"`
}

// CacheStatus is observed by layercache; users do not set it.
type CacheStatus struct {
	// Nodes lists the nodes that hold the cache, newest commit first.
	// +optional
	// +listType=map
	// +listMapKey=node
	Nodes []NodeCacheStatus `json:"nodes,omitempty"`

	// NodeNames is the comma-separated list of Nodes, for display.
	// +optional
	NodeNames string `json:"nodeNames,omitempty"`

	// Size is the largest size of the cache on any node, for display.
	// +optional
	Size *resource.Quantity `json:"size,omitempty"`

	// LastCommitTime is the newest commit on any node, for display.
	// +optional
	LastCommitTime *metav1.Time `json:"lastCommitTime,omitempty"`

	// Registry is the newest generation in the registry: what a node that
	// is behind, or has nothing, pulls.
	// +optional
	Registry *RegistryImage `json:"registry,omitempty"`

	// Conditions describe the cache's state (type Ready).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// ObservedGeneration is the metadata.generation the status reflects.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
}

// Cache is a copy-on-write layered build cache, named by the
// layercache.io/cache label of the pods that use it. Deleting it deletes its
// data on every node once no volume uses it.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,categories=layercache
// +kubebuilder:validation:XValidation:rule="self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63",message="a cache name must be a DNS-1123 label (at most 63 lower case letters, digits and dashes, starting and ending with a letter or digit)"
// +kubebuilder:printcolumn:name="Nodes",type=string,JSONPath=`.status.nodeNames`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.status.size`
// +kubebuilder:printcolumn:name="Last Commit",type=date,JSONPath=`.status.lastCommitTime`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Cache struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec CacheSpec `json:"spec,omitempty"`
	// +optional
	Status CacheStatus `json:"status,omitempty"`
}

// CacheList is a list of Caches.
//
// +kubebuilder:object:root=true
type CacheList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Cache `json:"items"`
}

func init() {
	SchemeBuilder.Register(&Cache{}, &CacheList{})
}
