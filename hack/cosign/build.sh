#!/usr/bin/env bash
# Builds cosign (github.com/sigstore/cosign, pinned in this module's go.mod
# as a tool) into DIR (default bin/): hack/test-helm.sh signs a release with
# it and verifies the signatures.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../bin}
mkdir -p "$out"
out=$(cd "$out" && pwd) # before the cd below: DIR may be relative
cd "$here"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid=" -o "$out/cosign" github.com/sigstore/cosign/v2/cmd/cosign
