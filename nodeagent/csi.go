// Package nodeagent is layercache's node side: a CSI node plugin that mounts
// volumes with the engine (it registers itself with the kubelet, no sidecar
// needed), and reconcilers for the PVs and Caches of its own node that
// commit or discard volumes once released, report the node's caches, and
// delete or evict cache data.
package nodeagent

import (
	"context"
	"errors"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/logs"
)

// Version is reported to the kubelet.
var Version = "v0.1.0"

// podUIDKey is set by the kubelet in the volume context (podInfoOnMount).
const podUIDKey = "csi.storage.k8s.io/pod.uid"

const (
	podNameKey      = "csi.storage.k8s.io/pod.name"
	podNamespaceKey = "csi.storage.k8s.io/pod.namespace"
	// LabelPod, on an engine volume and the generation its commit makes,
	// is the namespace/name of the pod that wrote it.
	LabelPod = "layercache.io/pod"
)

// Driver implements the CSI Identity and Node services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	Store    *engine.Store
	NodeName string
	// Sync, if set, brings a cache's newest image down from the registry
	// before the first volume of it on a node that is behind.
	Sync *RegistrySyncer
}

// GetPluginInfo implements csi.IdentityServer.
func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: v1alpha1.DriverName, VendorVersion: Version}, nil
}

// GetPluginCapabilities implements csi.IdentityServer: a node-only plugin.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

// Probe implements csi.IdentityServer.
func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// NodeGetInfo implements csi.NodeServer.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.NodeName}, nil
}

// NodeGetCapabilities implements csi.NodeServer: no staging, volume stats.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{{
		Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: csi.NodeServiceCapability_RPC_GET_VOLUME_STATS}},
	}}}, nil
}

// NodePublishVolume mounts the volume at the target: for a cache, the
// engine volume (created on first publish from the cache's current head)
// as an overlay; for a host directory, a bind mount. Idempotent.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := engine.ValidateVolumeID(id); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !filepath.IsAbs(target) {
		return nil, status.Errorf(codes.InvalidArgument, "target path %q must be absolute", target)
	}
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "only filesystem volumes are supported (no block volumes)")
	}
	vc, err := v1alpha1.ParseVolumeContext(req.GetVolumeContext())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if vc.Node != "" && vc.Node != d.NodeName {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is for node %s, not this one (%s)", id, vc.Node, d.NodeName)
	}
	if ns := req.GetVolumeContext()[podNamespaceKey]; vc.Kind == v1alpha1.KindCache && ns != "" && ns != vc.Namespace {
		return nil, status.Errorf(codes.PermissionDenied, "volume %s holds a cache of namespace %s, not of the pod's (%s)", id, vc.Namespace, ns)
	}
	log := logf.FromContext(ctx).WithValues("volume", id, "target", target)
	start := time.Now()
	if vc.Kind == v1alpha1.KindHostDir {
		if err := d.Store.CreateHostDir(id); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if err := d.Store.MountHostDir(id, target); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	} else {
		v, err := d.publishCacheVolume(ctx, id, target, vc, req.GetVolumeContext())
		if err != nil {
			return nil, err
		}
		log = log.WithValues("cache", cacheRef(v.Cache), "generation", v.Generation, "layers", len(v.Layers), "write", vc.Write)
		if v.From != nil {
			log = log.WithValues("fallback", cacheRef(*v.From))
		}
	}
	if req.GetReadonly() {
		if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return nil, status.Errorf(codes.Internal, "making %s read-only: %v", target, err)
		}
	}
	volumeSetupSeconds.Observe(time.Since(start).Seconds())
	log.Info("Published volume", "seconds", time.Since(start).Seconds())
	return &csi.NodePublishVolumeResponse{}, nil
}

// publishCacheVolume creates (if new: after bringing the cache down from
// the registry if the node is behind) and mounts cache volume id.
func (d *Driver) publishCacheVolume(ctx context.Context, id, target string, vc v1alpha1.VolumeContext, podInfo map[string]string) (*engine.Volume, error) {
	key := engine.Key{Namespace: vc.Namespace, Name: vc.Cache}
	// A volume that may be committed is mounted for its own pod only. Fail
	// closed: without both UIDs (a PV without an owner, a kubelet that
	// passes no pod info) nobody can tell whose it is.
	pod := podInfo[podUIDKey]
	if vc.Write && (vc.PodUID == "" || pod == "" || vc.PodUID != pod) {
		return nil, status.Errorf(codes.PermissionDenied, "volume %s may be committed and belongs to pod %q, not %q", id, vc.PodUID, pod)
	}
	var from []engine.Key
	for _, name := range vc.RestoreFrom {
		from = append(from, engine.Key{Namespace: vc.Namespace, Name: name})
	}
	if _, err := d.Store.Volume(id); errors.Is(err, engine.ErrNotFound) {
		d.beforeVolume(ctx, key, from)
	}
	v, err := d.Store.CreateVolume(id, key, engine.VolumeOptions{Writable: vc.Write, Setuid: vc.Setuid, From: from, Labels: map[string]string{
		LabelPod: podInfo[podNamespaceKey] + "/" + podInfo[podNameKey], v1alpha1.AttrPodUID: pod,
	}})
	if errors.Is(err, engine.ErrConflict) {
		return nil, status.Error(codes.AlreadyExists, err.Error())
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := d.Store.Mount(id, target); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	start := "cold"
	switch {
	case v.From != nil:
		start = "fallback"
	case v.Generation > 0:
		start = "warm"
	}
	volumeStarts.WithLabelValues(start).Inc()
	return v, nil
}

// beforeVolume brings the cache's newest image down if the node is behind
// (bounded; it never fails the volume). While the node still has nothing
// of it, it does the same for the fallbacks in order: the volume starts
// from the first one the node has. Without fallbacks it reads nothing more.
func (d *Driver) beforeVolume(ctx context.Context, key engine.Key, from []engine.Key) {
	d.Sync.BeforeVolume(ctx, key)
	last := key
	for _, k := range from {
		if info, err := d.Store.Inspect(last); err == nil && info.Head != nil && len(info.Head.Layers) > 0 {
			return
		}
		d.Sync.BeforeVolume(ctx, k)
		last = k
	}
}

// NodeUnpublishVolume unmounts the target and removes it. Idempotent. The
// volume's data stay until its PV is released (see VolumeReconciler).
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := engine.ValidateVolumeID(id); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !filepath.IsAbs(target) {
		return nil, status.Errorf(codes.InvalidArgument, "target path %q must be absolute", target)
	}
	if err := engine.UnmountTarget(target); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := unix.Rmdir(target); err != nil && !errors.Is(err, unix.ENOENT) {
		return nil, status.Errorf(codes.Internal, "removing %s: %v", target, err)
	}
	logf.FromContext(ctx).V(logs.Extended).Info("Unpublished volume", "volume", id, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports what the volume's writers added (a cache
// volume's upper layer, or the host directory) against the space left on
// the store's filesystem.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id := req.GetVolumeId()
	if err := engine.ValidateVolumeID(id); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var used, inodes int64
	var err error
	if _, verr := d.Store.Volume(id); verr == nil {
		used, inodes, err = d.Store.VolumeUsage(id)
	} else if errors.Is(verr, engine.ErrNotFound) {
		used, inodes, err = d.Store.HostDirUsage(id)
	} else {
		err = verr
	}
	if errors.Is(err, engine.ErrNotFound) || errors.Is(err, unix.ENOENT) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not on this node", id)
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(d.Store.Root(), &fs); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	bsize := int64(fs.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Used: used, Available: int64(fs.Bavail) * bsize, Total: used + int64(fs.Bavail)*bsize},
		{Unit: csi.VolumeUsage_INODES, Used: inodes, Available: int64(fs.Ffree), Total: inodes + int64(fs.Ffree)},
	}}, nil
}
