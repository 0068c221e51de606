#!/usr/bin/env bash
# A newcomer's install and an upgrade that loses nothing, on the running
# local cluster (2 nodes or more), with the real helm (bin/helm):
#   1. `make release` of this tree (signed with a new key, the signatures
#      verified with cosign) and of the previous release into a registry
#      on this host (host_registry, CNCF Distribution), which the nodes
#      pull the images from by digest: nothing is imported by hand;
#   2. `helm install` of the previous release's chart from oci://
#      (built-in certificates; caches pushed to the same registry);
#   3. the upgrade to this tree during a build and a creation storm
#      (e2e/upgrade_test.go, which runs `helm upgrade` itself);
#   4. the build-cache story, an upgrade with changed values, the story
#      again, and an uninstall that leaves nothing of the release but its
#      CRDs (Helm never deletes what a chart's crds/ installed).
# The previous release is PREVIOUS_RELEASE if set, else the newest v* tag,
# else the pinned commit below, released by its own `make release`.
# hack/test-extended.sh runs it before it installs config/local for its
# other tests.
set -euo pipefail
. "$(dirname "$0")/cluster/lib.sh"
cd "$REPO_ROOT"
# Until a v* tag exists: the first commit with `make release` (its node
# agent is older than this tree's).
PINNED_PREVIOUS=eda277b589cd8c1857dcdd9b82d6ec5169ffaf0f
running kube-apiserver || die "the local cluster is not running (make cluster-up)"
[ "$(cluster_nodes)" -ge 2 ] || die "the upgrade keeps caches on two nodes: bring the cluster up with NODES=2 or more"
[ -x bin/helm ] || hack/helm/build.sh bin
helm_() { bin/helm --kubeconfig "$KUBECONFIG_PATH" "$@"; }
ns=layercache-system
story() { # the e2e tests that tell the story, against what Helm installed
  go test -tags e2e -count=1 -timeout 10m -run '^(TestBuildCacheStory|TestUntrustedWriterCannotPoison)$' ./e2e/
}
e2e_namespaces_gone() { ! kubectl_ get namespaces -o name | grep -q '^namespace/e2e-'; }
# runs_release OBJECT IMAGES: OBJECT's pods run an image of IMAGES (an
# images.txt of a release).
runs_release() {
  local image
  image=$(kubectl_ -n "$ns" get "$1" -o jsonpath='{.spec.template.spec.containers[0].image}')
  grep -q " $image\$" "$2" || die "$1 runs $image, not an image of the release ($2)"
}

work=$(mktemp -d)
regpid= prevtree=
cleanup() {
  [ -z "$regpid" ] || { kill "$regpid" 2>/dev/null; wait "$regpid" 2>/dev/null || true; }
  [ -z "$prevtree" ] || git worktree remove --force "$prevtree" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
reg=$(host_registry)
[ -x bin/registry ] || hack/registry/build.sh bin
printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n  secret: test-helm\n' \
  "$work/registry" "$reg" > "$work/registry.yml"
bin/registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
regpid=$!
wait_for "the host's registry" 30 curl -fsS -o /dev/null "http://$reg/v2/"

version=v0.0.0-ci
[ -x bin/cosign ] || hack/cosign/build.sh bin
(cd "$work" && COSIGN_PASSWORD=test-helm "$REPO_ROOT/bin/cosign" generate-key-pair >/dev/null) ||
  die "cosign generate-key-pair failed"
start=$SECONDS
log "make release VERSION=$version REGISTRY=$reg/layercache COSIGN=KEYFILE"
VERSION=$version REGISTRY=$reg/layercache REGISTRY_INSECURE=true COSIGN=$work/cosign.key COSIGN_PASSWORD=test-helm \
  COSIGN_TLOG=false hack/release.sh
log "released in $((SECONDS - start))s"
for image in $(awk '{print $2}' dist/release/images.txt); do
  bin/cosign verify --key "$work/cosign.pub" --insecure-ignore-tlog=true --allow-insecure-registry --allow-http-registry \
    "$image" >/dev/null 2>&1 || die "cosign verify $image: no valid signature by the release's key"
done
log "every image's signature verified with the release's key"

previous=${PREVIOUS_RELEASE:-$(git tag -l 'v*' --sort=-v:refname | head -1)}
previous=${previous:-$PINNED_PREVIOUS}
git cat-file -e "$previous^{commit}" 2>/dev/null || git fetch -q --depth 1 origin "$previous" ||
  die "the previous release $previous is not in this clone, and fetching it failed"
prev_version=v0.0.0-previous
[[ $previous != v* ]] || prev_version=$previous
start=$SECONDS
log "make release VERSION=$prev_version of $previous (the previous release)"
prevtree=$work/previous
git worktree add -q --detach "$prevtree" "$previous"
ln -s "$REPO_ROOT/bin" "$prevtree/bin" # the tools, already built
(cd "$prevtree" && VERSION=$prev_version REGISTRY=$reg/layercache REGISTRY_INSECURE=true hack/release.sh)
cp "$prevtree/dist/release/images.txt" "$work/previous-images.txt"
log "released in $((SECONDS - start))s"

hack/images/build.sh >/dev/null # busybox, for the e2e tests' pods
hack/images/import.sh
charts=oci://$reg/layercache/charts/layercache
start=$SECONDS
log "helm install $charts --version ${prev_version#v} (the previous release)"
helm_ install layercache "$charts" --version "${prev_version#v}" --plain-http --namespace "$ns" --create-namespace \
  --set certificates.mode=builtin --set registry.url="$reg/caches" --set registry.insecure=true --wait --timeout 5m
for obj in deployment/layercache-controller-manager daemonset/layercache-node-agent; do
  runs_release "$obj" "$work/previous-images.txt"
done
wait_webhook
log "upgrading to $version during a build (e2e/upgrade_test.go)"
UPGRADE_CHART=$charts UPGRADE_VERSION=${version#v} UPGRADE_REGISTRY=$reg \
  go test -tags e2e,upgrade -count=1 -timeout 15m -v -run '^TestUpgradeLosesNothing$' ./e2e/
for obj in deployment/layercache-controller-manager daemonset/layercache-node-agent; do
  runs_release "$obj" dist/release/images.txt
done
story

log "helm upgrade: 1 manager replica, a disk budget"
helm_ upgrade layercache "$charts" --version "${version#v}" --plain-http --namespace "$ns" --reuse-values \
  --set manager.replicas=1 --set nodeAgent.maxDiskUsage=50Gi --wait --timeout 5m
kubectl_ -n "$ns" rollout status daemonset/layercache-node-agent --timeout=180s >/dev/null
args=$(kubectl_ -n "$ns" get daemonset layercache-node-agent -o jsonpath='{.spec.template.spec.containers[0].args}')
[[ $args == *--max-disk-usage=50Gi* ]] || die "after the upgrade the node agent's args are $args"
replicas=$(kubectl_ -n "$ns" get deployment layercache-controller-manager -o jsonpath='{.status.readyReplicas}/{.spec.replicas}')
[ "$replicas" = 1/1 ] || die "after the upgrade the manager has $replicas replicas ready, want 1/1"
wait_webhook
story

# The tests' namespaces go while the manager still runs (their Caches
# have finalizers).
wait_for "the e2e namespaces to be deleted" 180 e2e_namespaces_gone
log "helm uninstall"
helm_ uninstall layercache --namespace "$ns" --wait --timeout 5m
left=$(kubectl_ get deployments,daemonsets,services,configmaps,secrets,serviceaccounts,roles,rolebindings -n "$ns" -l app.kubernetes.io/instance=layercache -o name)
left+=$(kubectl_ get clusterroles,clusterrolebindings,mutatingwebhookconfigurations,csidrivers,storageclasses -l app.kubernetes.io/instance=layercache -o name)
[ -z "$left" ] || die "helm uninstall left: $left"
# The garbage collector deletes the pods and ReplicaSets after them.
wait_for "the release's pods and ReplicaSets to go" 120 sh -c "[ -z \"\$('$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns get pods,replicasets -o name)\" ]"
kubectl_ get crd caches.layercache.io nodecaches.layercache.io >/dev/null || die "the CRDs went with the release"
log "helm: installed the previous release, upgraded, upgraded again and uninstalled cleanly in $((SECONDS - start))s (the CRDs stay)"
