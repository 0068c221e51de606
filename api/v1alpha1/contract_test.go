package v1alpha1

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestParseRestoreFrom(t *testing.T) {
	for _, tt := range []struct {
		list, own string
		want      []string
		err       string
	}{
		{"main", "feature", []string{"main"}, ""},
		{"main, release", "feature", []string{"main", "release"}, ""},
		{"", "feature", nil, "must list cache names"},
		{"main,Main", "feature", nil, `cache name "Main" must be a DNS-1123 label`},
		{"main,feature", "feature", nil, `names the claim's own cache "feature"`},
		{"main,main", "feature", nil, `names cache "main" twice`},
		{"a,b,c,d,e,f,g,h,i,j,k", "feature", nil, "lists 11 caches, at most 10"},
	} {
		got, err := ParseRestoreFrom(tt.list, tt.own)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseRestoreFrom(%q) = %v, %v; want an error saying %q", tt.list, got, err, tt.err)
			}
			continue
		}
		if err != nil || strings.Join(got, ",") != strings.Join(tt.want, ",") {
			t.Errorf("ParseRestoreFrom(%q) = %v, %v; want %v", tt.list, got, err, tt.want)
		}
	}
}

// What the provisioner writes, the node agent reads back the same; what
// it could not have written is refused.
func TestVolumeContextRoundTrip(t *testing.T) {
	for _, vc := range []VolumeContext{
		{Kind: KindCache, Namespace: "ci", Cache: "go", Write: true, PodUID: "uid-1", RestoreFrom: []string{"main"}, MaxInodes: 5000, Setuid: true},
		{Kind: KindCache, Namespace: "ci", Cache: "go"},
		{Kind: KindHostDir, Namespace: "ci"},
	} {
		got, err := ParseVolumeContext(vc.Attributes())
		if err != nil || got.Kind != vc.Kind || got.Cache != vc.Cache || got.Write != vc.Write || got.PodUID != vc.PodUID ||
			strings.Join(got.RestoreFrom, ",") != strings.Join(vc.RestoreFrom, ",") || got.MaxInodes != vc.MaxInodes || got.Setuid != vc.Setuid {
			t.Errorf("round trip of %+v: %+v, %v", vc, got, err)
		}
	}
	for _, tt := range []struct {
		attrs map[string]string
		err   string
	}{
		{map[string]string{AttrKind: "block"}, `unknown kind "block"`},
		{map[string]string{AttrNamespace: "ci", AttrCache: "../x"}, "not a cache name"},
		{map[string]string{AttrNamespace: "", AttrCache: "go"}, "not a namespace name"},
		{map[string]string{AttrNamespace: "ci", AttrCache: "go", AttrRestoreFrom: "go"}, "names the claim's own cache"},
		{map[string]string{AttrNamespace: "ci", AttrCache: "go", AttrMaxInodes: "-1"}, "must be a positive integer"},
	} {
		if _, err := ParseVolumeContext(tt.attrs); err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("ParseVolumeContext(%v) = %v, want an error saying %q", tt.attrs, err, tt.err)
		}
	}
	if vc, err := ParseVolumeContext(map[string]string{AttrNamespace: "ci", AttrCache: "go", AttrWrite: "yes"}); err != nil || vc.Write {
		t.Errorf("only \"true\" allows a commit: %+v, %v", vc, err)
	}
	if vc, err := ParseVolumeContext(map[string]string{AttrNamespace: "ci", AttrCache: "go", AttrSetuid: "1"}); err != nil || vc.Setuid {
		t.Errorf("only \"true\" lets setuid binaries run: %+v, %v", vc, err)
	}
	if vc, err := ParseVolumeContext(map[string]string{AttrKind: KindHostDir, AttrNamespace: "ci", AttrSetuid: "true"}); err != nil || vc.Setuid {
		t.Errorf("a host directory is never setuid: %+v, %v", vc, err)
	}
}

func TestClaimValidate(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{LabelCache: "go", LabelTrust: "write"},
			Annotations: map[string]string{AnnotationCaches: "npm=/npm"}},
		Spec: corev1.PodSpec{Volumes: []corev1.Volume{
			{Name: "cache", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "b-go-x"}}},
			{Name: "layercache-1", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "b-npm-x"}}},
		}},
	}
	ok := Claim{Cache: "go", ClaimName: "b-go-x", Volume: "cache", Trust: "write"}
	for _, tt := range []struct {
		name   string
		change func(*Claim)
		err    string
	}{
		{"as the webhook writes it", func(*Claim) {}, ""},
		{"a cache of the caches annotation", func(c *Claim) { c.Cache, c.ClaimName, c.Volume = "npm", "b-npm-x", "layercache-1" }, ""},
		{"a cache the pod does not ask for", func(c *Claim) { c.Cache = "secrets" }, `cache "secrets" is neither`},
		{"less trust than the label", func(c *Claim) { c.Trust = "read" }, `trust "read", but the pod's label`},
		{"a claim no volume references", func(c *Claim) { c.ClaimName = "other" }, `no volume "cache" that references it`},
		{"its own cache as a fallback", func(c *Claim) { c.RestoreFrom = []string{"go"} }, "restoreFrom: names the claim's own cache"},
		{"setuid the pod does not ask for", func(c *Claim) { c.Setuid = true }, `setuid true, but the pod's annotation layercache.io/setuid is ""`},
	} {
		c := ok
		tt.change(&c)
		err := c.Validate(pod)
		if (tt.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.err)
		}
	}
}
