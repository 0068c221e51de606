package nodeagent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/testenv"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (the node agent mounts overlays); CI runs the tests as root")
	}
}

// newStore opens a store in a temp dir and unmounts whatever is left below
// it when the test ends, even if it failed.
func newStore(t *testing.T) (*engine.Store, string) {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	testenv.UnmountBelow(t, dir)
	s, err := engine.Open(filepath.Join(dir, "store"), engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s, dir
}

// serveCSI serves d on a unix socket like the kubelet would reach it.
func serveCSI(t *testing.T, d *Driver, dir string) (csi.IdentityClient, csi.NodeClient) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv := CSIServer(d, filepath.Join(dir, "csi.sock"))
	done := make(chan error)
	go func() { done <- srv.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("CSI server: %v", err)
		}
	})
	// The server listens in its goroutine: wait for the socket.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", srv.Socket); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the CSI server does not listen on %s", srv.Socket)
		}
	}
	conn, err := grpc.NewClient("unix://"+srv.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewIdentityClient(conn), csi.NewNodeClient(conn)
}

func mountCapability() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER},
	}
}

func isMounted(t *testing.T, path string) bool {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// readFiles returns the regular files directly in dir and their content.
func readFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if b, err := os.ReadFile(filepath.Join(dir, e.Name())); err == nil {
			out[e.Name()] = string(b)
		}
	}
	return out
}

// grant does what the manager does before it lets a volume of cache on
// node commit: it creates the Cache if absent, and the node's NodeCache
// marked granted.
func grant(t *testing.T, ctx context.Context, c client.Client, ns, cache, node string) {
	t.Helper()
	obj := &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: cache}}
	err := c.Create(ctx, obj)
	if apierrors.IsAlreadyExists(err) {
		err = c.Get(ctx, client.ObjectKeyFromObject(obj), obj)
	}
	if err != nil {
		t.Fatal(err)
	}
	now := metav1.Now()
	nc := &v1alpha1.NodeCache{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.NodeCacheName(cache, node),
			Labels:     map[string]string{v1alpha1.LabelCache: cache, v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node)},
			Finalizers: []string{v1alpha1.FinalizerNodeData}},
		Spec: v1alpha1.NodeCacheSpec{Cache: cache, Node: node, TTL: obj.Spec.TTL.DeepCopy(), CommitGranted: &now},
	}
	if err := controllerutil.SetControllerReference(obj, nc, c.Scheme()); err != nil {
		t.Fatal(err)
	}
	err = c.Create(ctx, nc)
	if apierrors.IsAlreadyExists(err) {
		old := &v1alpha1.NodeCache{}
		if err = c.Get(ctx, client.ObjectKeyFromObject(nc), old); err == nil && old.Spec.CommitGranted == nil {
			before := old.DeepCopy()
			old.Spec.CommitGranted = &now
			err = c.Patch(ctx, old, client.MergeFrom(before))
		}
	}
	if err != nil {
		t.Fatal(err)
	}
}
