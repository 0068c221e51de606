// Command node-agent is layercache's node side, one per node (DaemonSet,
// privileged): the CSI node plugin that mounts cache volumes as overlays
// and host directories as bind mounts, and the reconcilers that commit or
// discard released volumes, report the node's caches and evict them.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/nodeagent"
)

type config struct {
	testing                    bool // set by tests only
	nodeName, root, kubeletDir string
	metricsAddr, probeAddr     string
	secureMetrics              bool
	compactThreshold           int
	maintenanceInterval        time.Duration
	sizeCheckInterval          time.Duration
	maxVolumeInodes            int64
	diskBudget                 string
	layerFormat                string
	registry                   registry.Flags
}

func (c *config) bind(fs *flag.FlagSet) {
	fs.StringVar(&c.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	fs.StringVar(&c.root, "root", engine.DefaultRoot, "the store directory on the node")
	fs.StringVar(&c.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "the kubelet's root directory (plugin registration and CSI sockets)")
	fs.StringVar(&c.metricsAddr, "metrics-bind-address", ":8443", "address of the metrics endpoint (0 to disable)")
	fs.BoolVar(&c.secureMetrics, "metrics-secure", true, "serve metrics over HTTPS, authenticated and authorised by the API server (their labels name the node's namespaces and caches)")
	fs.StringVar(&c.probeAddr, "health-probe-bind-address", ":8081", "address of the health and readiness probes")
	fs.IntVar(&c.compactThreshold, "compact-threshold", engine.DefaultCompactThreshold, "chain length at which a cache is compacted")
	fs.DurationVar(&c.maintenanceInterval, "maintenance-interval", 5*time.Minute, "how often GC, orphan removal and the disk budget run")
	fs.DurationVar(&c.sizeCheckInterval, "volume-size-check-interval", nodeagent.DefaultSizeCheckInterval, "how often each volume's writes are measured against its size (a volume over it is never committed and its pod is deleted)")
	fs.Int64Var(&c.maxVolumeInodes, "max-volume-inodes", nodeagent.DefaultMaxVolumeInodes, "most files and directories a volume's writes may hold (a volume over it is never committed and its pod is deleted, as for its size)")
	fs.StringVar(&c.layerFormat, "layer-format", string(engine.LayerFormatAuto), "how pulled layers are kept: erofs (one EROFS image per layer, mounted from the file; Linux 6.12+), dir (extracted into directories), or auto (erofs where the kernel mounts it)")
	c.registry.BindNode(fs)
	fs.StringVar(&c.diskBudget, "max-disk-usage", "", "evict least recently used caches when the node's caches use more (e.g. 100Gi; empty for no limit)")
}

// metricsOptions serves the metrics over HTTPS (HTTP/1.1 only), to
// requests the API server authenticates and authorises, unless
// --metrics-secure=false.
func (c *config) metricsOptions() metricsserver.Options {
	opts := metricsserver.Options{BindAddress: c.metricsAddr, SecureServing: c.secureMetrics,
		TLSOpts: []func(*tls.Config){func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} }}}
	if c.secureMetrics {
		opts.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	return opts
}

func main() {
	var cfg config
	cfg.bind(flag.CommandLine)
	zapOpts := zap.Options{}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
	restConfig, err := ctrl.GetConfig()
	if err == nil {
		err = run(ctrl.SetupSignalHandler(), cfg, restConfig)
	}
	if err != nil {
		ctrl.Log.WithName("setup").Error(err, "Node agent failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, restConfig *rest.Config) error {
	if cfg.nodeName == "" {
		return errors.New("--node-name (or $NODE_NAME) is required")
	}
	var budget int64
	if cfg.diskBudget != "" {
		q, err := resource.ParseQuantity(cfg.diskBudget)
		if err != nil || q.Sign() <= 0 {
			return fmt.Errorf("--max-disk-usage %q: must be a positive quantity such as 100Gi", cfg.diskBudget)
		}
		budget = q.Value()
	}
	if cfg.sizeCheckInterval <= 0 {
		return fmt.Errorf("--volume-size-check-interval %s: must be positive", cfg.sizeCheckInterval)
	}
	if cfg.maxVolumeInodes <= 0 {
		return fmt.Errorf("--max-volume-inodes %d: must be positive", cfg.maxVolumeInodes)
	}
	if cfg.registry.PullTimeout <= 0 {
		return fmt.Errorf("--registry-pull-timeout %s: must be positive", cfg.registry.PullTimeout)
	}
	reg, err := cfg.registry.Client()
	if err != nil {
		return fmt.Errorf("--registry: %w", err)
	}
	format, err := engine.ParseLayerFormat(cfg.layerFormat)
	if err != nil {
		return fmt.Errorf("--layer-format: %w", err)
	}
	store, err := engine.Open(cfg.root, engine.Options{CompactThreshold: cfg.compactThreshold, LayerFormat: format})
	if err != nil {
		return err
	}
	if err := readyImageLayers(store, format); err != nil {
		return err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                cfg.metricsOptions(),
		HealthProbeBindAddress: cfg.probeAddr,
		LeaderElection:         false, // one agent per node, each acting on its own node
		// Tests start several managers in one process.
		Controller: ctrlconfig.Controller{SkipNameValidation: &cfg.testing},
		Cache:      nodeagent.CacheOptions(cfg.nodeName),
		Client:     nodeagent.ClientOptions(),
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	if err := nodeagent.Setup(mgr, nodeagent.Options{
		NodeName: cfg.nodeName, Store: store, KubeletDir: cfg.kubeletDir,
		MaintenanceInterval: cfg.maintenanceInterval, DiskBudget: budget, SizeCheckInterval: cfg.sizeCheckInterval, MaxVolumeInodes: cfg.maxVolumeInodes,
		Registry: reg, PullTimeout: cfg.registry.PullTimeout,
	}); err != nil {
		return err
	}
	if err := errors.Join(mgr.AddHealthzCheck("healthz", healthz.Ping), mgr.AddReadyzCheck("readyz", healthz.Ping)); err != nil {
		return err
	}
	ctrl.Log.WithName("setup").Info("Starting the node agent", "node", cfg.nodeName, "root", store.Root(), "registry", cfg.registry.Prefix)
	return mgr.Start(ctx)
}

// readyImageLayers says once how pulled layers will be kept (and why not
// as images, where auto fell back), and mounts the image layers on disk
// before any volume is served.
func readyImageLayers(store *engine.Store, asked engine.LayerFormat) error {
	log := ctrl.Log.WithName("setup")
	format, why := store.ImportFormat()
	switch {
	case why != nil && asked == engine.LayerFormatImage:
		return fmt.Errorf("--layer-format=erofs: %w", why)
	case why != nil:
		log.Info("EROFS image layers are not available here: pulled layers are extracted into directories", "reason", why.Error())
	default:
		log.Info("Pulled layers are kept as", "layerFormat", format)
	}
	n, err := store.MountImageLayers()
	if err != nil {
		// Each volume mounts its layers again, or fails to start and
		// its pod runs uncached: not a reason to serve nothing.
		log.Error(err, "Mounting image layers")
	}
	log.Info("Image layers mounted", "count", n)
	return nil
}
