#!/usr/bin/env bash
# Builds Tekton Pipelines (github.com/tektoncd/pipeline, pinned in this
# module's go.mod as tools) into DIR (default bin/tekton/bin): the
# controller, the webhook, and the binaries its task pods run (entrypoint,
# nop, workingdirinit, sidecarlogresults). hack/images/build.sh tekton
# makes images of them and hack/tekton/release.sh the manifests, for the
# Tekton e2e (make test-extended). The module is separate so that the
# product's go.mod stays lean.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../bin/tekton/bin}
mkdir -p "$out"
cd "$here"
for cmd in controller webhook entrypoint nop workingdirinit sidecarlogresults; do
  CGO_ENABLED=0 go build -trimpath -ldflags '-s -w -buildid=' -o "$out/$cmd" "github.com/tektoncd/pipeline/cmd/$cmd"
done
