package chart

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/layercache/layercache/internal/testenv"
)

// tools returns the repository root, helm and kubectl; without them the
// test is skipped, except under CI=true, where it fails.
func tools(t *testing.T) (root, helm, kubectl string) {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	helm = filepath.Join(root, "bin", "helm")
	kubectl = filepath.Join(testenv.AssetsDir(root), "kubectl")
	for _, bin := range []string{helm, kubectl} {
		if _, err := os.Stat(bin); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is missing: make test builds it", bin)
			}
			t.Skipf("this test runs %s: build it with make helm-bin envtest-assets (make test does)", bin)
		}
	}
	return root, helm, kubectl
}

func run(t *testing.T, dir, bin string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// helmLabels are what the chart adds to every object, and kustomize does not.
var helmLabels = []string{"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version", "helm.sh/chart"}

var clusterScopedUnknownToKustomize = map[string]bool{"ValidatingAdmissionPolicy": true, "ValidatingAdmissionPolicyBinding": true}

// withoutHelmLabels deletes helmLabels from the labels at path, and the
// labels if none is left.
func withoutHelmLabels(obj map[string]any, path ...string) {
	labels, ok, _ := unstructured.NestedStringMap(obj, path...)
	if !ok {
		return
	}
	for _, l := range helmLabels {
		delete(labels, l)
	}
	if len(labels) == 0 {
		unstructured.RemoveNestedField(obj, path...)
	} else {
		unstructured.SetNestedStringMap(obj, labels, path...)
	}
}

// objects parses a multi-document YAML stream into objects keyed by kind,
// namespace and name, without the chart's own labels.
func objects(t *testing.T, data []byte) map[string]*unstructured.Unstructured {
	t.Helper()
	out := map[string]*unstructured.Unstructured{}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return out
		} else if err != nil {
			t.Fatal(err)
		}
		if m == nil {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		withoutHelmLabels(u.Object, "metadata", "labels")
		withoutHelmLabels(u.Object, "spec", "template", "metadata", "labels")
		if clusterScopedUnknownToKustomize[u.GetKind()] {
			// kustomize's schema predates them and gives them the
			// namespace; the API server drops it.
			u.SetNamespace("")
		}
		key := fmt.Sprintf("%s %s/%s", u.GetKind(), u.GetNamespace(), u.GetName())
		if _, dup := out[key]; dup {
			t.Fatalf("%s rendered twice", key)
		}
		out[key] = u
	}
}

// compare fails for every object that only one side renders, or that the
// two render differently.
func compare(t *testing.T, chartName string, chart map[string]*unstructured.Unstructured, configName string, config map[string]*unstructured.Unstructured) {
	t.Helper()
	var keys []string
	for k := range chart {
		keys = append(keys, k)
	}
	for k := range config {
		if _, ok := chart[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		a, b := chart[k], config[k]
		switch {
		case a == nil:
			t.Errorf("%s renders %s, %s does not", configName, k, chartName)
		case b == nil:
			t.Errorf("%s renders %s, %s does not", chartName, k, configName)
		case !reflect.DeepEqual(a.Object, b.Object):
			ja, _ := json.MarshalIndent(a.Object, "", "  ")
			jb, _ := json.MarshalIndent(b.Object, "", "  ")
			t.Errorf("%s differs:\n%s renders:\n%s\n%s renders:\n%s", k, chartName, ja, configName, jb)
		}
	}
}

// helmTemplate renders the chart as `helm install` would, in namespace
// layercache-system (where config/ installs), CRDs included.
func helmTemplate(t *testing.T, root, helm string, set ...string) map[string]*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", "layercache", "dist/chart", "--namespace", "layercache-system", "--include-crds"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return objects(t, run(t, root, helm, args...))
}

// kustomize renders dir, without what the chart leaves out: the Namespace
// (helm install --create-namespace makes it) and the objects named in skip.
func kustomize(t *testing.T, root, kubectl, dir string, skip ...string) map[string]*unstructured.Unstructured {
	t.Helper()
	objs := objects(t, run(t, root, kubectl, "kustomize", dir))
	for k, u := range objs {
		if u.GetKind() == "Namespace" {
			delete(objs, k)
		}
	}
	for _, k := range skip {
		if _, ok := objs[k]; !ok {
			t.Fatalf("%s renders no %s", dir, k)
		}
		delete(objs, k)
	}
	return objs
}

// With its default values the chart installs what config/default does:
// the same CRDs, RBAC, workloads, webhook and cert-manager objects.
func TestChartRendersConfigDefault(t *testing.T) {
	root, helm, kubectl := tools(t)
	compare(t, "the chart", helmTemplate(t, root, helm), "config/default", kustomize(t, root, kubectl, "config/default"))
}

// With the built-in certificates and a registry, the chart installs what
// config/local does, but for the local cluster's own registry.
func TestChartRendersConfigLocal(t *testing.T) {
	root, helm, kubectl := tools(t)
	chart := helmTemplate(t, root, helm, "certificates.mode=builtin", "registry.url=10.96.0.50:5000/layercache", "registry.insecure=true",
		"registry.authSecret=layercache-registry-auth", "nodeAgent.secureMetrics=false")
	config := kustomize(t, root, kubectl, "config/local",
		"Deployment layercache-system/layercache-registry", "Service layercache-system/layercache-registry",
		"NetworkPolicy layercache-system/layercache-registry")
	compare(t, "the chart (builtin certificates, a registry)", chart, "config/local", config)
}

func TestChartLintsAndRejectsBadValues(t *testing.T) {
	root, helm, _ := tools(t)
	for _, set := range [][]string{nil, {"--set", "certificates.mode=builtin"}, {"--set", "serviceMonitor.enabled=true"}} {
		run(t, root, helm, append([]string{"lint", "--strict", "dist/chart"}, set...)...)
	}
	out, err := exec.Command(helm, "template", filepath.Join(root, "dist/chart"), "--set", "certificates.mode=vault").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `certificates.mode="vault": want "cert-manager" or "builtin"`) {
		t.Errorf("an unknown certificates.mode: err=%v, output:\n%s", err, out)
	}

	// Optional parts: the ServiceMonitor, the registry's credentials, the
	// node agent's settings.
	objs := helmTemplate(t, root, helm, "serviceMonitor.enabled=true", "registry.url=registry.example.com/ci",
		"registry.authSecret=registry-creds", "nodeAgent.maxDiskUsage=200Gi", "nodeAgent.storePath=/data/layercache",
		"nodeAgent.nodeSelector.pool=builds", "manager.replicas=3")
	if objs["ServiceMonitor layercache-system/layercache-controller-manager-metrics-monitor"] == nil {
		t.Error("serviceMonitor.enabled=true renders no ServiceMonitor")
	}
	ds := objs["DaemonSet layercache-system/layercache-node-agent"]
	containers, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	var args []string
	for _, a := range containers[0].(map[string]any)["args"].([]any) {
		args = append(args, a.(string))
	}
	for _, want := range []string{"--root=/data/layercache", "--max-disk-usage=200Gi", "--registry=registry.example.com/ci",
		"--registry-auth-file=/etc/layercache/registry/.dockerconfigjson"} {
		if !strings.Contains(strings.Join(args, " "), want) {
			t.Errorf("node agent args %v lack %s", args, want)
		}
	}
	if sel, _, _ := unstructured.NestedString(ds.Object, "spec", "template", "spec", "nodeSelector", "pool"); sel != "builds" {
		t.Errorf("node agent nodeSelector = %q", sel)
	}
	vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
	if len(vols) != 3 || !strings.Contains(fmt.Sprint(vols[2]), "secretName:registry-creds") {
		t.Errorf("node agent volumes = %v, want the registry Secret mounted", vols)
	}
	if n, _, _ := unstructured.NestedFieldNoCopy(objs["Deployment layercache-system/layercache-controller-manager"].Object, "spec", "replicas"); fmt.Sprint(n) != "3" {
		t.Errorf("manager replicas = %v, want 3", n)
	}
}
