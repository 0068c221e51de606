package controllers

import (
	"context"
	"fmt"
	"slices"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// VerbCommit is the RBAC verb on caches.layercache.io that lets a service
// account's builds commit.
const VerbCommit = "commit"

// writeDecision says whether a claim's volume may be committed, and why.
type writeDecision struct {
	allowed bool
	pod     *corev1.Pod // the owning build pod, if any
	// claim is the pod's claim for this PVC, checked against the pod
	// (Claim.Validate), if the PVC is one.
	claim   *v1alpha1.Claim
	reason  string // event reason when not allowed
	message string
}

// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create

// decideWrite grants write only if (1) the claim is controlled by a pod
// that carries the cache label, lists this claim in its own claims
// annotation and references it in its volumes, (2) that pod asked for
// write, and (3) its service account may `commit` this cache in this
// namespace, as a SubjectAccessReview answers. Nothing in the claim itself
// can grant it.
func decideWrite(ctx context.Context, c client.Client, pvc *corev1.PersistentVolumeClaim, cache string) (writeDecision, error) {
	owner := metav1.GetControllerOf(pvc)
	if owner == nil || owner.Kind != "Pod" || owner.APIVersion != "v1" {
		return writeDecision{reason: ReasonNotOwned, message: "the claim is not owned by a build pod: its volume is read-only"}, nil
	}
	pod := &corev1.Pod{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: pvc.Namespace, Name: owner.Name}, pod); err != nil {
		if client.IgnoreNotFound(err) != nil {
			return writeDecision{}, err
		}
		return writeDecision{reason: ReasonNotOwned, message: "the claim's pod is gone: its volume is read-only"}, nil
	}
	d := writeDecision{pod: pod}
	claims, err := PodClaims(pod)
	if pod.UID != owner.UID || pod.Labels[v1alpha1.LabelCache] == "" || err != nil {
		d.reason, d.message = ReasonNotOwned, "the claim's owner is not a layercache build pod: its volume is read-only"
		return d, nil
	}
	i := slices.IndexFunc(claims, func(cl v1alpha1.Claim) bool { return cl.ClaimName == pvc.Name && cl.Cache == cache })
	if i < 0 {
		d.reason, d.message = ReasonNotOwned, fmt.Sprintf("pod %s does not list this claim for cache %s: its volume is read-only", pod.Name, cache)
		return d, nil
	}
	if err := claims[i].Validate(pod); err != nil {
		d.reason, d.message = ReasonNotOwned, fmt.Sprintf("pod %s's claim for cache %s: %s: its volume is read-only", pod.Name, cache, err)
		return d, nil
	}
	d.claim = &claims[i]
	if claims[i].Trust != v1alpha1.TrustWrite {
		return d, nil // read-only as asked: nothing to report
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	review := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   fmt.Sprintf("system:serviceaccount:%s:%s", pod.Namespace, sa),
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + pod.Namespace, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: pod.Namespace, Verb: VerbCommit, Group: v1alpha1.GroupVersion.Group,
			Resource: "caches", Name: cache,
		},
	}}
	if err := c.Create(ctx, review); err != nil {
		return writeDecision{}, fmt.Errorf("asking whether %s may commit: %w", review.Spec.User, err)
	}
	if !review.Status.Allowed {
		d.reason = ReasonCommitDenied
		d.message = fmt.Sprintf("service account %s may not %s cache %s (bind the layercache-cache-committer ClusterRole to it to allow it): the build reads the cache, its writes will be discarded",
			sa, VerbCommit, cache)
		return d, nil
	}
	d.allowed = true
	return d, nil
}

func parsePositiveQuantity(s string) (resource.Quantity, error) {
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return q, err
	}
	if q.Sign() <= 0 {
		return q, fmt.Errorf("must be positive")
	}
	return q, nil
}
