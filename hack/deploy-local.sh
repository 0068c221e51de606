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
# The webhook answers once its certificate is in place: a server-side dry
# run of a labelled pod goes through it.
probe='{"apiVersion":"v1","kind":"Pod","metadata":{"name":"probe","labels":{"layercache.io/cache":"probe"}},"spec":{"containers":[{"name":"c","image":"localhost/busybox:dev"}]}}'
wait_for "the webhook to answer" 120 sh -c "echo '$probe' | '$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n default create --dry-run=server -f - -o jsonpath='{.metadata.annotations}' | grep -q layercache.io/claims"
log "layercache is running: manager, node agent, webhook and registry ready"
