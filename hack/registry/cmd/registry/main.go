// Command registry is CNCF Distribution's registry (its own cmd/registry,
// with the filesystem storage and htpasswd auth), built from the Go module
// proxy for layercache's local cluster and tests.
package main

import (
	"os"

	"github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() {
	if err := registry.RootCmd.Execute(); err != nil {
		os.Exit(1)
	}
}
