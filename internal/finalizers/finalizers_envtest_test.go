package finalizers_test

import (
	"context"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/layercache/layercache/internal/finalizers"
	"github.com/layercache/layercache/internal/testenv"
)

// Removing our finalizer from a stale copy never drops a finalizer that
// another controller added meanwhile, and adding ours never brings back
// one it removed.
func TestFinalizersNeverClobberOthers(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	c := env.Client
	obj := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "held", Namespace: "default",
		Finalizers: []string{"layercache.io/ours", "example.com/other"}}}
	if err := c.Create(ctx, obj); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		obj.Finalizers = nil
		c.Update(context.Background(), obj)
		c.Delete(context.Background(), obj)
	})
	stale := obj.DeepCopy()
	// Another controller adds its finalizer after we read the object.
	obj.Finalizers = append(obj.Finalizers, "example.com/late")
	if err := c.Update(ctx, obj); err != nil {
		t.Fatal(err)
	}
	if wrote, err := finalizers.Remove(ctx, c, stale, "layercache.io/ours"); err != nil || !wrote {
		t.Fatalf("Remove: wrote=%v err=%v", wrote, err)
	}
	got := &corev1.ConfigMap{}
	if err := c.Get(ctx, client.ObjectKeyFromObject(obj), got); err != nil {
		t.Fatal(err)
	}
	if want := []string{"example.com/other", "example.com/late"}; !slices.Equal(got.Finalizers, want) {
		t.Fatalf("finalizers = %v, want %v", got.Finalizers, want)
	}

	// Another controller removes its finalizer after we read the object.
	stale = got.DeepCopy()
	got.Finalizers = []string{"example.com/late"}
	if err := c.Update(ctx, got); err != nil {
		t.Fatal(err)
	}
	if _, err := finalizers.Add(ctx, c, stale, "layercache.io/ours"); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(obj), got); err != nil {
		t.Fatal(err)
	}
	if want := []string{"example.com/late", "layercache.io/ours"}; !slices.Equal(got.Finalizers, want) {
		t.Fatalf("finalizers = %v, want %v", got.Finalizers, want)
	}

	// Gone is done.
	gone := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "never-was", Namespace: "default", Finalizers: []string{"layercache.io/ours"}}}
	if _, err := finalizers.Remove(ctx, c, gone, "layercache.io/ours"); err != nil {
		t.Fatalf("removing from a missing object: %v", err)
	}
}
