// Command manager is layercache's API-side process: it serves the pod
// admission webhook and runs the claim, provisioning, pod-lifecycle and
// cache-summary reconcilers. It never touches a node.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/open-policy-agent/cert-controller/pkg/rotator"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	ctrlwebhook "sigs.k8s.io/controller-runtime/pkg/webhook"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
	"github.com/layercache/layercache/controllers"
	"github.com/layercache/layercache/internal/registry"
	"github.com/layercache/layercache/webhook"
)

// leaderElectionID is fixed so that replicas of any version elect together.
const leaderElectionID = "manager.layercache.io"

type config struct {
	testing                bool // set by tests only
	metricsAddr, probeAddr string
	secureMetrics          bool
	enableHTTP2            bool
	leaderElect            bool
	enableWebhooks         bool
	webhookCertDir         string
	webhookPort            int
	storageClass           string
	defaultSize            string
	maxSize                string
	certRotation           bool
	namespace              string
	webhookSecret          string
	webhookService         string
	webhookConfiguration   string
	registry               registry.Flags
	shutdownDelay          time.Duration
	drain                  *drainer // nil in tests: no drain
}

func (c *config) bind(fs *flag.FlagSet) {
	c.registry.Bind(fs)
	fs.StringVar(&c.metricsAddr, "metrics-bind-address", "0", "address of the metrics endpoint (:8443 for HTTPS, :8080 for HTTP, 0 to disable)")
	fs.BoolVar(&c.secureMetrics, "metrics-secure", true, "serve metrics over HTTPS, authenticated and authorised by the API server")
	fs.DurationVar(&c.shutdownDelay, "shutdown-delay", 5*time.Second, "on SIGTERM, how long the webhook keeps answering, unready and closing each connection after its answer, before the manager stops (so that a rollout refuses and skips no pod)")
	fs.StringVar(&c.probeAddr, "health-probe-bind-address", ":8081", "address of the health and readiness probes")
	fs.BoolVar(&c.enableHTTP2, "enable-http2", false, "serve the webhook and metrics over HTTP/2 (off: CVE-2023-44487)")
	fs.BoolVar(&c.leaderElect, "leader-elect", false, "elect a leader, so that only one replica acts")
	fs.BoolVar(&c.enableWebhooks, "enable-webhooks", true, "serve the pod admission webhook (off for `make run` without certificates)")
	fs.StringVar(&c.webhookCertDir, "webhook-cert-dir", "/tmp/k8s-webhook-server/serving-certs", "directory with the webhook's tls.crt and tls.key (reloaded when they change)")
	fs.IntVar(&c.webhookPort, "webhook-port", 9443, "port of the webhook server")
	fs.StringVar(&c.storageClass, "storage-class", v1alpha1.DefaultStorageClass, "StorageClass of the cache volumes' claims")
	fs.StringVar(&c.defaultSize, "default-volume-size", "10Gi", "size of a cache volume's writable layer when the pod does not set layercache.io/size")
	fs.StringVar(&c.maxSize, "max-volume-size", controllers.DefaultMaxVolumeSize.String(), "largest layercache.io/size a pod may ask for; larger requests are refused at admission, and no larger claim is ever created")
	fs.BoolVar(&c.certRotation, "cert-rotation", false, "provision the webhook's serving certificate and CA bundle ourselves, without cert-manager")
	fs.StringVar(&c.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "the manager's namespace: the webhook skips its pods; for --cert-rotation (default $POD_NAMESPACE)")
	fs.StringVar(&c.webhookSecret, "webhook-secret-name", "layercache-webhook-server-cert", "Secret that holds the certificate, for --cert-rotation")
	fs.StringVar(&c.webhookService, "webhook-service-name", "layercache-webhook-service", "the webhook's Service, for --cert-rotation")
	fs.StringVar(&c.webhookConfiguration, "webhook-configuration-name", "layercache-mutating-webhook-configuration", "MutatingWebhookConfiguration whose CA bundle --cert-rotation keeps current")
}

func main() {
	var cfg config
	cfg.bind(flag.CommandLine)
	zapOpts := zap.Options{}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
	log := ctrl.Log.WithName("setup")

	cfg.drain = &drainer{delay: cfg.shutdownDelay}
	restConfig, err := ctrl.GetConfig()
	if err == nil {
		err = run(cfg.drain.context(), cfg, restConfig)
	}
	if err != nil {
		log.Error(err, "Manager failed")
		os.Exit(1)
	}
}

// sizes parses --default-volume-size and --max-volume-size.
func (c config) sizes() (size, maxSize resource.Quantity, err error) {
	size, err = resource.ParseQuantity(c.defaultSize)
	if err != nil || size.Sign() <= 0 {
		return size, maxSize, fmt.Errorf("--default-volume-size %q: must be a positive quantity such as 10Gi", c.defaultSize)
	}
	maxSize, err = resource.ParseQuantity(c.maxSize)
	if err != nil || maxSize.Sign() <= 0 {
		return size, maxSize, fmt.Errorf("--max-volume-size %q: must be a positive quantity such as 100Gi", c.maxSize)
	}
	if size.Cmp(maxSize) > 0 {
		return size, maxSize, fmt.Errorf("--default-volume-size %s is larger than --max-volume-size %s", c.defaultSize, c.maxSize)
	}
	return size, maxSize, nil
}

func run(ctx context.Context, cfg config, restConfig *rest.Config) error {
	size, maxSize, err := cfg.sizes()
	if err != nil {
		return err
	}
	reg, err := cfg.registry.Client()
	if err != nil {
		return fmt.Errorf("--registry: %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	var tlsOpts []func(*tls.Config)
	if !cfg.enableHTTP2 {
		tlsOpts = append(tlsOpts, func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} })
	}
	metrics := metricsserver.Options{BindAddress: cfg.metricsAddr, SecureServing: cfg.secureMetrics, TLSOpts: tlsOpts}
	if cfg.secureMetrics {
		metrics.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metrics,
		HealthProbeBindAddress: cfg.probeAddr,
		LeaderElection:         cfg.leaderElect,
		LeaderElectionID:       leaderElectionID,
		// The process exits once the manager stops: the next leader
		// need not wait for the lease to expire.
		LeaderElectionReleaseOnCancel: true,
		// Tests start several managers in one process.
		Controller: ctrlconfig.Controller{SkipNameValidation: &cfg.testing},
		Cache:      controllers.CacheOptions(),
		WebhookServer: ctrlwebhook.NewServer(ctrlwebhook.Options{
			Port: cfg.webhookPort, CertDir: cfg.webhookCertDir, TLSOpts: tlsOpts,
		}),
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	if err := controllers.Setup(mgr, controllers.Options{StorageClass: cfg.storageClass, MaxVolumeSize: maxSize, Registry: reg, Namespace: cfg.namespace}); err != nil {
		return fmt.Errorf("setting up the reconcilers: %w", err)
	}
	opts := webhook.Options{StorageClass: cfg.storageClass, DefaultSize: size, MaxSize: maxSize}
	if cfg.drain != nil {
		opts.Wrap = cfg.drain.wrap
	}
	ready, err := setupWebhooks(mgr, cfg, opts)
	if err != nil {
		return err
	}
	if err := setupChecks(mgr, ready, cfg.drain); err != nil {
		return err
	}
	ctrl.Log.WithName("setup").Info("Starting the manager", "webhooks", cfg.enableWebhooks, "leaderElection", cfg.leaderElect)
	return mgr.Start(ctx)
}

// setupWebhooks registers the webhook and returns the readiness check. With
// --cert-rotation the manager provisions its own serving certificate (a
// self-signed CA in a Secret, rotated before expiry, injected into the
// webhook configuration); the webhook server is only created, hence
// started, once the certificate is on disk.
func setupWebhooks(mgr ctrl.Manager, cfg config, opts webhook.Options) (healthz.Checker, error) {
	if !cfg.enableWebhooks {
		return healthz.Ping, nil
	}
	if !cfg.certRotation {
		return mgr.GetWebhookServer().StartedChecker(), webhook.Setup(mgr, opts)
	}
	if cfg.namespace == "" {
		return nil, errors.New("--cert-rotation needs --namespace (or $POD_NAMESPACE)")
	}
	ready := make(chan struct{})
	controllerName := "cert-rotator"
	if cfg.testing {
		// The rotator ignores SkipNameValidation: tests that start it more
		// than once in a process need distinct names.
		controllerName = fmt.Sprintf("cert-rotator-%d", time.Now().UnixNano())
	}
	err := rotator.AddRotator(mgr, &rotator.CertRotator{
		ControllerName: controllerName,
		SecretKey:      types.NamespacedName{Namespace: cfg.namespace, Name: cfg.webhookSecret},
		CertDir:        cfg.webhookCertDir,
		CAName:         "layercache-webhook-ca",
		CAOrganization: "layercache",
		DNSName:        fmt.Sprintf("%s.%s.svc", cfg.webhookService, cfg.namespace),
		ExtraDNSNames:  []string{fmt.Sprintf("%s.%s.svc.cluster.local", cfg.webhookService, cfg.namespace)},
		IsReady:        ready,
		// No Webhooks: the rotator would set the bundle to the new CA
		// alone; certProjector keeps the one before it too.
		// Every replica serves the webhook and needs the certificate.
		RequireLeaderElection: false,
	})
	if err != nil {
		return nil, fmt.Errorf("setting up certificate rotation: %w", err)
	}
	projector := &certProjector{reader: mgr.GetAPIReader(), writer: mgr.GetClient(), dir: cfg.webhookCertDir,
		every: 30 * time.Second, settle: 5 * time.Second, webhook: cfg.webhookConfiguration,
		secret: types.NamespacedName{Namespace: cfg.namespace, Name: cfg.webhookSecret}}
	if err := mgr.Add(projector); err != nil {
		return nil, err
	}
	var started atomic.Pointer[healthz.Checker]
	err = mgr.Add(everyReplica(func(ctx context.Context) error {
		select {
		case <-ready:
		case <-ctx.Done():
			return nil
		}
		if err := webhook.Setup(mgr, opts); err != nil {
			return err
		}
		check := mgr.GetWebhookServer().StartedChecker()
		started.Store(&check)
		return nil
	}))
	return func(req *http.Request) error {
		check := started.Load()
		if check == nil {
			return errors.New("waiting for the webhook's certificate")
		}
		return (*check)(req)
	}, err
}

// everyReplica is a Runnable that runs on every replica, leader or not
// (a plain RunnableFunc waits for the leadership).
type everyReplica func(context.Context) error

func (f everyReplica) Start(ctx context.Context) error { return f(ctx) }
func (f everyReplica) NeedLeaderElection() bool        { return false }

func setupChecks(mgr ctrl.Manager, ready healthz.Checker, drain *drainer) error {
	err := errors.Join(
		mgr.AddHealthzCheck("healthz", healthz.Ping),
		mgr.AddReadyzCheck("readyz", ready),
	)
	if drain != nil {
		err = errors.Join(err, mgr.AddReadyzCheck("drain", drain.ready))
	}
	return err
}
