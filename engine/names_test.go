package engine

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	long := strings.Repeat("a", 63)
	tests := []struct {
		name string
		ok   bool
	}{
		{"example-project", true},
		{"a", true},
		{"0", true},
		{"a-b-c9", true},
		{long, true},
		{long + "a", false},
		{"", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{"../etc", false},
		{"/abs", false},
		{"-lead", false},
		{"trail-", false},
		{"Upper", false},
		{"dot.ted", false},
		{"under_score", false},
		{"spa ce", false},
		{"nul\x00", false},
		{"ünï", false},
	}
	for _, tt := range tests {
		err := ValidateName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestParseKey(t *testing.T) {
	tests := []struct {
		in      string
		want    Key
		wantErr string
	}{
		{in: "ci/example-project", want: Key{"ci", "example-project"}},
		{in: "example-project", wantErr: "want NAMESPACE/NAME"},
		{in: "ci/a/b", wantErr: "invalid cache name"},
		{in: "../x", wantErr: "invalid namespace"},
		{in: "ci/..", wantErr: "invalid cache name"},
		{in: "/x", wantErr: "invalid namespace"},
	}
	for _, tt := range tests {
		got, err := ParseKey(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseKey(%q) error = %v, want it to mention %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseKey(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

func TestValidateVolumeID(t *testing.T) {
	for id, ok := range map[string]bool{
		"pvc-0f4c9a7e-3b1d-4c2e-9a8f-1234567890ab": true,
		"cli-1a2b":               true,
		"a.b":                    true,
		"a..b":                   false,
		"..":                     false,
		"a/b":                    false,
		"":                       false,
		"-a":                     false,
		"a.":                     false,
		"Pvc-1":                  false,
		strings.Repeat("a", 129): false,
	} {
		if err := ValidateVolumeID(id); (err == nil) != ok {
			t.Errorf("ValidateVolumeID(%q) = %v, want ok=%v", id, err, ok)
		}
	}
}

// FuzzParseKey: whatever the input, an accepted key names exactly two
// path components below the store root, neither "." nor "..".
func FuzzParseKey(f *testing.F) {
	for _, s := range []string{"ci/example", "a/b", "../x", "ci/..", "a/b/c", "/", "ci/", "a\x00/b", "ns/" + strings.Repeat("x", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseKey(s)
		if err != nil {
			return
		}
		root := "/var/lib/layercache/caches"
		p := filepath.Join(root, k.Namespace, k.Name)
		if p != root+"/"+k.Namespace+"/"+k.Name || filepath.Dir(filepath.Dir(p)) != root {
			t.Fatalf("key %q builds path %q outside %s", s, p, root)
		}
		for _, part := range []string{k.Namespace, k.Name} {
			if part == "." || part == ".." || strings.ContainsAny(part, "/\x00.,: ") {
				t.Fatalf("key %q has unsafe part %q", s, part)
			}
		}
		if k.String() != s {
			t.Fatalf("key %q does not round-trip: %q", s, k.String())
		}
	})
}

// FuzzValidateVolumeID: an accepted volume ID is one safe path component.
func FuzzValidateVolumeID(f *testing.F) {
	for _, s := range []string{"pvc-1", "a.b", "..", "a/../b", ".hidden", "a..b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ValidateVolumeID(id) != nil {
			return
		}
		if filepath.Base(id) != id || id == "." || id == ".." || strings.Contains(id, "..") || strings.HasPrefix(id, ".") {
			t.Fatalf("volume ID %q is not a safe path component", id)
		}
		if filepath.Dir(filepath.Join("/root/volumes", id)) != "/root/volumes" {
			t.Fatalf("volume ID %q leaves the volumes dir", id)
		}
	})
}
