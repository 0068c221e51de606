#!/usr/bin/env bash
# A newcomer's install on the running local cluster (1 node), with the
# real helm (bin/helm): `make release` into a registry on the host
# (HOST_REGISTRY, CNCF Distribution), `helm install` of the released chart
# from oci:// (built-in certificates) whose images the node pulls from
# that registry by digest, the build-cache story, an upgrade with changed
# values, the story again, and an uninstall that leaves nothing of the
# release but its CRDs (Helm never deletes what a chart's crds/ installed).
# hack/test-extended.sh runs it before it installs config/local for its
# other tests.
set -euo pipefail
. "$(dirname "$0")/cluster/lib.sh"
cd "$REPO_ROOT"
running kube-apiserver || die "the local cluster is not running (make cluster-up)"
[ -x bin/helm ] || hack/helm/build.sh bin
helm_() { bin/helm --kubeconfig "$KUBECONFIG_PATH" "$@"; }
ns=layercache-system
story() { # the e2e tests that tell the story, against what Helm installed
  go test -tags e2e -count=1 -timeout 10m -run '^(TestBuildCacheStory|TestUntrustedWriterCannotPoison)$' ./e2e/
}
e2e_namespaces_gone() { ! kubectl_ get namespaces -o name | grep -q '^namespace/e2e-'; }

[ "${NODES:-1}" = 1 ] || die "the release is pushed to a registry on node 1's loopback: run with NODES=1"
[ -x bin/registry ] || hack/registry/build.sh bin
regdir=$(mktemp -d)
printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n  secret: test-helm\n' \
  "$regdir/data" "$HOST_REGISTRY" > "$regdir/config.yml"
bin/registry serve "$regdir/config.yml" > "$regdir/log" 2>&1 &
regpid=$!
trap 'kill "$regpid" 2>/dev/null; wait "$regpid" 2>/dev/null || true; rm -rf "$regdir"' EXIT
wait_for "the host's registry" 30 curl -fsS -o /dev/null "http://$HOST_REGISTRY/v2/"

version=v0.0.0-ci
start=$SECONDS
log "make release VERSION=$version REGISTRY=$HOST_REGISTRY/layercache"
VERSION=$version REGISTRY=$HOST_REGISTRY/layercache REGISTRY_INSECURE=true hack/release.sh
log "released in $((SECONDS - start))s"
hack/images/build.sh >/dev/null # busybox, for the story's pods
hack/images/import.sh
chart=(oci://$HOST_REGISTRY/layercache/charts/layercache --version "${version#v}" --plain-http)
start=$SECONDS
log "helm install ${chart[*]}"
helm_ install layercache "${chart[@]}" --namespace "$ns" --create-namespace \
  --set certificates.mode=builtin --wait --timeout 5m
for obj in deployment/layercache-controller-manager daemonset/layercache-node-agent; do
  image=$(kubectl_ -n "$ns" get "$obj" -o jsonpath='{.spec.template.spec.containers[0].image}')
  grep -q " $image\$" dist/release/images.txt || die "$obj runs $image, not an image of the release (dist/release/images.txt)"
done
wait_webhook
story

log "helm upgrade: 1 manager replica, a disk budget"
helm_ upgrade layercache "${chart[@]}" --namespace "$ns" --reuse-values \
  --set manager.replicas=1 --set nodeAgent.maxDiskUsage=50Gi --wait --timeout 5m
kubectl_ -n "$ns" rollout status daemonset/layercache-node-agent --timeout=180s >/dev/null
args=$(kubectl_ -n "$ns" get daemonset layercache-node-agent -o jsonpath='{.spec.template.spec.containers[0].args}')
[[ $args == *--max-disk-usage=50Gi* ]] || die "after the upgrade the node agent's args are $args"
replicas=$(kubectl_ -n "$ns" get deployment layercache-controller-manager -o jsonpath='{.status.readyReplicas}/{.spec.replicas}')
[ "$replicas" = 1/1 ] || die "after the upgrade the manager has $replicas replicas ready, want 1/1"
wait_webhook
story

# The story's namespaces go while the manager still runs (their Caches
# have finalizers).
wait_for "the e2e namespaces to be deleted" 180 e2e_namespaces_gone
log "helm uninstall"
helm_ uninstall layercache --namespace "$ns" --wait --timeout 5m
left=$(kubectl_ get all,configmaps,secrets,serviceaccounts,roles,rolebindings -n "$ns" -l app.kubernetes.io/instance=layercache -o name)
left+=$(kubectl_ get clusterroles,clusterrolebindings,mutatingwebhookconfigurations,csidrivers,storageclasses -l app.kubernetes.io/instance=layercache -o name)
[ -z "$left" ] || die "helm uninstall left: $left"
wait_for "the release's pods to go" 120 sh -c "[ -z \"\$('$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns get pods -o name)\" ]"
kubectl_ get crd caches.layercache.io nodecaches.layercache.io >/dev/null || die "the CRDs went with the release"
log "helm: installed, upgraded and uninstalled cleanly in $((SECONDS - start))s (the CRDs stay)"
