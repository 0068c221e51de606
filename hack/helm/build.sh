#!/usr/bin/env bash
# Builds Helm (helm.sh/helm/v3 cmd/helm, pinned in this module's go.mod as a
# tool) into DIR (default bin/): the chart's lint and drift checks and the
# Helm e2e run it. The module is separate so that the product's go.mod
# stays lean.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../bin}
mkdir -p "$out"
cd "$here"
version=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid= -X helm.sh/helm/v3/internal/version.version=$version" \
  -o "$out/helm" helm.sh/helm/v3/cmd/helm
