package v1alpha1

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
	// AnnotationCaches lists more caches for the same pod:
	// "NAME=/mount/path,NAME=/other/path".
	AnnotationCaches = "layercache.io/caches"
	// AnnotationCommitOnFailure, "true", commits a failed pod's writes too.
	AnnotationCommitOnFailure = "layercache.io/commit-on-failure"

	// AnnotationClaims is written by the webhook: the JSON list of the
	// claims (PVCs) the pod references, which the manager creates.
	AnnotationClaims = "layercache.io/claims"
	// AnnotationPodPhase is written on a PVC by the manager: the phase its
	// pod ended in.
	AnnotationPodPhase = "layercache.io/pod-phase"

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
}
