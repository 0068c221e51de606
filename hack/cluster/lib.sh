# Shared settings of the local single-node cluster scripts. Sourced, not run.
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUBE_VERSION=v1.33.13
K8S_BIN=${K8S_BIN:-$REPO_ROOT/bin/k8s/$KUBE_VERSION}
# Everything the cluster writes lives below STATE, except what the kubelet,
# containerd and CNI hard-code (recorded in $STATE/host-paths, removed by
# cluster-down).
STATE=${LAYERCACHE_CLUSTER_DIR:-/var/lib/layercache-cluster}
KUBECONFIG_PATH=$STATE/admin.kubeconfig
PKI=$STATE/pki
# The kubelet's root is the standard path, so the project's manifests (CSI
# plugin registration, Bidirectional hostPath mounts) work unchanged. It is
# a bind mount of $STATE/kubelet, made rshared.
KUBELET_ROOT=/var/lib/kubelet
CONTAINERD_SOCK=$STATE/containerd/containerd.sock
BRIDGE=lcbr0
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
NODE_NAME=${NODE_NAME:-$(hostname | tr 'A-Z' 'a-z')}

log() { printf '\033[1m[cluster]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[cluster] error:\033[0m %s\n' "$*" >&2; exit 1; }

node_ip() {
  local ip
  ip=$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}')
  if [ -z "$ip" ]; then
    ip=$(ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}')
  fi
  [ -n "$ip" ] || die "no global IPv4 address: pods need one to reach the API server"
  echo "$ip"
}

kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

ctr_() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND once a second.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "timed out after ${secs}s waiting for $what (logs: $STATE/logs)"
}

running() { # NAME: is the component started by up.sh alive (not a zombie)?
  local pid state
  [ -f "$STATE/pids/$1.pid" ] || return 1
  pid=$(cat "$STATE/pids/$1.pid")
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
