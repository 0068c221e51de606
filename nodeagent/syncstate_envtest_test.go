package nodeagent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"golang.org/x/sys/unix"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/controllers"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/internal/registry/transfer"
	"github.com/layercache/layercache/internal/testenv"
)

// startNodeAndManagerWithRegistry starts node-a's agent and the manager's
// Cache reconciler, both with a real registry (s.registry).
func startNodeAndManagerWithRegistry(t *testing.T) (*nodeSuite, *testenv.Registry) {
	s, rc, reg := startNodeWithRegistry(t)
	s.registry = rc
	// The manager adopts pushes only from nodes that exist.
	if err := s.c.Create(s.ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	env := &testenv.Env{Config: s.cfg, Scheme: s.c.Scheme()}
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation}})
	if err != nil {
		t.Fatal(err)
	}
	if err := (&controllers.CacheReconciler{Client: mgr.GetClient(), Registry: rc, Recorder: mgr.GetEventRecorderFor("manager")}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	testenv.RunManager(t, mgr)
	return s, reg
}

// registryImage waits for the Cache's status.registry to satisfy ok.
func (s *nodeSuite) registryImage(ns, name, what string, ok func(*v1alpha1.RegistryImage) bool) *v1alpha1.RegistryImage {
	s.t.Helper()
	c := &v1alpha1.Cache{}
	s.eventually(what, func() bool {
		return s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: name}, c) == nil && c.Status.Registry != nil && ok(c.Status.Registry)
	})
	return c.Status.Registry
}

// A generation is known as pushed by its identity, not its number: after
// the cache's data is deleted on the node (an eviction), the next commit is
// generation 1 again, and it is pushed. Before, the agent remembered
// "generation 1 pushed" and skipped it until it restarted.
func TestACommitAfterAnEvictionIsPushed(t *testing.T) {
	s, _ := startNodeAndManagerWithRegistry(t)
	ns := s.namespace()
	pv := s.pv("pvc-e1", attrs(ns, "evicted", true))
	s.build(pv, map[string]string{"f": "1"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	first := s.registryImage(ns, "evicted", "the first push", func(*v1alpha1.RegistryImage) bool { return true })

	if err := s.store.DeleteCache(engine.Key{Namespace: ns, Name: "evicted"}); err != nil {
		t.Fatal(err)
	}
	pv = s.pv("pvc-e2", attrs(ns, "evicted", true))
	s.build(pv, map[string]string{"g": "2"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	second := s.registryImage(ns, "evicted", "the commit after the eviction to be pushed", func(r *v1alpha1.RegistryImage) bool {
		return r.Image != first.Image
	})
	if second.Generation != 1 || !second.CommitTime.After(first.CommitTime.Time) {
		t.Errorf("after the eviction status.registry = %+v; before it %+v", second, first)
	}
}

// pushFailures returns the PushFailed events of a Cache and how many times
// each was recorded.
func (s *nodeSuite) pushFailures(ns, name string) (int32, string) {
	list := &corev1.EventList{}
	if err := s.c.List(s.ctx, list, client.InNamespace(ns),
		client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("involvedObject.name", name)}); err != nil {
		s.t.Fatal(err)
	}
	var n int32
	var msgs []string
	for _, e := range list.Items {
		if e.Reason == ReasonPushFailed {
			n += max(e.Count, 1)
			msgs = append(msgs, e.Message)
		}
	}
	return n, strings.Join(msgs, "\n")
}

// A generation that can never be pushed (a file named ".wh.*", which an
// OCI layer cannot carry: it means a deletion there) is reported once and
// not retried; a later commit is tried, and once the chain no longer holds
// the name, pushed. A socket is left out of the image, not refused. Before,
// the push was retried for ever with a PushFailed "(retrying)" warning each
// time, and a cache with a leftover socket never synced.
func TestAPermanentPushFailureIsNotRetried(t *testing.T) {
	s, _ := startNodeAndManagerWithRegistry(t)
	ns := s.namespace()
	key := engine.Key{Namespace: ns, Name: "odd"}
	pv := s.pv("pvc-s1", attrs(ns, "odd", true))
	s.build(pv, map[string]string{".wh.notes": "1"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	s.eventually("a PushFailed event", func() bool { n, _ := s.pushFailures(ns, "odd"); return n > 0 })
	time.Sleep(3 * time.Second) // a retry with the controller's backoff would come within this
	if n, msgs := s.pushFailures(ns, "odd"); n != 1 || strings.Contains(msgs, "retrying") || !strings.Contains(msgs, ".wh.notes") {
		t.Errorf("PushFailed recorded %d time(s), want once, naming the file, not retried:\n%s", n, msgs)
	}

	// The build deletes the file; the chain still holds it until it is
	// compacted.
	pv = s.pv("pvc-s2", attrs(ns, "odd", true))
	target := s.build(pv, nil, true)
	if err := os.Remove(filepath.Join(target, ".wh.notes")); err != nil {
		t.Fatal(err)
	}
	s.unpublish(pv, target)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	if _, err := s.store.Compact(key); err != nil {
		t.Fatal(err)
	}
	// The next commit holds a socket: pushed without it.
	pv = s.pv("pvc-s3", attrs(ns, "odd", true))
	target = s.build(pv, map[string]string{"g": "3"}, true)
	if err := unix.Mknod(filepath.Join(target, "agent.sock"), unix.S_IFSOCK|0o600, 0); err != nil {
		t.Fatal(err)
	}
	s.unpublish(pv, target)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	s.registryImage(ns, "odd", "the next commit to be pushed", func(*v1alpha1.RegistryImage) bool { return true })
}

// Commits, pulls, evictions, compactions and GC of one cache run at once
// on a node (go test -race runs this), then the Cache is deleted: every
// operation either happens whole or is refused by the engine's
// precondition (ErrInUse, ErrStale), no volume or PV is left behind, the
// last commit is the one the node and the registry end with, and the
// deletion removes everything.
func TestConcurrentOperationsOnOneCache(t *testing.T) {
	s, _ := startNodeAndManagerWithRegistry(t)
	ns := s.namespace()
	key := engine.Key{Namespace: ns, Name: "busy"}
	pv := s.pv("pvc-c0", attrs(ns, "busy", true))
	s.build(pv, map[string]string{"f0": "0"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	first := s.registryImage(ns, "busy", "the first push", func(*v1alpha1.RegistryImage) bool { return true })
	rc := s.registry

	stop := make(chan struct{})
	errs := make(chan error, 100)
	var wg sync.WaitGroup
	loop := func(what string, op func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := op(); err != nil {
					errs <- fmt.Errorf("%s: %w", what, err)
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	pulls := 0
	loop("pull", func() error {
		_, err := transfer.Pull(s.ctx, rc, s.store, key, first.Digest(), transfer.PullOptions{})
		if err == nil {
			pulls++
		}
		if errors.Is(err, engine.ErrStale) {
			return nil
		}
		return err
	})
	loop("evict", func() error {
		if err := s.store.EvictIfIdle(key, 0); err != nil && !errors.Is(err, engine.ErrInUse) && !errors.Is(err, engine.ErrNotFound) {
			return err
		}
		return nil
	})
	loop("compact and gc", func() error {
		if _, err := s.store.Compact(key); err != nil && !errors.Is(err, engine.ErrNotFound) {
			return err
		}
		_, err := s.store.GC()
		return err
	})
	for i := 1; i <= 5; i++ {
		pv := s.pv(fmt.Sprintf("pvc-c%d", i), attrs(ns, "busy", true))
		s.build(pv, map[string]string{fmt.Sprintf("f%d", i): "x"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d pull(s) imported the first image while commits and evictions ran", pulls)

	// The last commit, made once things are quiet, is the node's head and
	// the Cache's image.
	pv = s.pv("pvc-last", attrs(ns, "busy", true))
	s.build(pv, map[string]string{"last": "1"}, false)
	s.release(pv, "Succeeded", false)
	s.pvGone(pv)
	if got := s.content(key); got["last"] != "1" {
		t.Fatalf("the node's head after the last commit: %v", got)
	}
	info, err := s.store.Inspect(key)
	if err != nil {
		t.Fatal(err)
	}
	s.registryImage(ns, "busy", "the last commit to be pushed", func(r *v1alpha1.RegistryImage) bool {
		return r.CommitTime.Equal(ptr(metav1.NewMicroTime(micro(info.Head.Committed()))))
	})
	if vols, err := s.store.Volumes(); err != nil || len(vols) != 0 {
		t.Errorf("volumes left: %v (%v)", vols, err)
	}

	// Deleting the Cache removes it everywhere.
	c := &v1alpha1.Cache{}
	if err := s.c.Get(s.ctx, client.ObjectKey{Namespace: ns, Name: "busy"}, c); err != nil {
		t.Fatal(err)
	}
	if err := s.c.Delete(s.ctx, c); err != nil {
		t.Fatal(err)
	}
	s.eventually("the Cache to go", func() bool { return apierrors.IsNotFound(s.c.Get(s.ctx, client.ObjectKeyFromObject(c), c)) })
	if _, err := s.store.Inspect(key); !errors.Is(err, engine.ErrNotFound) {
		t.Errorf("the node still holds the cache: %v", err)
	}
	if tags, err := rc.Tags(s.ctx, registry.Cache(key)); err != nil || len(tags) != 0 {
		t.Errorf("the registry still has tags %v (%v)", tags, err)
	}
	if _, err := s.store.GC(); err != nil {
		t.Fatal(err)
	}
	if tmp, err := os.ReadDir(filepath.Join(s.store.Root(), "tmp")); err != nil || len(tmp) != 0 {
		t.Errorf("temporary entries left: %v (%v)", tmp, err)
	}
}

func ptr[T any](v T) *T { return &v }

// A cache evicted for the disk budget stays evicted: its NodeCache is
// withdrawn (the node no longer says it holds the cache) and the node does
// not pull it back in the background, whether the manager granted the
// node a commit or the node only pulled the cache for a build (its
// NodeCache made by the agent, never granted). Before, a NodeCache holding
// the Cache's registry image was kept, with its old status, and the agent
// prefetched what it had just evicted.
func TestAnEvictedCacheIsNotPulledBack(t *testing.T) {
	s, _ := startNodeAndManagerWithRegistry(t)
	for _, granted := range []bool{true, false} {
		ns := s.namespace()
		key := engine.Key{Namespace: ns, Name: "evicted"}
		pv := s.pv(fmt.Sprintf("pvc-granted-%v", granted), attrs(ns, "evicted", true))
		s.build(pv, map[string]string{"f": "1"}, false)
		s.release(pv, "Succeeded", false)
		s.pvGone(pv)
		first := s.registryImage(ns, "evicted", "the push", func(*v1alpha1.RegistryImage) bool { return true })
		nc := &v1alpha1.NodeCache{}
		ncKey := client.ObjectKey{Namespace: ns, Name: v1alpha1.NodeCacheName("evicted", "node-a")}
		s.eventually("the manager to copy the image to the NodeCache", func() bool {
			return s.c.Get(s.ctx, ncKey, nc) == nil && nc.Spec.Registry != nil && nc.Spec.Registry.Image == first.Image
		})
		if !granted { // as the agent makes it at a pull
			patch := client.MergeFrom(nc.DeepCopy())
			nc.Spec.CommitGranted = nil
			if err := s.c.Patch(s.ctx, nc, patch); err != nil {
				t.Fatal(err)
			}
		}

		s.maint.DiskBudget = 1
		s.maint.Pass(s.ctx)
		s.eventually(fmt.Sprintf("the NodeCache (granted: %v) to be withdrawn", granted), func() bool {
			return apierrors.IsNotFound(s.c.Get(s.ctx, ncKey, nc))
		})
		time.Sleep(2 * time.Second) // a prefetch would start within this
		if info, err := s.store.Inspect(key); !errors.Is(err, engine.ErrNotFound) {
			t.Fatalf("granted: %v: after the eviction the node holds %+v (err %v)", granted, info.Head, err)
		}
	}
}
