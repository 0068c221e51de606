package webhook

import (
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// verifyClaims checks a pod that arrives with the claims annotation
// already set. A pod that this webhook mutated and another webhook then
// changed (reinvocation) passes. A pod that wrote the annotation itself
// passes only if it wrote exactly what this webhook would have written for
// its labels and annotations: the same caches, trust, size and class, claim
// names made the webhook's way, each referenced by the pod's own volume.
// Anything else is denied: the manager creates the claims the annotation
// lists.
func verifyClaims(pod *corev1.Pod, raw string, opts Options) error {
	forged := func(format string, args ...any) error {
		return fmt.Errorf("annotation %s is written by layercache's webhook and does not match this pod: %s",
			v1alpha1.AnnotationClaims, fmt.Sprintf(format, args...))
	}
	var claims []v1alpha1.Claim
	if err := json.Unmarshal([]byte(raw), &claims); err != nil || len(claims) == 0 {
		return forged("not a JSON list of claims")
	}
	// Undo what apply did, then plan again as at the first admission.
	orig := pod.DeepCopy()
	delete(orig.Annotations, v1alpha1.AnnotationClaims)
	suffixes := make([]string, len(claims))
	for i, c := range claims {
		suffixes[i] = claimSuffix(c.ClaimName)
		if c.MountPath == "" {
			for j := range orig.Spec.Volumes {
				if orig.Spec.Volumes[j].Name == c.Volume {
					orig.Spec.Volumes[j].VolumeSource = corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}
				}
			}
			continue
		}
		orig.Spec.Volumes = deleteVolume(orig.Spec.Volumes, c.Volume)
		for _, ctr := range allContainers(orig) {
			ctr.VolumeMounts = deleteMount(ctr.VolumeMounts, c.Volume, c.MountPath)
		}
	}
	p, err := makePlan(orig, opts)
	if err != nil {
		return err
	}
	if len(p.requests) != len(claims) {
		return forged("it lists %d claims, the pod's labels and annotations ask for %d", len(claims), len(p.requests))
	}
	i := 0
	next := func() string { i++; return suffixes[i-1] }
	if err := apply(orig, p, nil, opts, next); err != nil {
		return err
	}
	var want []v1alpha1.Claim
	if err := json.Unmarshal([]byte(orig.Annotations[v1alpha1.AnnotationClaims]), &want); err != nil {
		return err
	}
	for i := range claims {
		if !equality.Semantic.DeepEqual(claims[i], want[i]) {
			return forged("claim %d is %+v, want %+v", i+1, claims[i], want[i])
		}
		if !referencesClaim(pod, claims[i]) {
			return forged("volume %q does not reference claim %s", claims[i].Volume, claims[i].ClaimName)
		}
	}
	return nil
}

// claimSuffix returns the random part of a claim name made by claimName,
// or "" if it has none (and so cannot match).
func claimSuffix(name string) string {
	i := strings.LastIndexByte(name, '-')
	s := name[i+1:]
	if len(s) != 5 || strings.Trim(s, suffixAlphabet) != "" {
		return ""
	}
	return s
}

func referencesClaim(pod *corev1.Pod, c v1alpha1.Claim) bool {
	for _, v := range pod.Spec.Volumes {
		if v.Name == c.Volume {
			return v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == c.ClaimName
		}
	}
	return false
}

func deleteVolume(vols []corev1.Volume, name string) []corev1.Volume {
	out := vols[:0:0]
	for _, v := range vols {
		if v.Name != name {
			out = append(out, v)
		}
	}
	return out
}

func deleteMount(mounts []corev1.VolumeMount, name, path string) []corev1.VolumeMount {
	out := mounts[:0:0]
	for _, m := range mounts {
		if m.Name != name || m.MountPath != path {
			out = append(out, m)
		}
	}
	return out
}
