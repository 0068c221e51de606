#!/usr/bin/env bash
# make demo: builds everything, starts the local cluster, installs
# layercache and plays the story of a build cache. Leaves the cluster
# running.
set -euo pipefail
. "$(dirname "$0")/cluster/lib.sh"
[ "$(id -u)" = 0 ] || die "the demo runs a local Kubernetes: run it as root"
ns=layercache-demo
say() { printf '\n\033[1;36m==> %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
k() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

say "Starting a single-node Kubernetes on this machine (the first run builds it from source: ~10 min)"
"$REPO_ROOT/hack/cluster/up.sh"
say "Installing layercache: the manager (webhook + provisioner) and the node agent (CSI driver)"
"$REPO_ROOT/hack/deploy-local.sh"

k delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
k create namespace "$ns" >/dev/null
k -n "$ns" create serviceaccount builder >/dev/null
say "Trust: only service accounts bound to layercache-cache-committer may change a cache"
run k -n "$ns" create rolebinding builder-commits --clusterrole=layercache-cache-committer --serviceaccount="$ns:builder"
wait_for "the default ServiceAccount" 30 k -n "$ns" get serviceaccount default

pod() { # NAME SCRIPT
  cat <<EOT
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels:
    layercache.io/cache: example-project
    layercache.io/trust: write
  annotations:
    layercache.io/mount-path: /root/.m2
spec:
  serviceAccountName: builder
  restartPolicy: Never
  containers:
  - name: build
    image: localhost/busybox:dev
    imagePullPolicy: Never
    command: ["sh", "-c"]
    args:
    - |
$(printf '%s\n' "$2" | sed 's/^/      /')
EOT
}
finish() { # POD: wait until it ended, print its log
  wait_for "pod $1 to finish" 120 sh -c "'$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns get pod $1 -o jsonpath='{.status.phase}' | grep -Eq 'Succeeded|Failed'"
  k -n "$ns" logs "$1" | sed 's/^/    | /'
}

say "Build 1: a pod labelled layercache.io/cache=example-project, trust=write. Nobody writes a PVC."
pod build-1 'echo "files in the cache: $(ls /root/.m2 | wc -l)"
mkdir -p /root/.m2/repository
i=0
while [ $i -lt 2000 ]; do echo "dependency-$i" > /root/.m2/repository/dep-$i.jar; i=$((i+1)); done
date > /root/.m2/built-at
echo "downloaded 2000 dependencies"' \
  | k -n "$ns" apply -f - >/dev/null
sleep 2
printf '    the webhook gave it a claim:   %s\n' "$(k -n "$ns" get pod build-1 -o jsonpath='{.spec.volumes[?(@.name=="cache")].persistentVolumeClaim.claimName}')"
finish build-1

say "The pod ended: layercache deleted its claim and committed its writes as the cache's next generation"
wait_for "the claim to go" 60 sh -c "[ -z \"\$('$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns get pvc -o name)\" ]"
wait_for "the commit" 60 sh -c "'$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns get cache example-project -o jsonpath='{.status.nodeNames}' | grep -q ."
run k -n "$ns" get pvc
run k -n "$ns" get cache example-project
k -n "$ns" get events --field-selector involvedObject.name=example-project -o custom-columns=EVENT:.reason,MESSAGE:.message --no-headers | sed 's/^/    /'

say "Build 2: a new pod with the same label finds the cache already there, whatever its size"
pod build-2 'echo "dependencies found in the cache: $(ls /root/.m2/repository | wc -l)"
echo "they were downloaded at $(cat /root/.m2/built-at) by build 1"' \
  | k -n "$ns" apply -f - >/dev/null
finish build-2
pv=$(k -n layercache-system logs daemonset/layercache-node-agent | grep '"Published volume"' | tail -1)
secs=$(printf '%s' "$pv" | sed -n 's/.*"seconds":\([0-9.e-]*\).*/\1/p')
printf '    its volume (the cache as overlay layers + a private writable layer) took %s ms to set up\n' \
  "$(awk -v s="${secs:-0}" 'BEGIN {printf "%.1f", s * 1000}')"

say "Done. The cluster is still running."
cat <<EOT
    export KUBECONFIG=$KUBECONFIG_PATH
    $K8S_BIN/kubectl -n $ns get caches,pods
    make cluster-down      # stops it and removes everything it made
EOT
