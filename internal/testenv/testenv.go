// Package testenv starts envtest's real kube-apiserver and etcd for the
// project's controller and webhook suites, from the binaries that
// `make envtest-assets` builds (bin/k8s/VERSION): no suite downloads
// anything.
package testenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/manager"

	layercachev1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// KubeVersion is the version of the binaries envtest runs.
const KubeVersion = "v1.33.13"

// Env is a running control plane.
type Env struct {
	Config *rest.Config
	Client client.Client
	Scheme *runtime.Scheme
	Root   string // the repository root
	// Webhook has the local serving host, port and certificate dir that
	// the installed webhook configurations point at.
	Webhook *envtest.WebhookInstallOptions
}

// RepoRoot finds the repository root (the directory with go.mod) above the
// test's working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// AssetsDir returns where etcd and kube-apiserver are: KUBEBUILDER_ASSETS if
// set, else the repository's bin/k8s/VERSION.
func AssetsDir(root string) string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir
	}
	return filepath.Join(root, "bin", "k8s", KubeVersion)
}

// Options select what Start installs besides the CRDs.
type Options struct {
	// WebhookPaths are directories (relative to the repository root) of
	// webhook configurations to install, pointed at a local webhook server
	// whose host, port and certificates Env.Webhook gives.
	WebhookPaths []string
}

// Start starts a control plane with the project's CRDs installed and stops
// it when the test ends. Without the binaries it skips, saying how to get
// them (make test builds them first).
func Start(t testing.TB, opts ...Options) *Env {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	assets := AssetsDir(root)
	for _, bin := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(assets, bin)); err != nil {
			t.Skipf("skipping: no %s in %s; run `make envtest-assets` (make test does)", bin, assets)
		}
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := layercachev1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{filepath.Join(root, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
	}
	// The local cluster's service range (hack/cluster/lib.sh): config/local
	// gives its registry a fixed cluster IP in it.
	env.ControlPlane.GetAPIServer().Configure().Set("service-cluster-ip-range", "10.96.0.0/16")
	for _, o := range opts {
		for _, p := range o.WebhookPaths {
			env.WebhookInstallOptions.Paths = append(env.WebhookInstallOptions.Paths, filepath.Join(root, p))
		}
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest from %s: %v", assets, err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stopping envtest: %v", err)
		}
	})
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return &Env{Config: cfg, Client: c, Scheme: scheme, Root: root, Webhook: &env.WebhookInstallOptions}
}

// RunManager starts mgr for the rest of the test and stops it (checking
// that it stopped cleanly) when the test ends. It returns the manager's
// context.
func RunManager(t testing.TB, mgr manager.Manager) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})
	return ctx
}

// UnmountBelow unmounts, when the test ends, whatever is still mounted
// below dir, deepest first: volumes, and a store's image layers, which
// stay mounted while the store exists. Register it after dir was made,
// so that it runs before dir is removed.
func UnmountBelow(t testing.TB, dir string) {
	t.Cleanup(func() {
		data, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Error(err)
			return
		}
		lines := strings.Split(string(data), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			if f := strings.Fields(lines[i]); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				if err := unix.Unmount(f[4], unix.MNT_DETACH); err != nil {
					t.Errorf("cleanup: unmounting %s: %v", f[4], err)
				}
			}
		}
	})
}
