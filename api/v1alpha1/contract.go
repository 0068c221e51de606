package v1alpha1

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The typed contract between the webhook, the manager and the node agent:
// one parser for each thing they pass one another, so that none of them
// can read it differently.

// MaxCaches bounds the caches one pod uses: its label's and those of
// AnnotationCaches (each is a claim, a PV and a mount on the node).
const MaxCaches = 8

// MaxRestoreFrom bounds the fallback caches a claim may list.
const MaxRestoreFrom = 10

// ParseRestoreFrom reads a list of fallback caches, "NAME[,NAME...]"
// (AnnotationRestoreFrom, AttrRestoreFrom): DNS-1123 labels, none of them
// own (the claim's own cache), each once, at most MaxRestoreFrom. The
// error states the rule that was broken.
func ParseRestoreFrom(list, own string) ([]string, error) {
	if strings.TrimSpace(list) == "" {
		return nil, fmt.Errorf("must list cache names separated by commas")
	}
	var out []string
	for _, item := range strings.Split(list, ",") {
		name := strings.TrimSpace(item)
		switch {
		case len(validation.IsDNS1123Label(name)) > 0:
			return nil, fmt.Errorf("cache name %q must be a DNS-1123 label: at most 63 lower case letters, digits and '-', starting and ending with a letter or digit", name)
		case name == own:
			return nil, fmt.Errorf("names the claim's own cache %q", own)
		case slices.Contains(out, name):
			return nil, fmt.Errorf("names cache %q twice", name)
		}
		out = append(out, name)
	}
	if len(out) > MaxRestoreFrom {
		return nil, fmt.Errorf("lists %d caches, at most %d are allowed", len(out), MaxRestoreFrom)
	}
	return out, nil
}

// VolumeContext is what a PV of ours tells the node agent
// (spec.csi.volumeAttributes): written by the manager's provisioner with
// Attributes, read by the node agent with ParseVolumeContext.
//
// +kubebuilder:object:generate=false
type VolumeContext struct {
	// Kind is KindCache or KindHostDir.
	Kind string
	// Namespace and Cache name the cache (KindCache).
	Namespace, Cache string
	// Write: the volume may be committed (the trust decision).
	Write bool
	// PodUID is the owning build pod's: a writable volume is mounted for
	// that pod only.
	PodUID string
	// RestoreFrom lists the fallback caches, in Namespace.
	RestoreFrom []string
	// Node is the node the volume is for (empty on PVs made before it).
	Node string
	// MaxInodes bounds the files and directories of the volume's writes
	// (AnnotationMaxInodes); zero: the node's bound alone.
	MaxInodes int64
	// Setuid: the volume is mounted without nosuid (AnnotationSetuid).
	Setuid bool
}

// Attributes encodes the volume context as PV volume attributes.
func (v VolumeContext) Attributes() map[string]string {
	attrs := map[string]string{AttrKind: v.Kind, AttrNamespace: v.Namespace, AttrWrite: strconv.FormatBool(v.Write)}
	if v.Cache != "" {
		attrs[AttrCache] = v.Cache
	}
	if v.PodUID != "" {
		attrs[AttrPodUID] = v.PodUID
	}
	if len(v.RestoreFrom) > 0 {
		attrs[AttrRestoreFrom] = strings.Join(v.RestoreFrom, ",")
	}
	if v.Node != "" {
		attrs[AttrNode] = v.Node
	}
	if v.MaxInodes > 0 {
		attrs[AttrMaxInodes] = strconv.FormatInt(v.MaxInodes, 10)
	}
	if v.Setuid {
		attrs[AttrSetuid] = "true"
	}
	return attrs
}

// ParseVolumeContext decodes and checks PV volume attributes (a missing
// kind is a cache, as PVs made before the kind existed are). Only "true"
// allows a commit, and only "true" lets setuid binaries run.
func ParseVolumeContext(attrs map[string]string) (VolumeContext, error) {
	v := VolumeContext{Kind: attrs[AttrKind], Namespace: attrs[AttrNamespace], Cache: attrs[AttrCache],
		Write: attrs[AttrWrite] == "true", PodUID: attrs[AttrPodUID], Node: attrs[AttrNode]}
	if v.Kind != KindHostDir {
		v.Setuid = attrs[AttrSetuid] == "true"
	}
	switch v.Kind {
	case KindHostDir:
		return v, nil
	case KindCache, "":
		v.Kind = KindCache
	default:
		return v, fmt.Errorf("volume attribute %s: unknown kind %q", AttrKind, v.Kind)
	}
	if errs := validation.IsDNS1123Label(v.Namespace); len(errs) > 0 {
		return v, fmt.Errorf("volume attribute %s=%q: not a namespace name", AttrNamespace, v.Namespace)
	}
	if errs := validation.IsDNS1123Label(v.Cache); len(errs) > 0 {
		return v, fmt.Errorf("volume attribute %s=%q: not a cache name", AttrCache, v.Cache)
	}
	if list, ok := attrs[AttrRestoreFrom]; ok && list != "" {
		from, err := ParseRestoreFrom(list, v.Cache)
		if err != nil {
			return v, fmt.Errorf("volume attribute %s=%q: %w", AttrRestoreFrom, list, err)
		}
		v.RestoreFrom = from
	}
	if s, ok := attrs[AttrMaxInodes]; ok {
		n, err := ParseMaxInodes(s)
		if err != nil {
			return v, fmt.Errorf("volume attribute %s=%q: %w", AttrMaxInodes, s, err)
		}
		v.MaxInodes = n
	}
	return v, nil
}

// ParseMaxInodes reads AnnotationMaxInodes (and AttrMaxInodes): a
// positive integer.
func ParseMaxInodes(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("must be a positive integer")
	}
	return n, nil
}

// Validate checks that claim c is one that pod asks for, whoever wrote it
// into the pod's AnnotationClaims (the webhook, or a hand that forged it):
// a valid cache that the pod's label or its AnnotationCaches names, the
// trust the pod's label asks for, a pod volume that references the claim,
// and valid fallbacks. The manager's own bounds (class, size, names) are
// the manager's to check.
func (c Claim) Validate(pod *corev1.Pod) error {
	trust := pod.Labels[LabelTrust]
	if trust == "" {
		trust = TrustRead
	}
	switch {
	case len(validation.IsDNS1123Label(c.Cache)) > 0:
		return fmt.Errorf("cache name %q is not a DNS-1123 label", c.Cache)
	case !podAsksFor(pod, c.Cache):
		return fmt.Errorf("cache %q is neither the pod's label %s nor in its annotation %s", c.Cache, LabelCache, AnnotationCaches)
	case c.Trust != trust:
		return fmt.Errorf("trust %q, but the pod's label %s asks for %q", c.Trust, LabelTrust, trust)
	case c.Setuid != PodAsksForSetuid(pod):
		return fmt.Errorf("setuid %v, but the pod's annotation %s is %q", c.Setuid, AnnotationSetuid, pod.Annotations[AnnotationSetuid])
	case !slices.ContainsFunc(pod.Spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == c.Volume && v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == c.ClaimName
	}):
		return fmt.Errorf("the pod has no volume %q that references it", c.Volume)
	}
	if len(c.RestoreFrom) > 0 {
		if _, err := ParseRestoreFrom(strings.Join(c.RestoreFrom, ","), c.Cache); err != nil {
			return fmt.Errorf("restoreFrom: %w", err)
		}
	}
	if c.MaxInodes < 0 {
		return fmt.Errorf("maxInodes %d: must be positive", c.MaxInodes)
	}
	return nil
}

// podAsksFor tells whether pod's label or AnnotationCaches
// ("NAME=/path,...") names cache.
func podAsksFor(pod *corev1.Pod, cache string) bool {
	if pod.Labels[LabelCache] == cache {
		return true
	}
	for _, item := range strings.Split(pod.Annotations[AnnotationCaches], ",") {
		if name, _, ok := strings.Cut(strings.TrimSpace(item), "="); ok && strings.TrimSpace(name) == cache {
			return true
		}
	}
	return false
}

// LabelPrivileged on a Namespace, set to PrivilegedAllow, lets its
// privileged and host-namespace pods use caches. Such a pod owns its node:
// it can rewrite the committed layers there, read the node agent's token
// and use the CSI socket, so the trust model does not hold for it.
const (
	LabelPrivileged = "layercache.io/privileged"
	PrivilegedAllow = "allow"
)

// LabelSetuid on a Namespace, set to SetuidAllow, lets its pods ask for
// AnnotationSetuid. A setuid binary that one build of the namespace
// commits then runs with its owner's rights in the next builds that read
// the cache (within their containers).
const (
	LabelSetuid = "layercache.io/setuid"
	SetuidAllow = "allow"
)

// PodAsksForSetuid: the pod's AnnotationSetuid is "true".
func PodAsksForSetuid(pod *corev1.Pod) bool { return pod.Annotations[AnnotationSetuid] == "true" }

// NamespaceMustAllow says whether pod asks for something that its
// namespace's labels must allow (CheckNamespace): host access or setuid.
func NamespaceMustAllow(pod *corev1.Pod) bool {
	return HostAccess(pod) != "" || PodAsksForSetuid(pod)
}

// CheckNamespace refuses pod a cache if it is privileged or in a host
// namespace and its namespace (ns) does not have
// LabelPrivileged=PrivilegedAllow, or if it asks for setuid and ns does
// not have LabelSetuid=SetuidAllow.
func CheckNamespace(pod *corev1.Pod, ns *corev1.Namespace) error {
	if access := HostAccess(pod); access != "" && ns.Labels[LabelPrivileged] != PrivilegedAllow {
		return fmt.Errorf("%s: such a pod owns its node and could rewrite the caches there; label namespace %s %s=%s to let its pods use caches anyway",
			access, pod.Namespace, LabelPrivileged, PrivilegedAllow)
	}
	if PodAsksForSetuid(pod) && ns.Labels[LabelSetuid] != SetuidAllow {
		return fmt.Errorf("annotation %s=true: a setuid binary that one build commits would run with its owner's rights in the next builds; label namespace %s %s=%s to allow it",
			AnnotationSetuid, pod.Namespace, LabelSetuid, SetuidAllow)
	}
	return nil
}

// HostAccess says how a pod reaches past its containers into the node (a
// privileged container, a host namespace), or "" if it does not.
func HostAccess(pod *corev1.Pod) string {
	switch {
	case pod.Spec.HostPID:
		return "hostPID"
	case pod.Spec.HostIPC:
		return "hostIPC"
	case pod.Spec.HostNetwork:
		return "hostNetwork"
	}
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			if c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged {
				return "container " + c.Name + " is privileged"
			}
		}
	}
	return ""
}
