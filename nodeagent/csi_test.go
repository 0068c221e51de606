package nodeagent

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
)

func cacheContext(write bool, owner, pod string) map[string]string {
	w := "false"
	if write {
		w = "true"
	}
	return map[string]string{
		v1alpha1.AttrKind: "cache", v1alpha1.AttrNamespace: "ci", v1alpha1.AttrCache: "example-project",
		v1alpha1.AttrWrite: w, v1alpha1.AttrPodUID: owner, podUIDKey: pod, podNamespaceKey: "ci", podNameKey: "build-1",
	}
}

// seedCache commits dep.jar with content to cache key, as an earlier build
// would have.
func seedCache(t *testing.T, store *engine.Store, dir string, key engine.Key, content string) {
	t.Helper()
	if _, err := store.CreateVolume("seed", key, engine.VolumeOptions{Writable: true}); err != nil {
		t.Fatal(err)
	}
	seed := filepath.Join(dir, "seed")
	if err := store.Mount("seed", seed); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(seed, "dep.jar"), []byte(content), 0o644)
	store.Unmount("seed")
	if _, err := store.Commit("seed"); err != nil {
		t.Fatal(err)
	}
}

// The CSI services as the kubelet calls them, over a unix socket, with the
// real engine: publish mounts the cache, unpublish unmounts, stats report
// what the build wrote.
func TestCSINodeService(t *testing.T) {
	store, dir := newStore(t)
	id, node := serveCSI(t, &Driver{Store: store, NodeName: "node-a"}, dir)
	ctx := context.Background()

	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != "layercache.io" {
		t.Fatalf("plugin info = %v, %v", info, err)
	}
	ni, err := node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.NodeId != "node-a" {
		t.Fatalf("node info = %v, %v", ni, err)
	}

	seedCache(t, store, dir, engine.Key{Namespace: "ci", Name: "example-project"}, "cached")

	target := filepath.Join(dir, "pods", "uid-1", "volumes", "mount")
	req := &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(),
		VolumeContext: cacheContext(true, "uid-1", "uid-1")}
	for range 2 { // idempotent
		if _, err := node.NodePublishVolume(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(target, "dep.jar")); err != nil || string(b) != "cached" {
		t.Fatalf("the volume does not show the cache: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(target, "new"), make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	stats, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "pvc-1", VolumePath: target})
	if err != nil || stats.Usage[0].Used < 64<<10 || stats.Usage[0].Available <= 0 {
		t.Fatalf("stats = %v, %v", stats, err)
	}
	v, err := store.Volume("pvc-1")
	if err != nil || !v.Writable || v.Labels[LabelPod] != "ci/build-1" || v.Generation != 1 {
		t.Fatalf("engine volume = %+v, %v", v, err)
	}

	for range 2 { // idempotent
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if isMounted(t, target) {
		t.Fatal("still mounted after unpublish")
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target left behind: %v", err)
	}
	// The volume's writes wait for the PV's release (the VolumeReconciler).
	if _, err := store.Volume("pvc-1"); err != nil {
		t.Fatalf("volume gone after unpublish: %v", err)
	}
}

// A volume whose cache has nothing on the node starts from its first
// fallback with content; the volume says so.
func TestCSIFallback(t *testing.T) {
	store, dir := newStore(t)
	_, node := serveCSI(t, &Driver{Store: store, NodeName: "node-a"}, dir)
	ctx := context.Background()
	main := engine.Key{Namespace: "ci", Name: "main"}
	seedCache(t, store, dir, main, "main's")
	vc := cacheContext(true, "uid-1", "uid-1")
	vc[v1alpha1.AttrRestoreFrom] = "release,main"
	target := filepath.Join(dir, "pods", "uid-1", "volumes", "mount")
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: vc}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target})
	})
	if b, err := os.ReadFile(filepath.Join(target, "dep.jar")); err != nil || string(b) != "main's" {
		t.Fatalf("the branch's volume does not show main's cache: %q, %v", b, err)
	}
	v, err := store.Volume("pvc-1")
	if err != nil || v.Cache.Name != "example-project" || v.From == nil || *v.From != main {
		t.Fatalf("engine volume = %+v, %v; want cache example-project started from ci/main", v, err)
	}
}

func TestCSIHostDirAndReadOnly(t *testing.T) {
	store, dir := newStore(t)
	_, node := serveCSI(t, &Driver{Store: store, NodeName: "node-a"}, dir)
	ctx := context.Background()
	target := filepath.Join(dir, "scratch")
	_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "pvc-h", TargetPath: target,
		VolumeCapability: mountCapability(), VolumeContext: map[string]string{v1alpha1.AttrKind: "hostdir"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if used, _, err := store.HostDirUsage("pvc-h"); err != nil || used == 0 {
		t.Fatalf("host dir usage = %d, %v", used, err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-h", TargetPath: target}); err != nil {
		t.Fatal(err)
	}

	ro := filepath.Join(dir, "ro")
	_, err = node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "pvc-r", TargetPath: ro, Readonly: true,
		VolumeCapability: mountCapability(), VolumeContext: cacheContext(false, "", "uid-2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ro, "f"), nil, 0o644); err == nil {
		t.Error("wrote into a read-only publish")
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pvc-r", TargetPath: ro}); err != nil {
		t.Fatal(err)
	}
}

func TestCSIRejects(t *testing.T) {
	store, dir := newStore(t)
	_, node := serveCSI(t, &Driver{Store: store, NodeName: "node-a"}, dir)
	ctx := context.Background()
	target := filepath.Join(dir, "t")
	bad := cacheContext(false, "", "")
	bad[v1alpha1.AttrCache] = "../etc"
	badFallback := cacheContext(false, "", "")
	badFallback[v1alpha1.AttrRestoreFrom] = "main,../etc"
	otherNode := cacheContext(false, "", "")
	otherNode[v1alpha1.AttrNode] = "node-b"
	otherNamespace := cacheContext(false, "", "")
	otherNamespace[podNamespaceKey] = "tenant-b"
	tests := []struct {
		name string
		req  *csi.NodePublishVolumeRequest
		code codes.Code
	}{
		{"bad volume ID", &csi.NodePublishVolumeRequest{VolumeId: "../x", TargetPath: target, VolumeCapability: mountCapability()}, codes.InvalidArgument},
		{"relative target", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: "rel", VolumeCapability: mountCapability()}, codes.InvalidArgument},
		{"block volume", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}}}, codes.InvalidArgument},
		{"bad cache name", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(), VolumeContext: bad}, codes.InvalidArgument},
		{"bad fallback cache", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(), VolumeContext: badFallback}, codes.InvalidArgument},
		{"a PV of another node", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(), VolumeContext: otherNode}, codes.InvalidArgument},
		{"a cache of another namespace than the pod's", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(), VolumeContext: otherNamespace}, codes.PermissionDenied},
		{"writer mounted by another pod", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(),
			VolumeContext: cacheContext(true, "owner-uid", "intruder-uid")}, codes.PermissionDenied},
		// Fail closed: without both UIDs nobody can tell whose it is.
		{"writer mounted with no pod UID from the kubelet", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(),
			VolumeContext: cacheContext(true, "owner-uid", "")}, codes.PermissionDenied},
		{"writer whose PV names no owner", &csi.NodePublishVolumeRequest{VolumeId: "pvc-1", TargetPath: target, VolumeCapability: mountCapability(),
			VolumeContext: cacheContext(true, "", "some-pod-uid")}, codes.PermissionDenied},
	}
	for _, tt := range tests {
		if _, err := node.NodePublishVolume(ctx, tt.req); status.Code(err) != tt.code {
			t.Errorf("%s: err = %v, want code %s", tt.name, err, tt.code)
		}
	}
	if vols, _ := store.Volumes(); len(vols) != 0 {
		t.Errorf("a rejected publish left %d volume(s)", len(vols))
	}
}
