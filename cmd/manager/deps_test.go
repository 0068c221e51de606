package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The manager is the API side: it must not link the node's store (the
// engine) nor the node-side registry transfer, so that it can never touch
// a node's caches.
func TestManagerLinksNoNodeSide(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		switch pkg {
		case "github.com/layercache/layercache/engine", "github.com/layercache/layercache/internal/registry/transfer",
			"github.com/layercache/layercache/nodeagent":
			t.Errorf("the manager links %s, a node-side package", pkg)
		}
	}
}
