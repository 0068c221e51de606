package webhook

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

var testOptions = Options{StorageClass: "layercache", DefaultSize: resource.MustParse("10Gi")}

func testPod(labels, ann map[string]string, mutate ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "build", Namespace: "ci", Labels: labels, Annotations: ann},
		Spec: corev1.PodSpec{
			RestartPolicy:  corev1.RestartPolicyNever,
			InitContainers: []corev1.Container{{Name: "fetch", Image: "busybox"}},
			Containers:     []corev1.Container{{Name: "build", Image: "busybox"}, {Name: "sidecar", Image: "busybox"}},
		},
	}
	for _, m := range mutate {
		m(p)
	}
	return p
}

func cacheLabel(name string) map[string]string { return map[string]string{v1alpha1.LabelCache: name} }

func TestMakePlanRejects(t *testing.T) {
	tests := []struct {
		name   string
		labels map[string]string
		ann    map[string]string
		mutate func(*corev1.Pod)
		want   string
	}{
		{"bad cache name", cacheLabel("Example_Project"), nil, nil, `label layercache.io/cache="Example_Project": must be a DNS-1123 label`},
		{"empty cache name", cacheLabel(""), nil, nil, `label layercache.io/cache="": must be a DNS-1123 label`},
		{"unknown trust", map[string]string{v1alpha1.LabelCache: "x", v1alpha1.LabelTrust: "admin"}, nil, nil, `label layercache.io/trust="admin": must be "read" or "write"`},
		{"relative mount path", cacheLabel("x"), map[string]string{v1alpha1.AnnotationMountPath: "cache"}, nil, `annotation layercache.io/mount-path="cache": must be an absolute path`},
		{"unclean mount path", cacheLabel("x"), map[string]string{v1alpha1.AnnotationMountPath: "/a/../b/"}, nil, `must be a clean path (/b)`},
		{"root mount path", cacheLabel("x"), map[string]string{v1alpha1.AnnotationMountPath: "/"}, nil, `must not be /`},
		{"bad size", cacheLabel("x"), map[string]string{v1alpha1.AnnotationSize: "lots"}, nil, `annotation layercache.io/size="lots": must be a positive quantity`},
		{"zero size", cacheLabel("x"), map[string]string{v1alpha1.AnnotationSize: "0"}, nil, `must be a positive quantity`},
		{"bad inode bound", cacheLabel("x"), map[string]string{v1alpha1.AnnotationMaxInodes: "many"}, nil, `annotation layercache.io/max-inodes="many": must be a positive integer`},
		{"missing volume", cacheLabel("x"), map[string]string{v1alpha1.AnnotationVolume: "workspace"}, nil, `annotation layercache.io/volume="workspace": names no volume of the pod`},
		{"bad commit-on-failure", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCommitOnFailure: "yes"}, nil, `must be "true" or "false"`},
		{"bad setuid", cacheLabel("x"), map[string]string{v1alpha1.AnnotationSetuid: "on"}, nil, `annotation layercache.io/setuid="on": must be "true" or "false"`},
		{"mount path clash", cacheLabel("x"), nil, func(p *corev1.Pod) {
			p.Spec.Containers[1].VolumeMounts = []corev1.VolumeMount{{Name: "scratch", MountPath: "/cache/"}}
		}, `where container "sidecar" already mounts volume "scratch"`},
		{"caches syntax", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: "gomod"}, nil, `entry "gomod": want NAME=/mount/path`},
		{"caches bad name", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: "Go=/go"}, nil, `cache name "Go" must be a DNS-1123 label`},
		{"caches relative path", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: "go=go"}, nil, `mount path of "go" must be an absolute path`},
		{"caches duplicate", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: "x=/other"}, nil, `names cache "x" twice`},
		{"too many caches", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: manyCaches(8)}, nil, `lists 8 caches: a pod uses at most 8, its label's included`},
		{"caches same path", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: "y=/cache"}, nil, `caches "x" and "y" are both mounted at /cache`},
		{"caches empty", cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: " "}, nil, `must list NAME=/mount/path pairs`},
		{"volume-at nothing there", cacheLabel("x"), map[string]string{v1alpha1.AnnotationVolumeAt: "/workspace/src"}, nil,
			`annotation layercache.io/volume-at="/workspace/src": no container of the pod mounts a volume there`},
		{"volume-at relative", cacheLabel("x"), map[string]string{v1alpha1.AnnotationVolumeAt: "workspace/src"}, nil, `must be an absolute path`},
		{"volume-at and volume", cacheLabel("x"), map[string]string{v1alpha1.AnnotationVolumeAt: "/workspace/src", v1alpha1.AnnotationVolume: "ws"}, nil,
			`must not be set together with annotation layercache.io/volume`},
		{"volume-at two volumes", cacheLabel("x"), map[string]string{v1alpha1.AnnotationVolumeAt: "/workspace/src"}, func(p *corev1.Pod) {
			p.Spec.Volumes = []corev1.Volume{{Name: "ws-a"}, {Name: "ws-b"}}
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "ws-a", MountPath: "/workspace/src"}}
			p.Spec.Containers[1].VolumeMounts = []corev1.VolumeMount{{Name: "ws-b", MountPath: "/workspace/src/"}}
		}, `volumes "ws-a" and "ws-b" are both mounted there`},
		{"restore-from empty", cacheLabel("x"), map[string]string{v1alpha1.AnnotationRestoreFrom: ""}, nil,
			`annotation layercache.io/restore-from="": must list cache names`},
		{"restore-from bad name", cacheLabel("x"), map[string]string{v1alpha1.AnnotationRestoreFrom: "main,Main"}, nil, `cache name "Main" must be a DNS-1123 label`},
		{"restore-from own cache", cacheLabel("x"), map[string]string{v1alpha1.AnnotationRestoreFrom: "main, x"}, nil, `names the claim's own cache "x"`},
		{"restore-from twice", cacheLabel("x"), map[string]string{v1alpha1.AnnotationRestoreFrom: "main,main"}, nil, `names cache "main" twice`},
		{"restore-from too many", cacheLabel("x"), map[string]string{v1alpha1.AnnotationRestoreFrom: "a,b,c,d,e,f,g,h,i,j,k"}, nil, `lists 11 caches, at most 10`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mutate []func(*corev1.Pod)
			if tt.mutate != nil {
				mutate = append(mutate, tt.mutate)
			}
			_, err := makePlan(testPod(tt.labels, tt.ann, mutate...), testOptions)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func fixedSuffix() string { return "abcde" }

func claimsOf(t *testing.T, pod *corev1.Pod) []v1alpha1.Claim {
	t.Helper()
	var claims []v1alpha1.Claim
	if err := json.Unmarshal([]byte(pod.Annotations[v1alpha1.AnnotationClaims]), &claims); err != nil {
		t.Fatalf("claims annotation: %v", err)
	}
	return claims
}

func mutated(t *testing.T, pod *corev1.Pod, caches ...*v1alpha1.Cache) (*corev1.Pod, *plan) {
	t.Helper()
	p, err := makePlan(pod, testOptions)
	if err != nil {
		t.Fatal(err)
	}
	if caches == nil {
		caches = make([]*v1alpha1.Cache, len(p.requests))
	}
	if err := apply(pod, p, caches, testOptions, fixedSuffix); err != nil {
		t.Fatal(err)
	}
	return pod, p
}

func TestMutationAddsVolumeAndMounts(t *testing.T) {
	pod, p := mutated(t, testPod(map[string]string{v1alpha1.LabelCache: "example-project", v1alpha1.LabelTrust: "write"},
		map[string]string{v1alpha1.AnnotationMountPath: "/root/.m2", v1alpha1.AnnotationSize: "2Gi", v1alpha1.AnnotationMaxInodes: "20000"}))
	if len(p.warnings) != 0 {
		t.Errorf("warnings = %v", p.warnings)
	}
	claims := claimsOf(t, pod)
	want := v1alpha1.Claim{Cache: "example-project", ClaimName: "build-example-project-abcde", Volume: "cache",
		Trust: "write", Size: "2Gi", StorageClass: "layercache", MountPath: "/root/.m2", MaxInodes: 20000}
	if len(claims) != 1 || !equality.Semantic.DeepEqual(claims[0], want) {
		t.Fatalf("claims = %+v, want %+v", claims, want)
	}
	v := pod.Spec.Volumes[len(pod.Spec.Volumes)-1]
	if v.Name != "cache" || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != want.ClaimName {
		t.Fatalf("volume = %+v", v)
	}
	for _, c := range allContainers(pod) {
		if n := len(c.VolumeMounts); n != 1 || c.VolumeMounts[0].MountPath != "/root/.m2" || c.VolumeMounts[0].Name != "cache" {
			t.Errorf("container %s mounts %+v", c.Name, c.VolumeMounts)
		}
	}
	if pod.Spec.Affinity != nil {
		t.Errorf("affinity without a Cache: %+v", pod.Spec.Affinity)
	}
}

// A Tekton workspace or Job template declares a "cache" emptyDir: it is
// replaced, and the pod's own mounts (subPath included) stay as written.
func TestMutationReplacesPlaceholderVolume(t *testing.T) {
	placeholder := func(name string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.Volumes = []corev1.Volume{{Name: name, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: name, MountPath: "/workspace/cache", SubPath: "m2"}}
		}
	}
	for _, tt := range []struct {
		volume string
		ann    map[string]string
	}{
		{"cache", nil},
		{"ws-deps", map[string]string{v1alpha1.AnnotationVolume: "ws-deps"}},
		{"ws-x7k2p", map[string]string{v1alpha1.AnnotationVolumeAt: "/workspace/cache"}},
	} {
		pod, _ := mutated(t, testPod(cacheLabel("deps"), tt.ann, placeholder(tt.volume)))
		if len(pod.Spec.Volumes) != 1 || pod.Spec.Volumes[0].Name != tt.volume || pod.Spec.Volumes[0].EmptyDir != nil ||
			pod.Spec.Volumes[0].PersistentVolumeClaim.ClaimName != "build-deps-abcde" {
			t.Errorf("%s: volumes = %+v", tt.volume, pod.Spec.Volumes)
		}
		m := pod.Spec.Containers[0].VolumeMounts
		if len(m) != 1 || m[0].MountPath != "/workspace/cache" || m[0].SubPath != "m2" {
			t.Errorf("%s: the pod's own mount changed: %+v", tt.volume, m)
		}
		if len(pod.Spec.Containers[1].VolumeMounts)+len(pod.Spec.InitContainers[0].VolumeMounts) != 0 {
			t.Errorf("%s: mounts added beside a replaced volume", tt.volume)
		}
		if c := claimsOf(t, pod)[0]; c.MountPath != "" || c.Volume != tt.volume {
			t.Errorf("%s: claim = %+v", tt.volume, c)
		}
	}
}

// Fallback caches are recorded on the pod's own cache's claim only.
func TestMutationRestoreFrom(t *testing.T) {
	pod, _ := mutated(t, testPod(cacheLabel("feature-x"), map[string]string{
		v1alpha1.AnnotationRestoreFrom: "main, release",
		v1alpha1.AnnotationCaches:      "gomod=/go/pkg/mod",
	}))
	claims := claimsOf(t, pod)
	if len(claims) != 2 || strings.Join(claims[0].RestoreFrom, ",") != "main,release" || claims[1].RestoreFrom != nil {
		t.Fatalf("claims = %+v, want main,release on the first claim only", claims)
	}
}

func TestMutationSeveralCaches(t *testing.T) {
	pod, _ := mutated(t, testPod(cacheLabel("gomod"), map[string]string{
		v1alpha1.AnnotationMountPath: "/go/pkg/mod",
		v1alpha1.AnnotationCaches:    "gobuild=/root/.cache/go-build, npm=/root/.npm",
	}))
	claims := claimsOf(t, pod)
	if len(claims) != 3 {
		t.Fatalf("claims = %+v", claims)
	}
	want := map[string]string{"cache": "/go/pkg/mod", "layercache-1": "/root/.cache/go-build", "layercache-2": "/root/.npm"}
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		if want[m.Name] != m.MountPath {
			t.Errorf("mount %s at %s, want %s", m.Name, m.MountPath, want[m.Name])
		}
		delete(want, m.Name)
	}
	if len(want) != 0 {
		t.Errorf("missing mounts %v", want)
	}
	if claims[1].Cache != "gobuild" || claims[1].ClaimName != "build-gobuild-abcde" {
		t.Errorf("claim 1 = %+v", claims[1])
	}
}

func TestMutationPrefersNodesNewestFirst(t *testing.T) {
	at := func(h int) *metav1.Time { t := metav1.NewTime(time.Unix(1_700_000_000+int64(h)*3600, 0)); return &t }
	cache := &v1alpha1.Cache{Status: v1alpha1.CacheStatus{Nodes: []v1alpha1.NodeCacheStatus{
		{Node: "old", LastCommitTime: at(1)}, {Node: "never"}, {Node: "newest", LastCommitTime: at(3)}, {Node: "mid", LastCommitTime: at(2)},
	}}}
	userTerm := corev1.PreferredSchedulingTerm{Weight: 7, Preference: corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{{
		Key: "disk", Operator: corev1.NodeSelectorOpIn, Values: []string{"ssd"}}}}}
	pod, _ := mutated(t, testPod(cacheLabel("x"), nil, func(p *corev1.Pod) {
		p.Spec.NodeSelector = map[string]string{"pool": "ci"}
		p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
			PreferredDuringSchedulingIgnoredDuringExecution: []corev1.PreferredSchedulingTerm{userTerm}}}
	}), cache)
	terms := pod.Spec.Affinity.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution
	if len(terms) != 5 || terms[0].Weight != 7 {
		t.Fatalf("terms = %+v (the user's term must stay first)", terms)
	}
	for i, want := range []struct {
		node   string
		weight int32
	}{{"newest", 100}, {"mid", 90}, {"old", 80}, {"never", 70}} {
		term := terms[i+1]
		if term.Weight != want.weight || term.Preference.MatchFields[0].Values[0] != want.node || term.Preference.MatchFields[0].Key != "metadata.name" {
			t.Errorf("term %d = %+v, want %s weight %d", i+1, term, want.node, want.weight)
		}
	}
	if pod.Spec.NodeSelector["pool"] != "ci" || len(pod.Spec.NodeSelector) != 1 {
		t.Errorf("nodeSelector changed: %v", pod.Spec.NodeSelector)
	}
}

func TestWarnings(t *testing.T) {
	_, p := mutated(t, testPod(map[string]string{v1alpha1.LabelCache: "x", v1alpha1.LabelTrust: "write"}, nil,
		func(p *corev1.Pod) { p.Spec.RestartPolicy = corev1.RestartPolicyAlways }))
	if len(p.warnings) != 1 || !strings.Contains(p.warnings[0], "will never be committed") {
		t.Errorf("warnings = %v", p.warnings)
	}
}

func TestClaimNames(t *testing.T) {
	for _, tt := range []struct {
		name, generateName, want string
	}{
		{"build", "", "build-c-abcde"},
		{"", "job-x7-", "job-x7-c-abcde"},
		{"", "", "pod-c-abcde"},
		{"Bad_Name", "", "pod-c-abcde"},
		{strings.Repeat("a", 253), "", strings.Repeat("a", 253-len("-c-abcde")) + "-c-abcde"},
	} {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: tt.name, GenerateName: tt.generateName}}
		got := claimName(pod, "c", "abcde")
		if got != tt.want || len(validation.IsDNS1123Subdomain(got)) > 0 {
			t.Errorf("claimName(%q, %q) = %q, want %q", tt.name, tt.generateName, got, tt.want)
		}
	}
}

// FuzzPlan: whatever the labels and annotations, planning never panics, and
// a pod it accepts comes out valid: unique volume names, claim names that
// are DNS subdomains, absolute clean mount paths, no two mounts at one path.
func FuzzPlan(f *testing.F) {
	f.Add("example", "write", "/cache", "10Gi", "", "", false)
	f.Add("x", "read", "/root/.m2", "1", "cache", "a=/a,b=/b", true)
	f.Add("Bad", "admin", "rel", "lots", "nope", "=,", false)
	f.Add("a", "", "/a/../b", "-1", "", "a=/x", true)
	f.Fuzz(func(t *testing.T, cache, trust, mountPath, size, volume, caches string, placeholder bool) {
		labels := map[string]string{v1alpha1.LabelCache: cache}
		if trust != "" {
			labels[v1alpha1.LabelTrust] = trust
		}
		ann := map[string]string{}
		for k, v := range map[string]string{v1alpha1.AnnotationMountPath: mountPath, v1alpha1.AnnotationSize: size,
			v1alpha1.AnnotationVolume: volume, v1alpha1.AnnotationCaches: caches} {
			if v != "" {
				ann[k] = v
			}
		}
		pod := testPod(labels, ann, func(p *corev1.Pod) {
			if placeholder {
				p.Spec.Volumes = []corev1.Volume{{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
				p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "cache", MountPath: "/ws"}}
			}
		})
		p, err := makePlan(pod, testOptions)
		if err != nil {
			return
		}
		if err := apply(pod, p, make([]*v1alpha1.Cache, len(p.requests)), testOptions, randomSuffix); err != nil {
			t.Fatal(err)
		}
		names := map[string]bool{}
		for _, v := range pod.Spec.Volumes {
			if names[v.Name] {
				t.Fatalf("volume %q twice", v.Name)
			}
			names[v.Name] = true
			if len(validation.IsDNS1123Label(v.Name)) > 0 {
				t.Fatalf("volume name %q is invalid", v.Name)
			}
			if c := v.PersistentVolumeClaim; c != nil && len(validation.IsDNS1123Subdomain(c.ClaimName)) > 0 {
				t.Fatalf("claim name %q is invalid", c.ClaimName)
			}
		}
		for _, c := range allContainers(pod) {
			paths := map[string]bool{}
			for _, m := range c.VolumeMounts {
				if paths[m.MountPath] {
					t.Fatalf("container %s mounts %s twice", c.Name, m.MountPath)
				}
				paths[m.MountPath] = true
				if !strings.HasPrefix(m.MountPath, "/") || !names[m.Name] {
					t.Fatalf("bad mount %+v", m)
				}
			}
		}
		for _, c := range claimsOf(t, pod) {
			if len(validation.IsDNS1123Label(c.Cache)) > 0 || (c.Trust != "read" && c.Trust != "write") {
				t.Fatalf("bad claim %+v", c)
			}
			if q, err := resource.ParseQuantity(c.Size); err != nil || q.Sign() <= 0 {
				t.Fatalf("bad size in %+v", c)
			}
		}
	})
}

// manyCaches is a layercache.io/caches value listing n caches.
func manyCaches(n int) string {
	var items []string
	for i := range n {
		items = append(items, fmt.Sprintf("c%d=/c%d", i, i))
	}
	return strings.Join(items, ",")
}

// MaxCaches in all is allowed: the label's and seven more.
func TestMakePlanAllowsMaxCaches(t *testing.T) {
	p, err := makePlan(testPod(cacheLabel("x"), map[string]string{v1alpha1.AnnotationCaches: manyCaches(v1alpha1.MaxCaches - 1)}), testOptions)
	if err != nil || len(p.requests) != v1alpha1.MaxCaches {
		t.Fatalf("plan of %d caches: %v, %v", v1alpha1.MaxCaches, p, err)
	}
}
