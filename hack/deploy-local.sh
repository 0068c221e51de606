#!/usr/bin/env bash
# Installs layercache on the running local cluster (make cluster-up) from
# config/local: the project's images, built and imported, and the manager
# provisioning its own webhook certificate. Returns when the manager and
# the node agent are ready and the webhook answers.
set -euo pipefail
. "$(dirname "$0")/cluster/lib.sh"
running kube-apiserver || die "the local cluster is not running (make cluster-up)"
"$REPO_ROOT/hack/images/build.sh" >/dev/null
"$REPO_ROOT/hack/images/import.sh"
kubectl_ apply -k "$REPO_ROOT/config/local" >/dev/null
# A new image under the same tag: restart what runs the old one.
kubectl_ -n layercache-system rollout restart deployment/layercache-controller-manager daemonset/layercache-node-agent deployment/layercache-registry >/dev/null
kubectl_ -n layercache-system rollout status deployment/layercache-controller-manager --timeout=180s >/dev/null
kubectl_ -n layercache-system rollout status daemonset/layercache-node-agent --timeout=180s >/dev/null
kubectl_ -n layercache-system rollout status deployment/layercache-registry --timeout=180s >/dev/null
wait_webhook
log "layercache is running: manager, node agent, webhook and registry ready"
