// Package finalizers adds and removes finalizers the one way layercache
// writes them: a merge patch under an optimistic lock, so that a finalizer
// another controller added or removed meanwhile is never lost or brought
// back. A conflict re-reads the object and tries again.
package finalizers

import (
	"context"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
)

// Add adds finalizer name to obj (updated in place). It reports whether it
// wrote anything.
func Add(ctx context.Context, c client.Client, obj client.Object, name string) (bool, error) {
	return change(ctx, c, obj, func(o client.Object) bool { return controllerutil.AddFinalizer(o, name) })
}

// Remove removes finalizer name from obj (updated in place). An object
// that is already gone counts as done. It reports whether it wrote
// anything.
func Remove(ctx context.Context, c client.Client, obj client.Object, name string) (bool, error) {
	return change(ctx, c, obj, func(o client.Object) bool { return controllerutil.RemoveFinalizer(o, name) })
}

func change(ctx context.Context, c client.Client, obj client.Object, mutate func(client.Object) bool) (bool, error) {
	wrote := false
	// An object never read has no resourceVersion to lock on: read it.
	fresh := obj.GetResourceVersion() != ""
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		if !fresh {
			if err := c.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
				return err
			}
		}
		fresh = false
		before := obj.DeepCopyObject().(client.Object)
		if !mutate(obj) {
			return nil
		}
		if err := c.Patch(ctx, obj, client.MergeFromWithOptions(before, client.MergeFromWithOptimisticLock{})); err != nil {
			return err
		}
		wrote = true
		return nil
	})
	if apierrors.IsNotFound(err) {
		return wrote, nil
	}
	return wrote, err
}
