package testenv

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Registry is a real CNCF Distribution registry serving plain HTTP on
// 127.0.0.1, from bin/registry (hack/registry/build.sh, run by make test).
type Registry struct {
	// Addr is HOST:PORT; Storage the directory it keeps blobs in.
	Addr, Storage string
	bin, config   string
	cmd           *exec.Cmd
	exited        chan error
	t             testing.TB
}

// StartRegistry starts a registry that the test's cleanup stops. With a
// user and a password, it asks for them (basic auth). Without bin/registry
// the test is skipped, saying how to build it, except under CI=true, where
// it fails.
func StartRegistry(t testing.TB, userAndPassword ...string) *Registry {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(root, "bin", "registry")
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is missing: make test builds it (hack/registry/build.sh)", bin)
		}
		t.Skipf("this test runs a real registry: build %s with hack/registry/build.sh (make test does)", bin)
	}
	addr := FreeAddr(t)
	dir := t.TempDir()
	r := &Registry{Addr: addr, Storage: filepath.Join(dir, "data"), bin: bin, config: filepath.Join(dir, "config.yml"), t: t}
	config := fmt.Sprintf("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n  secret: test\n", r.Storage, addr)
	if len(userAndPassword) == 2 {
		line, err := exec.Command(bin+"-htpasswd", userAndPassword...).Output()
		if err != nil {
			t.Fatalf("%s-htpasswd: %v", bin, err)
		}
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(htpasswd, line, 0o600); err != nil {
			t.Fatal(err)
		}
		config += fmt.Sprintf("auth:\n  htpasswd:\n    realm: test\n    path: %s\n", htpasswd)
	}
	if err := os.WriteFile(r.config, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

// Start (re)starts the registry on its address and waits until it answers.
func (r *Registry) Start() {
	r.t.Helper()
	r.cmd = exec.Command(r.bin, "serve", r.config)
	r.cmd.Stdout, r.cmd.Stderr = os.Stderr, os.Stderr
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.exited = make(chan error, 1)
	go func(cmd *exec.Cmd) { r.exited <- cmd.Wait() }(r.cmd)
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-r.exited:
			r.cmd = nil
			r.t.Fatalf("the registry exited: %v", err)
		default:
		}
		resp, err := http.Get("http://" + r.Addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return
			}
		}
		if time.Now().After(deadline) {
			r.Stop()
			r.t.Fatalf("the registry did not answer on %s: %v", r.Addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop kills the registry (idempotent).
func (r *Registry) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	r.cmd.Process.Kill()
	<-r.exited
	r.cmd = nil
}

// FreeAddr is a loopback address (127.0.0.1:PORT) nothing listens on now,
// for a server a test starts.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
