#!/usr/bin/env bash
# Installs Tekton Pipelines (hack/tekton/release.sh; images from
# hack/images/build.sh tekton, imported) on the running local cluster and
# waits until its controller and webhook are available.
set -euo pipefail
. "$(dirname "$0")/../cluster/lib.sh"
running kube-apiserver || die "the local cluster is not running (make cluster-up)"
"$REPO_ROOT/hack/tekton/release.sh" | kubectl_ apply --server-side -f - >/dev/null
kubectl_ -n tekton-pipelines rollout status deployment/tekton-pipelines-controller --timeout=300s >/dev/null
kubectl_ -n tekton-pipelines rollout status deployment/tekton-pipelines-webhook --timeout=300s >/dev/null
log "Tekton Pipelines $(cd "$REPO_ROOT/hack/tekton" && go list -m -f '{{.Version}}' github.com/tektoncd/pipeline) is running"
