package webhook

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math/big"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// maxAffinityNodes bounds the preferred terms added per cache.
const maxAffinityNodes = 10

// apply mutates pod as p says: every requested cache becomes a volume that
// references a generated claim, mounted where asked; the claims are
// recorded in one annotation; nodes holding the caches are preferred.
// caches are the Caches whose nodes to prefer (nil entries are skipped).
func apply(pod *corev1.Pod, p *plan, caches []*v1alpha1.Cache, opts Options, suffix func() string) error {
	var claims []v1alpha1.Claim
	for i, r := range p.requests {
		claim := v1alpha1.Claim{
			Cache: r.cache, ClaimName: claimName(pod, r.cache, suffix()), Volume: r.volume,
			Trust: p.trust, Size: p.size.String(), StorageClass: opts.StorageClass, MountPath: r.mountPath,
			MaxInodes: p.maxInodes, Setuid: p.setuid,
		}
		if i == 0 { // the pod's own cache
			claim.RestoreFrom = p.restoreFrom
		}
		source := corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim.ClaimName}}
		if r.replace != "" {
			for i := range pod.Spec.Volumes {
				if pod.Spec.Volumes[i].Name == r.replace {
					pod.Spec.Volumes[i].VolumeSource = source
				}
			}
		} else {
			pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: r.volume, VolumeSource: source})
			for _, c := range allContainers(pod) {
				c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: r.volume, MountPath: r.mountPath})
			}
		}
		claims = append(claims, claim)
	}
	data, err := json.Marshal(claims)
	if err != nil {
		return err
	}
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[v1alpha1.AnnotationClaims] = string(data)
	addGate(pod)
	addAffinity(pod, caches)
	return nil
}

// addGate holds the pod back from the scheduler until the manager has
// created its claims: a pod whose claim does not exist yet fails
// scheduling and backs off.
func addGate(pod *corev1.Pod) {
	for _, g := range pod.Spec.SchedulingGates {
		if g.Name == v1alpha1.SchedulingGate {
			return
		}
	}
	pod.Spec.SchedulingGates = append(pod.Spec.SchedulingGates, corev1.PodSchedulingGate{Name: v1alpha1.SchedulingGate})
}

// claimName is the pod's name (or generateName) plus the cache name and a
// random suffix: unique, and readable in `kubectl get pvc`.
func claimName(pod *corev1.Pod, cache, suffix string) string {
	base := pod.Name
	if base == "" {
		base = strings.TrimRight(pod.GenerateName, "-.")
	}
	tail := "-" + cache + "-" + suffix
	if room := validation.DNS1123SubdomainMaxLength - len(tail); len(base) > room {
		base = strings.TrimRight(base[:room], "-.")
	}
	if base == "" || len(validation.IsDNS1123Subdomain(base+tail)) > 0 {
		base = "pod" // the API server rejects the pod's own bad name anyway
	}
	return base + tail
}

const suffixAlphabet = "bcdfghjklmnpqrstvwxz2456789"

func randomSuffix() string {
	b := make([]byte, 5)
	for i := range b {
		n, err := rand.Int(rand.Reader, big.NewInt(int64(len(suffixAlphabet))))
		if err != nil {
			panic(fmt.Sprintf("crypto/rand failed: %v", err))
		}
		b[i] = suffixAlphabet[n.Int64()]
	}
	return string(b)
}

// addAffinity prefers the nodes that hold the caches, the newest commit
// weighted highest. The pod's own affinity and nodeSelector stay as they
// are: these are preferences added beside them.
func addAffinity(pod *corev1.Pod, caches []*v1alpha1.Cache) {
	var terms []corev1.PreferredSchedulingTerm
	for _, c := range caches {
		if c == nil {
			continue
		}
		nodes := slices.Clone(c.Status.Nodes)
		slices.SortStableFunc(nodes, func(a, b v1alpha1.NodeCacheStatus) int {
			switch {
			case a.LastCommitTime == nil && b.LastCommitTime == nil:
				return 0
			case a.LastCommitTime == nil:
				return 1
			case b.LastCommitTime == nil:
				return -1
			}
			return b.LastCommitTime.Compare(a.LastCommitTime.Time)
		})
		for i, n := range nodes {
			if i == maxAffinityNodes || n.Node == "" {
				break
			}
			terms = append(terms, corev1.PreferredSchedulingTerm{
				Weight: int32(max(100-10*i, 10)),
				Preference: corev1.NodeSelectorTerm{MatchFields: []corev1.NodeSelectorRequirement{{
					Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{n.Node},
				}}},
			})
		}
	}
	if len(terms) == 0 {
		return
	}
	if pod.Spec.Affinity == nil {
		pod.Spec.Affinity = &corev1.Affinity{}
	}
	if pod.Spec.Affinity.NodeAffinity == nil {
		pod.Spec.Affinity.NodeAffinity = &corev1.NodeAffinity{}
	}
	na := pod.Spec.Affinity.NodeAffinity
	na.PreferredDuringSchedulingIgnoredDuringExecution = append(na.PreferredDuringSchedulingIgnoredDuringExecution, terms...)
}
