package v1alpha1

import (
	"fmt"
	"hash/fnv"
)

// Labels and annotations that users put on build pods, and the ones
// layercache writes. docs/design.md explains each.
const (
	// LabelCache opts a pod in and names its cache (a DNS-1123 label,
	// unique per namespace).
	LabelCache = "layercache.io/cache"
	// LabelTrust asks to commit: "write", or "read" (the default).
	LabelTrust = "layercache.io/trust"

	// AnnotationMountPath is where the cache appears (default /cache).
	AnnotationMountPath = "layercache.io/mount-path"
	// AnnotationVolume names the pod volume to replace (default "cache",
	// when the pod has a volume of that name).
	AnnotationVolume = "layercache.io/volume"
	// AnnotationSize is the size requested for the volume's writable layer.
	AnnotationSize = "layercache.io/size"
	// AnnotationMaxInodes bounds the files and directories the volume's
	// writes may hold (every volume of the pod): at most the node's
	// --max-volume-inodes, which wins if it is lower.
	AnnotationMaxInodes = "layercache.io/max-inodes"
	// AnnotationCaches lists more caches for the same pod:
	// "NAME=/mount/path,NAME=/other/path".
	AnnotationCaches = "layercache.io/caches"
	// AnnotationSetuid, "true", mounts the pod's cache volumes without
	// nosuid, so that setuid binaries in them work; only in a namespace
	// labelled LabelSetuid=SetuidAllow.
	AnnotationSetuid = "layercache.io/setuid"
	// AnnotationCommitOnFailure, "true", commits a failed pod's writes too.
	AnnotationCommitOnFailure = "layercache.io/commit-on-failure"
	// AnnotationRestoreFrom lists fallback caches of the same namespace,
	// "NAME[,NAME...]": when the pod's cache has nothing on the node (and
	// nothing to pull), its volume starts from the first of them that
	// has content. Commits still go to the pod's own cache only.
	AnnotationRestoreFrom = "layercache.io/restore-from"
	// AnnotationVolumeAt picks the pod volume to replace by where the
	// pod's containers mount it (for volumes whose name is generated, as
	// Tekton's workspaces are: "/workspace/NAME").
	AnnotationVolumeAt = "layercache.io/volume-at"

	// AnnotationClaims is written by the webhook: the JSON list of the
	// claims (PVCs) the pod references, which the manager creates.
	AnnotationClaims = "layercache.io/claims"
	// SchedulingGate is added by the webhook to a pod it mutates; the
	// manager removes it once every claim the pod references exists, so
	// that the scheduler never sees the pod before its claims.
	SchedulingGate = "layercache.io/claims"
	// AnnotationPodPhase is written on a PV by the manager: the phase its
	// claim's pod ended in, which the node agent commits by.
	AnnotationPodPhase = "layercache.io/pod-phase"
	// AnnotationOverLimit is written on a PV by its node's agent when the
	// volume's writes outgrew their bound (its value says which): they
	// will never be committed, and the manager deletes the pod that uses
	// the volume. It is the only change an agent may make to a PV besides
	// removing its finalizer.
	AnnotationOverLimit = "layercache.io/over-limit"

	TrustRead  = "read"
	TrustWrite = "write"

	DefaultMountPath  = "/cache"
	DefaultVolumeName = "cache"
	// DefaultStorageClass is the StorageClass of cache volumes.
	DefaultStorageClass = "layercache"
)

// Claim is one PVC that a mutated pod references, as recorded by the
// webhook in AnnotationClaims.
type Claim struct {
	// Cache is the cache's name in the pod's namespace.
	Cache string `json:"cache"`
	// ClaimName is the generated PVC name the pod's volume references.
	ClaimName string `json:"claimName"`
	// Volume is the name of the pod volume that references it.
	Volume string `json:"volume"`
	// Trust is what the pod asked for: "read" or "write".
	Trust string `json:"trust"`
	// Size is the requested size (a quantity).
	Size string `json:"size"`
	// StorageClass is the PVC's StorageClass.
	StorageClass string `json:"storageClass"`
	// MountPath is where the webhook mounted the volume; empty when it
	// replaced a volume the pod mounts itself.
	MountPath string `json:"mountPath,omitempty"`
	// RestoreFrom lists the fallback caches (AnnotationRestoreFrom).
	RestoreFrom []string `json:"restoreFrom,omitempty"`
	// MaxInodes is AnnotationMaxInodes; zero: the node's bound.
	MaxInodes int64 `json:"maxInodes,omitempty"`
	// Setuid is AnnotationSetuid: the volume is mounted without nosuid.
	Setuid bool `json:"setuid,omitempty"`
}

// Names shared by the manager (which provisions) and the node agent (which
// mounts and commits): the contract between them, carried by PVs.
const (
	// DriverName is the CSI driver and the provisioner of both classes.
	DriverName = "layercache.io"
	// HostDirStorageClass is the class of plain node-local directories.
	HostDirStorageClass = "layercache-hostdir"
	// ParameterKind, a StorageClass parameter: "cache" (default) or
	// "hostdir".
	ParameterKind = "layercache.io/kind"
	KindCache     = "cache"
	KindHostDir   = "hostdir"

	// AttrKind, AttrNamespace, AttrCache, AttrWrite and AttrPodUID are the
	// volume attributes of a PV (spec.csi.volumeAttributes).
	AttrKind      = "layercache.io/kind"
	AttrNamespace = "layercache.io/namespace"
	AttrCache     = "layercache.io/cache"
	AttrWrite     = "layercache.io/write"
	AttrPodUID    = "layercache.io/pod-uid"
	// AttrNode is the name of the node the PV is for: the node agents'
	// admission policy reads it (config/node-agent/policy.yaml).
	AttrNode = "layercache.io/node"
	// AttrRestoreFrom lists the volume's fallback caches, separated by
	// commas (from the PVC's AnnotationRestoreFrom).
	AttrRestoreFrom = "layercache.io/restore-from"
	// AttrMaxInodes is the claim's MaxInodes (AnnotationMaxInodes).
	AttrMaxInodes = "layercache.io/max-inodes"
	// AttrSetuid, "true", is the claim's Setuid (AnnotationSetuid).
	AttrSetuid = "layercache.io/setuid"

	// LabelNode on a PV or a NodeCache is NodeLabelValue of the node that
	// holds it, so that a node agent watches only its own.
	LabelNode = "layercache.io/node"

	// FinalizerNode on a PV holds it until its node agent has committed or
	// discarded the volume and removed its data.
	FinalizerNode = "layercache.io/node-cleanup"
	// LegacyFinalizerCachePrefix + node was a node agent's finalizer on a
	// Cache before NodeCaches; the manager removes what is left of them.
	LegacyFinalizerCachePrefix = "layercache.io/node-"
)

// NodeLabelValue is name if it is a valid label value (63 characters or
// fewer), else a stable hash of it.
func NodeLabelValue(name string) string {
	if len(name) <= 63 {
		return name
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	return fmt.Sprintf("h-%016x", h.Sum64())
}
