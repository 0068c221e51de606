package main

import (
	"context"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
