#!/usr/bin/env bash
# Installs layercache on the running local cluster (make cluster-up) from
# config/local: the project's images, built and imported, and the manager
# provisioning its own webhook certificate. Returns when the manager and
# the node agent are ready and the webhook answers.
set -euo pipefail
. "$(dirname "$0")/cluster/lib.sh"
# registry_credentials writes the local registry's one user (a password
# kept in $STATE, made once) as the registry's htpasswd Secret and as the
# manager's and node agents' .dockerconfigjson Secret.
registry_credentials() {
  local pass_file=$STATE/registry-password line
  [ -s "$pass_file" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$pass_file")
  [ -x "$REPO_ROOT/bin/registry-htpasswd" ] || make -C "$REPO_ROOT" registry-bin >/dev/null
  line=$("$REPO_ROOT/bin/registry-htpasswd" layercache "$(cat "$pass_file")")
  kubectl_ -n layercache-system create secret generic layercache-registry-htpasswd --from-literal=htpasswd="$line" \
    --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ -n layercache-system create secret docker-registry layercache-registry-auth --docker-server=10.96.0.50:5000 \
    --docker-username=layercache --docker-password="$(cat "$pass_file")" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
}

running kube-apiserver || die "the local cluster is not running (make cluster-up)"
"$REPO_ROOT/hack/images/build.sh" >/dev/null
"$REPO_ROOT/hack/images/import.sh"
kubectl_ create namespace layercache-system --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
registry_credentials
kubectl_ apply -k "$REPO_ROOT/config/local" >/dev/null
# A new image under the same tag: restart what runs the old one.
kubectl_ -n layercache-system rollout restart deployment/layercache-controller-manager daemonset/layercache-node-agent deployment/layercache-registry >/dev/null
kubectl_ -n layercache-system rollout status deployment/layercache-controller-manager --timeout=180s >/dev/null
kubectl_ -n layercache-system rollout status daemonset/layercache-node-agent --timeout=180s >/dev/null
kubectl_ -n layercache-system rollout status deployment/layercache-registry --timeout=180s >/dev/null
wait_webhook
log "layercache is running: manager, node agent, webhook and registry ready"
