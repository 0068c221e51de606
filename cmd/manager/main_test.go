package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/testenv"
)

// The manager starts against a real API server and reports ready; with
// webhooks disabled it needs no certificate (make run).
func TestManagerStartsWithoutWebhooks(t *testing.T) {
	env := testenv.Start(t)
	port := freePort(t)
	cfg := parse(t, "--enable-webhooks=false", "--health-probe-bind-address", fmt.Sprintf("127.0.0.1:%d", port))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- run(ctx, cfg, env.Config) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}()
	url := fmt.Sprintf("http://127.0.0.1:%d/readyz", port)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %v", err)
		}
	}
}

func TestManagerRejectsBadFlags(t *testing.T) {
	env := testenv.Start(t)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--default-volume-size", "huge"}, `--default-volume-size "huge": must be a positive quantity`},
		{[]string{"--max-volume-size", "-1Gi"}, `--max-volume-size "-1Gi": must be a positive quantity`},
		{[]string{"--default-volume-size", "20Gi", "--max-volume-size", "10Gi"}, "--default-volume-size 20Gi is larger than --max-volume-size 10Gi"},
	} {
		err := run(context.Background(), parse(t, tt.args...), env.Config)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: err = %v, want %q", tt.args, err, tt.want)
		}
	}
}

func parse(t *testing.T, args ...string) config {
	t.Helper()
	var cfg config
	fs := flag.NewFlagSet("manager", flag.ContinueOnError)
	cfg.bind(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	cfg.testing = true
	return cfg
}

func freePort(t *testing.T) int {
	_, port, _ := net.SplitHostPort(testenv.FreeAddr(t))
	n, _ := strconv.Atoi(port)
	return n
}
