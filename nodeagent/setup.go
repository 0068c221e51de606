package nodeagent

import (
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
)

// Options configure the node agent.
type Options struct {
	NodeName string
	Store    *engine.Store
	// KubeletDir is the kubelet's root directory; empty serves no CSI
	// sockets (tests drive the Driver directly).
	KubeletDir string
	// MaintenanceInterval is how often GC and the sweeps run.
	MaintenanceInterval time.Duration
	// DiskBudget, if positive, caps the bytes the node's caches use.
	DiskBudget int64
	// SizeCheckInterval is how often volume sizes are measured (zero
	// means DefaultSizeCheckInterval).
	SizeCheckInterval time.Duration
	// MaxVolumeInodes bounds the files and directories of a volume's
	// writes (zero means DefaultMaxVolumeInodes).
	MaxVolumeInodes int64
	// Registry, if set, is where caches are pushed and pulled from;
	// PullTimeout bounds a pull on a volume's setup (zero means
	// registry.DefaultPullTimeout).
	Registry    *registry.Client
	PullTimeout time.Duration
	// Reports is the queue of the NodeCache reconciler (nil: a new one);
	// tests that drive a Driver of their own share it.
	Reports *Reports
}

// CacheOptions restricts a node agent's cache, hence what it watches and
// reconciles, to the PVs and NodeCaches of its own node, and keeps no
// object's managedFields, which nothing of it reads.
func CacheOptions(node string) cache.Options {
	own := labels.SelectorFromSet(labels.Set{v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node)})
	return cache.Options{DefaultTransform: cache.TransformStripManagedFields(), ByObject: map[client.Object]cache.ByObject{
		&corev1.PersistentVolume{}: {Label: own},
		&v1alpha1.NodeCache{}:      {Label: own},
	}}
}

// ClientOptions make a node agent read Caches (a commit checks readOnly and
// maxSize) straight from the API server: caching them would mean watching
// every Cache of the cluster.
func ClientOptions() client.Options {
	return client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&v1alpha1.Cache{}}}}
}

// Setup registers the node agent's servers, reconcilers and maintenance.
func Setup(mgr manager.Manager, opts Options) error {
	if opts.NodeName == "" {
		return fmt.Errorf("the node name is required")
	}
	if opts.MaintenanceInterval <= 0 {
		opts.MaintenanceInterval = 5 * time.Minute
	}
	compact := make(chan engine.Key, 64)
	recorder := mgr.GetEventRecorderFor("layercache-node-" + v1alpha1.NodeLabelValue(opts.NodeName))
	reports := opts.Reports
	if reports == nil {
		reports = NewReports(opts.NodeName)
	}
	c := mgr.GetClient()
	errs := []error{
		(&NodeCacheReconciler{Client: c, Store: opts.Store, NodeName: opts.NodeName, Recorder: recorder, Reports: reports}).SetupWithManager(mgr),
		(&PVReconciler{Client: c, Store: opts.Store, NodeName: opts.NodeName, Recorder: recorder, Compact: compact, Reports: reports,
			MaxInodes: opts.MaxVolumeInodes}).SetupWithManager(mgr),
		mgr.Add(&Maintenance{APIReader: mgr.GetAPIReader(), Client: c, Recorder: recorder, NodeName: opts.NodeName, Store: opts.Store,
			Reports: reports, Compact: compact, Interval: opts.MaintenanceInterval, DiskBudget: opts.DiskBudget}),
		mgr.Add(&SizeLimiter{Client: c, Store: opts.Store, Recorder: recorder, Interval: opts.SizeCheckInterval, MaxInodes: opts.MaxVolumeInodes}),
	}
	var syncer *RegistrySyncer
	if opts.Registry != nil {
		if opts.PullTimeout <= 0 {
			opts.PullTimeout = registry.DefaultPullTimeout
		}
		syncer = &RegistrySyncer{Client: c, Store: opts.Store, NodeName: opts.NodeName, Registry: opts.Registry,
			Recorder: recorder, Reports: reports, PullTimeout: opts.PullTimeout}
		errs = append(errs, syncer.SetupWithManager(mgr))
	}
	if opts.KubeletDir != "" {
		csiSocket, regSocket := Sockets(opts.KubeletDir)
		d := &Driver{Store: opts.Store, NodeName: opts.NodeName, Sync: syncer}
		errs = append(errs, mgr.Add(CSIServer(d, csiSocket)), mgr.Add(RegistrationServer(csiSocket, regSocket)))
	}
	return errors.Join(errs...)
}
