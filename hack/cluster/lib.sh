# Shared settings of the local cluster scripts. Sourced, not run.
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

# More nodes (make cluster-up NODES=3): node 1 is this host, as with one
# node; node K (2..9) is named nodeK and is a set of namespaces of this
# host: a network namespace lcnK (address 10.87.0.K on a veth whose peer
# is on the host bridge lcnodes, 10.87.0.1) plus mount and UTS namespaces,
# with its own containerd, kubelet and kube-proxy, and its own
# /var/lib/kubelet, /var/lib/layercache, ... (node.sh, node-ns.sh). Node K's
# pods get 10.88.K.0/24, routed between nodes through the node IPs.
NODES=${NODES:-}
NODES_BRIDGE=lcnodes
NODES_NET=10.87.0
NODES_STATE=$STATE/nodes
# host_registry: the address of a registry on this host that every node's
# containerd pulls from over plain HTTP: where hack/test-helm.sh releases
# the images that the chart installs (a newcomer's path: nothing imported
# by hand). With one node, on the loopback; with more, on the nodes'
# bridge, which every node and pod reaches.
HOST_REGISTRY_PORT=5001
host_registry() {
  if [ "$(cluster_nodes)" -gt 1 ]; then echo "$NODES_NET.1:$HOST_REGISTRY_PORT"; else echo "127.0.0.1:$HOST_REGISTRY_PORT"; fi
}
# The node count the running cluster was started with (1 if none).
cluster_nodes() { cat "$STATE/nodes-count" 2>/dev/null || echo 1; }
node_dir() { echo "$NODES_STATE/node$1"; }
node_sock() { echo "$(node_dir "$1")/containerd/containerd.sock"; }
# pod_subnet K N: the pod subnet of node K in a cluster of N nodes.
pod_subnet() { if [ "$2" -gt 1 ]; then echo "10.88.$1.0/24"; else echo "$POD_CIDR"; fi; }
# Every containerd socket of the cluster that exists: the host's, then
# node 2's, node 3's, ...
containerd_socks() {
  local k
  [ -S "$CONTAINERD_SOCK" ] && echo "$CONTAINERD_SOCK"
  for ((k = 2; k <= 9; k++)); do
    [ -S "$(node_sock "$k")" ] && echo "$(node_sock "$k")"
  done
  return 0
}

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

# wait_webhook: layercache's webhook answers once its certificate is in
# place: a server-side dry run of a labelled pod goes through it.
wait_webhook() {
  local probe='{"apiVersion":"v1","kind":"Pod","metadata":{"name":"probe","labels":{"layercache.io/cache":"probe"}},"spec":{"containers":[{"name":"c","image":"localhost/busybox:dev"}]}}'
  wait_for "the webhook to answer" 120 sh -c "echo '$probe' | '$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_PATH' -n default create --dry-run=server -f - -o jsonpath='{.metadata.annotations}' | grep -q layercache.io/claims"
}

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

launch() { # NAME COMMAND...: start a component in the background
  local name=$1
  shift
  if running "$name"; then return 0; fi
  setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}

# write_containerd_config DIR SOCKET CNI_CONF_DIR: one containerd's
# configuration, everything it keeps below DIR.
write_containerd_config() {
  mkdir -p "$1"
  cat > "$1/config.toml" <<EOT
version = 2
root = "$1/root"
state = "$1/state"
[grpc]
  address = "$2"
[plugins."io.containerd.internal.v1.opt"]
  path = "$1/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  # Root here may lack CAP_SYS_RESOURCE, so a negative oom_score_adj (the
  # sandbox default) makes runc fail; clamp to containerd's own score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$3"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$1/certs.d"
EOT
  local reg
  for reg in "127.0.0.1:$HOST_REGISTRY_PORT" "$NODES_NET.1:$HOST_REGISTRY_PORT"; do
    mkdir -p "$1/certs.d/$reg"
    cat > "$1/certs.d/$reg/hosts.toml" <<EOT
server = "http://$reg"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
EOT
  done
}

# write_cni_config DIR SUBNET: one node's pod network (a bridge, no
# masquerading), its IPAM state in DIR/ipam.
write_cni_config() {
  mkdir -p "$1/net.d" "$1/ipam"
  cat > "$1/net.d/10-layercache.conflist" <<EOT
{"cniVersion": "0.4.0", "name": "layercache-local", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$2"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$1/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOT
}

# write_kubelet_config FILE CONTAINERD_SOCKET POD_LOGS_DIR
write_kubelet_config() {
  cat > "$1" <<EOT
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$2
podLogsDir: $3
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOT
}

running() { # NAME: is the component started by up.sh alive (not a zombie)?
  local pid state
  [ -f "$STATE/pids/$1.pid" ] || return 1
  pid=$(cat "$STATE/pids/$1.pid")
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
