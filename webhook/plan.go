package webhook

import (
	"fmt"
	"net/http"
	"path"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// Options are the manager's settings for the webhook.
type Options struct {
	// StorageClass of the generated claims.
	StorageClass string
	// DefaultSize of a volume's writable layer when the pod does not say.
	DefaultSize resource.Quantity
	// MaxSize, if not zero, is the largest size a pod may ask for.
	MaxSize resource.Quantity
	// Wrap, if set, wraps the handler as the server serves it (the
	// manager closes connections while it drains).
	Wrap func(http.Handler) http.Handler
}

// request is one cache a pod asks for.
type request struct {
	cache string
	// replace is the pod volume to replace; empty to add a volume.
	replace string
	// mountPath is where an added volume is mounted.
	mountPath string
	// volume is the pod volume name the claim ends up under.
	volume string
}

// plan is what the labels and annotations of a pod ask for, validated.
type plan struct {
	trust    string
	size     resource.Quantity
	requests []request
	// restoreFrom are the fallback caches of the pod's own cache (the
	// first request).
	restoreFrom []string
	// maxInodes is AnnotationMaxInodes (zero: not set).
	maxInodes int64
	// setuid is AnnotationSetuid.
	setuid   bool
	warnings []string
}

// fieldError names the label or annotation at fault and the rule it breaks.
type fieldError struct {
	kind, key, value, rule string
}

func (e *fieldError) Error() string {
	return fmt.Sprintf("%s %s=%q: %s", e.kind, e.key, e.value, e.rule)
}

func labelError(key, value, rule string) error { return &fieldError{"label", key, value, rule} }
func annotationError(key, value, rule string) error {
	return &fieldError{"annotation", key, value, rule}
}

const dns1123Rule = "must be a DNS-1123 label: at most 63 lower case letters, digits and '-', starting and ending with a letter or digit"

// makePlan reads and validates everything layercache takes from a pod. It
// changes nothing: a pod is either fully valid or rejected.
func makePlan(pod *corev1.Pod, opts Options) (*plan, error) {
	p := &plan{trust: v1alpha1.TrustRead, size: opts.DefaultSize}
	name := pod.Labels[v1alpha1.LabelCache]
	if err := p.readSettings(pod, name, opts); err != nil {
		return nil, err
	}
	primary, err := p.primaryRequest(pod, name)
	if err != nil {
		return nil, err
	}
	p.requests = append(p.requests, primary)
	ann := pod.Annotations
	extra, err := parseCaches(ann[v1alpha1.AnnotationCaches], ann)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{name: true}
	for i, r := range extra {
		if seen[r.cache] {
			return nil, annotationError(v1alpha1.AnnotationCaches, ann[v1alpha1.AnnotationCaches], fmt.Sprintf("names cache %q twice", r.cache))
		}
		seen[r.cache] = true
		r.volume = fmt.Sprintf("layercache-%d", i+1)
		p.requests = append(p.requests, r)
	}
	if err := p.checkAddedVolumes(pod); err != nil {
		return nil, err
	}
	if p.trust == v1alpha1.TrustWrite && pod.Spec.RestartPolicy == corev1.RestartPolicyAlways {
		p.warnings = append(p.warnings, fmt.Sprintf("label %s=write on a pod with restartPolicy Always: the pod never terminates, so its writes will never be committed",
			v1alpha1.LabelTrust))
	}
	return p, nil
}

// readSettings reads the cache name, the trust, the size, commit on
// failure and the fallback caches.
func (p *plan) readSettings(pod *corev1.Pod, name string, opts Options) error {
	labels, ann := pod.Labels, pod.Annotations
	if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
		return labelError(v1alpha1.LabelCache, name, dns1123Rule)
	}
	if t, ok := labels[v1alpha1.LabelTrust]; ok {
		if t != v1alpha1.TrustRead && t != v1alpha1.TrustWrite {
			return labelError(v1alpha1.LabelTrust, t, `must be "read" or "write"`)
		}
		p.trust = t
	}
	if s, ok := ann[v1alpha1.AnnotationSize]; ok {
		q, err := resource.ParseQuantity(s)
		if err != nil || q.Sign() <= 0 {
			return annotationError(v1alpha1.AnnotationSize, s, `must be a positive quantity such as "10Gi"`)
		}
		if !opts.MaxSize.IsZero() && q.Cmp(opts.MaxSize) > 0 {
			return annotationError(v1alpha1.AnnotationSize, s, fmt.Sprintf("must be at most %s (the manager's --max-volume-size)", opts.MaxSize.String()))
		}
		p.size = q
	}
	if s, ok := ann[v1alpha1.AnnotationMaxInodes]; ok {
		n, err := v1alpha1.ParseMaxInodes(s)
		if err != nil {
			return annotationError(v1alpha1.AnnotationMaxInodes, s, err.Error()+" (files and directories)")
		}
		p.maxInodes = n
	}
	for _, key := range []string{v1alpha1.AnnotationCommitOnFailure, v1alpha1.AnnotationSetuid} {
		if v, ok := ann[key]; ok && v != "true" && v != "false" {
			return annotationError(key, v, `must be "true" or "false"`)
		}
	}
	p.setuid = ann[v1alpha1.AnnotationSetuid] == "true"
	if list, ok := ann[v1alpha1.AnnotationRestoreFrom]; ok {
		from, err := parseRestoreFrom(list, name)
		if err != nil {
			return err
		}
		p.restoreFrom = from
	}
	return nil
}

// primaryRequest is the pod's own cache: the volume it replaces (named,
// found by its mount path, or the default "cache" volume) or the volume
// added, and where.
func (p *plan) primaryRequest(pod *corev1.Pod, name string) (request, error) {
	ann := pod.Annotations
	volumes := podVolumes(pod)
	primary := request{cache: name}
	replace, explicit := ann[v1alpha1.AnnotationVolume]
	at, byPath := ann[v1alpha1.AnnotationVolumeAt]
	switch {
	case explicit && byPath:
		return primary, annotationError(v1alpha1.AnnotationVolumeAt, at, fmt.Sprintf("must not be set together with annotation %s: name the volume or where it is mounted, not both", v1alpha1.AnnotationVolume))
	case explicit && !volumes[replace]:
		return primary, annotationError(v1alpha1.AnnotationVolume, replace, "names no volume of the pod")
	case explicit:
		primary.replace = replace
	case byPath:
		v, err := volumeMountedAt(pod, at)
		if err != nil {
			return primary, err
		}
		primary.replace = v
	case volumes[v1alpha1.DefaultVolumeName]:
		primary.replace = v1alpha1.DefaultVolumeName
	}
	mountPath, hasPath := ann[v1alpha1.AnnotationMountPath]
	if hasPath {
		if err := checkMountPath(v1alpha1.AnnotationMountPath, mountPath); err != nil {
			return primary, err
		}
	}
	if primary.replace != "" {
		primary.volume = primary.replace
		if hasPath {
			p.warnings = append(p.warnings, fmt.Sprintf("annotation %s is ignored: volume %q is replaced and mounted where the pod mounts it",
				v1alpha1.AnnotationMountPath, primary.replace))
		}
		return primary, nil
	}
	primary.volume = v1alpha1.DefaultVolumeName
	primary.mountPath = v1alpha1.DefaultMountPath
	if hasPath {
		primary.mountPath = mountPath
	}
	return primary, nil
}

func podVolumes(pod *corev1.Pod) map[string]bool {
	volumes := map[string]bool{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = true
	}
	return volumes
}

// checkAddedVolumes makes sure that the volumes the plan adds collide with
// none of the pod's volumes or mounts, nor with one another.
func (p *plan) checkAddedVolumes(pod *corev1.Pod) error {
	volumes := podVolumes(pod)
	paths := map[string]string{}
	for _, r := range p.requests {
		if r.replace != "" {
			continue
		}
		if volumes[r.volume] {
			return fmt.Errorf("pod already has a volume named %q: name it in annotation %s to have it replaced, or rename it", r.volume, v1alpha1.AnnotationVolume)
		}
		if other, ok := paths[r.mountPath]; ok {
			return fmt.Errorf("caches %q and %q are both mounted at %s", other, r.cache, r.mountPath)
		}
		paths[r.mountPath] = r.cache
		for _, c := range allContainers(pod) {
			for _, m := range c.VolumeMounts {
				if path.Clean(m.MountPath) == r.mountPath {
					return fmt.Errorf("cache %q would be mounted at %s, where container %q already mounts volume %q (set annotation %s)",
						r.cache, r.mountPath, c.Name, m.Name, v1alpha1.AnnotationMountPath)
				}
			}
		}
	}
	return nil
}

func checkMountPath(key, p string) error {
	switch {
	case !strings.HasPrefix(p, "/"):
		return annotationError(key, p, "must be an absolute path")
	case path.Clean(p) != p:
		return annotationError(key, p, fmt.Sprintf("must be a clean path (%s)", path.Clean(p)))
	case p == "/":
		return annotationError(key, p, "must not be /")
	case strings.ContainsAny(p, ",=\x00"):
		return annotationError(key, p, "must not contain ',', '=' or NUL")
	}
	return nil
}

// volumeMountedAt returns the one volume that the pod's containers mount
// at path.
func volumeMountedAt(pod *corev1.Pod, at string) (string, error) {
	if err := checkMountPath(v1alpha1.AnnotationVolumeAt, at); err != nil {
		return "", err
	}
	found := ""
	for _, c := range allContainers(pod) {
		for _, m := range c.VolumeMounts {
			if path.Clean(m.MountPath) != at {
				continue
			}
			if found != "" && found != m.Name {
				return "", annotationError(v1alpha1.AnnotationVolumeAt, at, fmt.Sprintf("volumes %q and %q are both mounted there", found, m.Name))
			}
			found = m.Name
		}
	}
	if found == "" {
		return "", annotationError(v1alpha1.AnnotationVolumeAt, at, "no container of the pod mounts a volume there")
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name == found {
			return found, nil
		}
	}
	return "", annotationError(v1alpha1.AnnotationVolumeAt, at, fmt.Sprintf("volume %q mounted there is not a volume of the pod", found))
}

// parseRestoreFrom reads AnnotationRestoreFrom with the contract's parser:
// caches of the pod's namespace, not the pod's own cache, each once.
func parseRestoreFrom(s, own string) ([]string, error) {
	out, err := v1alpha1.ParseRestoreFrom(s, own)
	if err != nil {
		return nil, annotationError(v1alpha1.AnnotationRestoreFrom, s, err.Error())
	}
	return out, nil
}

// parseCaches reads "NAME=/path,NAME=/path".
func parseCaches(s string, ann map[string]string) ([]request, error) {
	if strings.TrimSpace(s) == "" {
		if _, ok := ann[v1alpha1.AnnotationCaches]; ok {
			return nil, annotationError(v1alpha1.AnnotationCaches, s, "must list NAME=/mount/path pairs separated by commas")
		}
		return nil, nil
	}
	items := strings.Split(s, ",")
	if len(items) > v1alpha1.MaxCaches-1 {
		return nil, annotationError(v1alpha1.AnnotationCaches, s, fmt.Sprintf("lists %d caches: a pod uses at most %d, its label's included", len(items), v1alpha1.MaxCaches))
	}
	var out []request
	for _, item := range items {
		name, mountPath, ok := strings.Cut(strings.TrimSpace(item), "=")
		name, mountPath = strings.TrimSpace(name), strings.TrimSpace(mountPath)
		if !ok || name == "" || mountPath == "" {
			return nil, annotationError(v1alpha1.AnnotationCaches, s, fmt.Sprintf("entry %q: want NAME=/mount/path", strings.TrimSpace(item)))
		}
		if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
			return nil, annotationError(v1alpha1.AnnotationCaches, s, fmt.Sprintf("cache name %q %s", name, dns1123Rule))
		}
		if err := checkMountPath(v1alpha1.AnnotationCaches, mountPath); err != nil {
			return nil, annotationError(v1alpha1.AnnotationCaches, s, fmt.Sprintf("mount path of %q %s", name, err.(*fieldError).rule))
		}
		out = append(out, request{cache: name, mountPath: mountPath})
	}
	return out, nil
}

func allContainers(pod *corev1.Pod) []*corev1.Container {
	var out []*corev1.Container
	for i := range pod.Spec.InitContainers {
		out = append(out, &pod.Spec.InitContainers[i])
	}
	for i := range pod.Spec.Containers {
		out = append(out, &pod.Spec.Containers[i])
	}
	return out
}
