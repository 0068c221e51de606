package testenv

import (
	"context"
	"testing"

	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// CachedCopy reads obj's key through a new informer cache made with opts,
// as a manager with those cache options would hold the object, into
// obj. It returns false if that cache does not hold the object.
func (e *Env) CachedCopy(t testing.TB, opts cache.Options, obj client.Object) bool {
	t.Helper()
	opts.Scheme = e.Scheme
	c, err := cache.New(e.Config, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go c.Start(ctx)
	if _, err := c.GetInformer(ctx, obj); err != nil {
		t.Fatal(err)
	}
	if !c.WaitForCacheSync(ctx) {
		t.Fatal("the informer cache did not sync")
	}
	return c.Get(ctx, client.ObjectKeyFromObject(obj), obj) == nil
}
