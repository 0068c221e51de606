package testenv

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Apply creates every object of the YAML files (relative to the
// repository root): the shipped manifests, as they are.
func (e *Env) Apply(t testing.TB, files ...string) {
	t.Helper()
	for _, f := range files {
		data, err := os.Open(filepath.Join(e.Root, f))
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewYAMLOrJSONDecoder(data, 4096)
		for {
			u := &unstructured.Unstructured{}
			if err := dec.Decode(&u.Object); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if len(u.Object) == 0 {
				continue
			}
			if err := e.Client.Create(context.Background(), u); err != nil {
				t.Fatalf("%s: creating %s %s: %v", f, u.GetKind(), u.GetName(), err)
			}
		}
		_ = data.Close()
	}
}

// ServiceAccount is a client that acts as a service account of namespace
// ns (impersonated, with the groups a token gives), with the extra
// information of a bound token (authentication.kubernetes.io/node-name,
// say).
func (e *Env) ServiceAccount(t testing.TB, ns, name string, extra map[string][]string) client.Client {
	t.Helper()
	cfg := rest.CopyConfig(e.Config)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:" + ns + ":" + name,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		Extra:    extra,
	}
	c, err := client.New(cfg, client.Options{Scheme: e.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
