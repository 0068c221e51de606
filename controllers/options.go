package controllers

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/registry"
)

// DefaultMaxVolumeSize bounds the size of a claim the manager creates.
var DefaultMaxVolumeSize = resource.MustParse("100Gi")

// Options are the manager's settings for its reconcilers.
type Options struct {
	// StorageClass is the only class of the claims the manager creates
	// (default layercache).
	StorageClass string
	// MaxVolumeSize bounds their size (default DefaultMaxVolumeSize).
	MaxVolumeSize resource.Quantity
	// Registry, if set, is where the node agents push caches: deleting a
	// Cache deletes its images there.
	Registry *registry.Client
	// Namespace is the manager's own: the webhook skips its pods and
	// kube-system's.
	Namespace string
}

func (o *Options) defaults() {
	if o.StorageClass == "" {
		o.StorageClass = v1alpha1.DefaultStorageClass
	}
	if o.MaxVolumeSize.IsZero() {
		o.MaxVolumeSize = DefaultMaxVolumeSize
	}
}

// checkClaims makes sure that the claims a pod's annotation lists are ones
// the webhook could have written for this pod: the annotation may have
// been written by hand (in a namespace the webhook skips, say), and the
// manager creates what it lists. Each claim must be one the pod asks for
// (v1alpha1.Claim.Validate), of our class, of a bounded positive size,
// under a valid name that no other claim of the pod uses.
func (o Options) checkClaims(pod *corev1.Pod, claims []v1alpha1.Claim) error {
	o.defaults()
	if len(claims) > v1alpha1.MaxCaches {
		return fmt.Errorf("%d claims: a pod uses at most %d caches", len(claims), v1alpha1.MaxCaches)
	}
	names := map[string]bool{}
	for _, c := range claims {
		size, err := parsePositiveQuantity(c.Size)
		switch {
		case len(validation.IsDNS1123Subdomain(c.ClaimName)) > 0:
			return fmt.Errorf("claim name %q is not a valid name", c.ClaimName)
		case names[c.ClaimName]:
			return fmt.Errorf("claim %s is listed twice", c.ClaimName)
		case c.StorageClass != o.StorageClass:
			return fmt.Errorf("claim %s: storage class %q: only %q is allowed", c.ClaimName, c.StorageClass, o.StorageClass)
		case err != nil:
			return fmt.Errorf("claim %s: size %q: must be a positive quantity", c.ClaimName, c.Size)
		case size.Cmp(o.MaxVolumeSize) > 0:
			return fmt.Errorf("claim %s: size %s is more than the largest allowed, %s (--max-volume-size)", c.ClaimName, c.Size, o.MaxVolumeSize.String())
		}
		if err := c.Validate(pod); err != nil {
			return fmt.Errorf("claim %s: %w", c.ClaimName, err)
		}
		names[c.ClaimName] = true
	}
	return nil
}
