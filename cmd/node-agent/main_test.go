package main

import (
	"context"
	"crypto/tls"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/layercache/layercache/internal/testenv"
	"github.com/layercache/layercache/nodeagent"
)

func parse(t *testing.T, args ...string) config {
	t.Helper()
	var cfg config
	fs := flag.NewFlagSet("node-agent", flag.ContinueOnError)
	cfg.bind(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	cfg.testing = true
	return cfg
}

// The node agent starts against a real API server and serves its CSI
// endpoint and the kubelet registration socket.
func TestNodeAgentStarts(t *testing.T) {
	env := testenv.Start(t)
	dir := t.TempDir()
	kubelet := filepath.Join(dir, "kubelet")
	cfg := parse(t, "--node-name", "node-a", "--root", filepath.Join(dir, "store"), "--kubelet-dir", kubelet,
		"--metrics-bind-address", "0", "--health-probe-bind-address", "0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- run(ctx, cfg, env.Config) }()
	csiSocket, regSocket := nodeagent.Sockets(kubelet)
	for _, sock := range []string{csiSocket, regSocket} {
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("nothing serves %s", sock)
			}
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, sock := range []string{csiSocket, regSocket} {
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind: %v", sock, err)
		}
	}
}

func TestNodeAgentRejectsBadFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--node-name", ""}, "--node-name"},
		{[]string{"--node-name", "n", "--max-disk-usage", "lots"}, "--max-disk-usage"},
		{[]string{"--node-name", "n", "--root", "relative"}, "absolute"},
		{[]string{"--node-name", "n", "--volume-size-check-interval", "0s"}, "--volume-size-check-interval 0s: must be positive"},
	} {
		cfg := parse(t, append(tt.args, "--kubelet-dir", dir)...)
		err := run(context.Background(), cfg, nil)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: err = %v, want it to mention %q", tt.args, err, tt.want)
		}
	}
}

// The node agent's metrics name the namespaces and caches of its node:
// they are served over HTTPS to a token the API server authorises for
// /metrics (layercache-metrics-reader), and to nobody else. On main, any
// pod could read them over plain HTTP.
func TestNodeAgentMetricsNeedAuthorisation(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	env.Apply(t, "config/rbac/metrics_reader_role.yaml")
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	token := func(name string) string {
		t.Helper()
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"}}
		if _, err := cs.CoreV1().ServiceAccounts("default").Create(ctx, sa, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		tr, err := cs.CoreV1().ServiceAccounts("default").CreateToken(ctx, name, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	scraper, stranger := token("scraper"), token("stranger")
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "scraper-metrics"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "layercache-metrics-reader"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "scraper", Namespace: "default"}}}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	addr := testenv.FreeAddr(t)
	dir := t.TempDir()
	cfg := parse(t, "--node-name", "node-a", "--root", filepath.Join(dir, "store"), "--kubelet-dir", filepath.Join(dir, "kubelet"),
		"--metrics-bind-address", addr, "--health-probe-bind-address", "0")
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- run(runCtx, cfg, env.Config) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	httpc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	get := func(token string) (int, string, error) {
		req, _ := http.NewRequest(http.MethodGet, "https://"+addr+"/metrics", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := httpc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), nil
	}
	var code int
	var body string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if code, body, err = get(scraper); err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the scraper's token: %d %v", code, err)
		}
	}
	if !strings.Contains(body, "layercache_") {
		t.Errorf("the metrics hold no layercache series:\n%.500s", body)
	}
	for who, tok := range map[string]string{"no token": "", "a token without the role": stranger, "a forged token": "x.y.z"} {
		// (controller-runtime answers 500 to a token the API server
		// cannot parse.)
		if code, body, err := get(tok); err != nil || code == http.StatusOK || strings.Contains(body, "layercache_") {
			t.Errorf("%s: %d %v, want refused", who, code, err)
		}
	}
}
