#!/usr/bin/env bash
# Smoke test of a running local cluster: a privileged busybox pod mounts an
# overlay inside a Bidirectional hostPath volume; the host must see that
# mount and read through it, the pod's logs must show it, and deleting the
# pod must remove it again.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ns=layercache-smoke
dir=$STATE/hostpath/smoke
cleanup() { kubectl_ delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT

kubectl_ create namespace "$ns" >/dev/null
kubectl_ -n "$ns" apply -f - >/dev/null <<EOF2
apiVersion: v1
kind: Pod
metadata:
  name: overlay
spec:
  terminationGracePeriodSeconds: 10
  # Node 1, the host: the test reads the mount from the host.
  nodeSelector: {kubernetes.io/hostname: $NODE_NAME}
  containers:
  - name: overlay
    image: localhost/busybox:dev
    imagePullPolicy: Never
    securityContext: {privileged: true}
    command: ["sh", "-c"]
    args:
    - |
      set -e
      cd /host
      mkdir -p lower upper work merged
      echo hello-from-lower > lower/file
      mount -t overlay overlay -o lowerdir=/host/lower,upperdir=/host/upper,workdir=/host/work /host/merged
      echo written-in-pod > /host/merged/new
      echo "smoke: overlay sees \$(cat /host/merged/file)"
      trap 'umount /host/merged; echo smoke: unmounted; exit 0' TERM
      while true; do sleep 1; done
    volumeMounts:
    - name: host
      mountPath: /host
      mountPropagation: Bidirectional
  volumes:
  - name: host
    hostPath: {path: $dir, type: DirectoryOrCreate}
EOF2
kubectl_ -n "$ns" wait --for=condition=Ready pod/overlay --timeout=120s >/dev/null
wait_for "the pod's log line" 30 sh -c "'$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n $ns logs overlay | grep -q 'smoke: overlay sees hello-from-lower'"
log "pod log: $(kubectl_ -n "$ns" logs overlay)"

fstype=$(findmnt -n -o FSTYPE "$dir/merged" || true)
[ "$fstype" = overlay ] || die "the host does not see the pod's overlay at $dir/merged (got '$fstype')"
[ "$(cat "$dir/merged/file")" = hello-from-lower ] || die "reading through the overlay from the host failed"
[ "$(cat "$dir/upper/new")" = written-in-pod ] || die "the pod's write did not land in the upper dir"
log "the host sees the pod's overlay mount at $dir/merged and reads through it"

kubectl_ -n "$ns" delete pod overlay --timeout=60s >/dev/null
if findmnt -n "$dir/merged" >/dev/null; then
  umount "$dir/merged"
  die "the overlay is still mounted after the pod was deleted"
fi
rm -rf "$dir"
log "smoke test passed: pod ran, Bidirectional overlay mount seen on the host, removed with the pod"
