package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/layercache/layercache/internal/testenv"
)

// config/default and config/local, as `kubectl apply -k` renders them, are
// accepted by a real API server with strict field validation (server-side
// dry run; the Namespace and CRD are applied for real first, cert-manager's
// kinds are left out as envtest lacks its CRDs).
func TestManifestsAreValid(t *testing.T) {
	env := testenv.Start(t)
	for _, overlay := range []string{"default", "local"} {
		t.Run(overlay, func(t *testing.T) { checkOverlay(t, env, overlay) })
	}
}

func checkOverlay(t *testing.T, env *testenv.Env, overlay string) {
	kubectl := filepath.Join(testenv.AssetsDir(env.Root), "kubectl")
	if _, err := os.Stat(kubectl); err != nil {
		t.Skipf("skipping: no kubectl in %s; run `make envtest-assets` (make test does)", filepath.Dir(kubectl))
	}
	out, err := exec.Command(kubectl, "kustomize", filepath.Join(env.Root, "config", overlay)).Output()
	if err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			t.Fatalf("kustomize: %s", exit.Stderr)
		}
		t.Fatal(err)
	}
	var objs []*unstructured.Unstructured
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(out), 4096)
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if len(u.Object) > 0 {
			objs = append(objs, u)
		}
	}
	ctx := context.Background()
	kinds := map[string]int{}
	for _, pass := range []string{"Namespace", "CustomResourceDefinition", ""} {
		for _, u := range objs {
			k := u.GetKind()
			isFirst := k == "Namespace" || k == "CustomResourceDefinition"
			if (pass != "" && k != pass) || (pass == "" && isFirst) || u.GroupVersionKind().Group == "cert-manager.io" {
				continue
			}
			opts := []client.CreateOption{client.FieldValidation("Strict")}
			if pass == "" {
				opts = append(opts, client.DryRunAll)
			}
			if err := env.Client.Create(ctx, u, opts...); err != nil && !(isFirst && apierrors.IsAlreadyExists(err)) && !(k == "Namespace" && apierrors.IsAlreadyExists(err)) {
				t.Errorf("%s %s: %v", k, u.GetName(), err)
			}
			kinds[k]++
		}
	}
	for _, k := range []string{"Deployment", "DaemonSet", "CSIDriver", "StorageClass", "MutatingWebhookConfiguration", "ClusterRole", "Service", "CustomResourceDefinition"} {
		if kinds[k] == 0 {
			t.Errorf("config/%s renders no %s", overlay, k)
		}
	}
}
