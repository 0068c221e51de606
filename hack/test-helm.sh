#!/usr/bin/env bash
# The Helm chart on the running local cluster, with the real helm
# (bin/helm): install layercache from dist/chart (built-in certificates),
# run the build-cache story, upgrade with changed values, run it again,
# uninstall, and check that nothing of the release is left but its CRDs
# (Helm never deletes what a chart's crds/ installed). hack/test-extended.sh
# runs it before it installs config/local for its other tests.
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

hack/images/build.sh >/dev/null
hack/images/import.sh
start=$SECONDS
log "helm install"
helm_ install layercache dist/chart --namespace "$ns" --create-namespace \
  --set certificates.mode=builtin --wait --timeout 5m
wait_webhook
story

log "helm upgrade: 1 manager replica, a disk budget"
helm_ upgrade layercache dist/chart --namespace "$ns" --reuse-values \
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
