#!/usr/bin/env bash
# Builds CNCF Distribution's registry (pinned in this module's go.mod) into
# DIR (default bin/): bin/registry, the real registry that the registry
# tests, the local cluster and the benchmarks run, and bin/registry-htpasswd,
# which writes the password file of a registry with basic auth. The module
# is separate so that the product's go.mod stays lean.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../bin}
mkdir -p "$out"
cd "$here"
CGO_ENABLED=0 go build -trimpath -ldflags '-s -w -buildid=' -o "$out/registry" ./cmd/registry
CGO_ENABLED=0 go build -trimpath -ldflags '-s -w -buildid=' -o "$out/registry-htpasswd" ./cmd/htpasswd
