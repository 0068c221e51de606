// Package controllers holds the manager's reconcilers: the pod reconciler
// creates the claims a mutated build pod references and releases them when
// it ends; the provisioner turns a claim of a layercache StorageClass into a
// PV on the node the scheduler picked, deciding write permission; the cache
// reconciler summarises the per-node status the node agents report. None
// of them touches a node.
package controllers

const (
	// AnnotationSelectedNode is set on a claim by the scheduler.
	AnnotationSelectedNode = "volume.kubernetes.io/selected-node"
	// AnnotationProvisionedBy marks the PVs we provision.
	AnnotationProvisionedBy = "pv.kubernetes.io/provisioned-by"
	// FinalizerPVCProtection is the finalizer Kubernetes holds on a claim
	// while a pod that exists uses it.
	FinalizerPVCProtection = "kubernetes.io/pvc-protection"
	// PhaseDeleted is recorded for a pod deleted before it ended.
	PhaseDeleted = "Deleted"
	// PhaseDebugged is recorded for a pod that had an ephemeral container:
	// its writes are never committed.
	PhaseDebugged = "Debugged"

	// concurrentReconciles is how many pods (and claims) the manager works
	// on at once: builds come in bursts.
	concurrentReconciles = 4
)

// Event reasons a user sees.
const (
	ReasonClaimCreated   = "ClaimCreated"
	ReasonClaimConflict  = "ClaimConflict"
	ReasonBadClaims      = "BadClaims"
	ReasonReleased       = "Released"
	ReasonProvisioned    = "Provisioned"
	ReasonCommitDenied   = "CommitDenied"
	ReasonNotOwned       = "NotOwnedByBuildPod"
	ReasonInvalidCache   = "InvalidCacheName"
	ReasonProvisionError = "ProvisioningFailed"
)
