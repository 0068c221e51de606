package v1alpha1_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/internal/testenv"
)

// The Cache CRD as installed from config/crd/bases, against a real API
// server: validation of names and spec, the status subresource, and the
// columns `kubectl get caches` prints.
func TestCacheCRD(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "crd-"}}
	if err := env.Client.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}

	t.Run("rejects invalid caches with a message naming the rule", func(t *testing.T) {
		tests := []struct {
			name, obj, want string
		}{
			{"dotted name", `{"metadata":{"name":"a.b"}}`, "must be a DNS-1123 label"},
			{"long name", `{"metadata":{"name":"` + strings.Repeat("a", 64) + `"}}`, "must be a DNS-1123 label"},
			{"bad ttl", `{"metadata":{"name":"ttl"},"spec":{"ttl":"forever"}}`, "spec.ttl"},
			{"bad maxSize", `{"metadata":{"name":"size"},"spec":{"maxSize":"lots"}}`, "spec.maxSize"},
		}
		for _, tt := range tests {
			err := createRaw(ctx, env.Config, ns.Name, tt.obj)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("%s: err = %v, want it to mention %q", tt.name, err, tt.want)
			}
		}
	})

	t.Run("status and printer columns", func(t *testing.T) {
		maxSize := resource.MustParse("10Gi")
		c := &v1alpha1.Cache{
			ObjectMeta: metav1.ObjectMeta{Name: "example-project", Namespace: ns.Name},
			Spec:       v1alpha1.CacheSpec{TTL: &metav1.Duration{Duration: 168 * time.Hour}, MaxSize: &maxSize},
		}
		if err := env.Client.Create(ctx, c); err != nil {
			t.Fatal(err)
		}
		commit := metav1.NewTime(time.Now().Add(-time.Hour).Truncate(time.Second))
		size := resource.MustParse("1536Mi")
		c.Status = v1alpha1.CacheStatus{
			Nodes: []v1alpha1.NodeCacheStatus{{
				Node: "node-a", Generation: 3, Layers: 2, Size: size,
				LastCommitTime: &commit, LastCommitPod: ns.Name + "/build-1",
			}},
			NodeNames: "node-a", Size: &size, LastCommitTime: &commit,
		}
		if err := env.Client.Status().Update(ctx, c); err != nil {
			t.Fatal(err)
		}
		table := getTable(t, ctx, env.Config, ns.Name)
		want := map[string]string{"Name": "example-project", "Nodes": "node-a", "Size": "1536Mi", "Last Commit": "60m"}
		if len(table.Rows) != 1 {
			t.Fatalf("got %d rows, want 1", len(table.Rows))
		}
		for i, col := range table.ColumnDefinitions {
			w, ok := want[col.Name]
			if !ok {
				continue
			}
			if got := table.Rows[0].Cells[i]; got != w {
				t.Errorf("column %s = %v, want %q", col.Name, got, w)
			}
			delete(want, col.Name)
		}
		for col := range want {
			t.Errorf("no column %s in %v", col, table.ColumnDefinitions)
		}
	})
}

func createRaw(ctx context.Context, cfg *rest.Config, ns, obj string) error {
	var m map[string]any
	if err := json.Unmarshal([]byte(obj), &m); err != nil {
		return err
	}
	m["apiVersion"], m["kind"] = "layercache.io/v1alpha1", "Cache"
	body, _ := json.Marshal(m)
	rc, err := rest.RESTClientFor(restConfig(cfg))
	if err != nil {
		return err
	}
	return rc.Post().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "caches").
		Body(body).SetHeader("Content-Type", "application/json").Do(ctx).Error()
}

func getTable(t *testing.T, ctx context.Context, cfg *rest.Config, ns string) *metav1.Table {
	t.Helper()
	rc, err := rest.RESTClientFor(restConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := rc.Get().AbsPath("/apis/layercache.io/v1alpha1/namespaces", ns, "caches").
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").Do(ctx).Raw()
	if err != nil {
		t.Fatal(err)
	}
	var table metav1.Table
	if err := json.Unmarshal(raw, &table); err != nil {
		t.Fatal(err)
	}
	return &table
}

func restConfig(cfg *rest.Config) *rest.Config {
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &v1alpha1.GroupVersion
	c.APIPath = "/apis"
	c.NegotiatedSerializer = clientgoscheme.Codecs.WithoutConversion()
	return c
}
