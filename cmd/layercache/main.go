// Command layercache runs layercache's engine without Kubernetes: mount a
// cache at a directory, commit what was written, list, inspect, compact,
// collect garbage, measure and remove caches.
package main

import (
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
