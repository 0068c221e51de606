#!/usr/bin/env bash
# Starts a real Kubernetes on this machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, and on each node containerd, a
# kubelet and kube-proxy. NODES=N (2..9) adds nodes 2..N as namespaces of
# this host (node.sh). Returns when every node is Ready and the default
# ServiceAccount exists. Running it again while the cluster is up does
# nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "must run as root (it starts a kubelet and containerd)"
"$REPO_ROOT/hack/cluster/install-deps.sh"
"$REPO_ROOT/hack/k8s/build.sh" "$K8S_BIN"
[[ "${NODES:-1}" =~ ^[1-9]$ ]] || die "NODES=$NODES: want 1 to 9"

node_names() {
  local k
  echo "$NODE_NAME"
  for ((k = 2; k <= $1; k++)); do echo "node$k"; done
}
ready() { # N
  local n
  for n in $(node_names "$1"); do
    kubectl_ get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True || return 1
  done
  kubectl_ -n default get serviceaccount default >/dev/null 2>&1
}
all_running() { # N
  local c k
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
    running "$c" || return 1
  done
  for ((k = 2; k <= $1; k++)); do
    for c in ns containerd kubelet kube-proxy; do running "node$k-$c" || return 1; done
  done
}
if [ -f "$STATE/nodes-count" ]; then
  up=$(cluster_nodes)
  [ -z "$NODES" ] || [ "$NODES" = "$up" ] ||
    die "the cluster runs with $up node(s), not NODES=$NODES: make cluster-down first"
  if all_running "$up" && ready "$up"; then
    log "already up ($up node(s)): export KUBECONFIG=$KUBECONFIG_PATH"
    exit 0
  fi
fi
NODES=${NODES:-1}
if [ -d "$STATE" ]; then
  log "a previous cluster left state behind: cleaning it up first"
  "$REPO_ROOT/hack/cluster/down.sh"
fi

start=$(date +%s)
mkdir -p "$STATE"/{logs,pids,etcd,kubelet,containerd,hostpath,pod-logs}
echo "$NODES" > "$STATE/nodes-count"
if [ "$NODES" -gt 1 ]; then
  # Node 1's address is on the nodes' bridge, so that every node reaches
  # it (and the API server it advertises) the same way.
  NODE_IP=$NODES_NET.1
  ip link show "$NODES_BRIDGE" >/dev/null 2>&1 || ip link add "$NODES_BRIDGE" type bridge
  ip addr replace "$NODE_IP/24" dev "$NODES_BRIDGE"
  ip link set "$NODES_BRIDGE" up
else
  NODE_IP=$(node_ip)
fi
export NODE_IP

# Host paths that the kubelet, containerd and CNI plugins hard-code:
# remember the ones we create, so that cluster-down removes exactly those.
if [ ! -f "$STATE/host-paths" ]; then
  for p in "$KUBELET_ROOT" /var/lib/layercache /var/log/containers /var/log/pods /var/lib/cni /run/netns /run/containerd /opt/containerd /etc/cni; do
    [ -e "$p" ] || echo "$p" >> "$STATE/host-paths"
  done
  touch "$STATE/host-paths"
  sysctl -n net.ipv4.ip_forward > "$STATE/ip_forward"
fi
# Pods reach other nodes' pods through this host.
[ "$NODES" -gt 1 ] && sysctl -qw net.ipv4.ip_forward=1

"$REPO_ROOT/hack/cluster/gen-pki.sh"

# Mount propagation: / is private here. The kubelet root and the test
# hostPath dir must be rshared so that Bidirectional mounts (the CSI node
# plugin's overlay mounts) reach the host and the pods.
mkdir -p "$KUBELET_ROOT"
if ! mountpoint -q "$KUBELET_ROOT"; then
  [ -z "$(ls -A "$KUBELET_ROOT")" ] || die "$KUBELET_ROOT is not empty: is another kubelet installed here?"
  mount --bind "$STATE/kubelet" "$KUBELET_ROOT"
fi
mount --make-rshared "$KUBELET_ROOT"
mountpoint -q "$STATE/hostpath" || mount --bind "$STATE/hostpath" "$STATE/hostpath"
mount --make-rshared "$STATE/hostpath"

log "starting etcd and the control plane"
launch etcd "$K8S_BIN/etcd" --name local --data-dir "$STATE/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster local=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
wait_for etcd 30 curl -sf http://127.0.0.1:2379/health

launch kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$NODE_IP" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
  --authorization-mode=Node,RBAC --service-cluster-ip-range="$SERVICE_CIDR" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --allow-privileged=true --enable-aggregator-routing=true
wait_for kube-apiserver 120 kubectl_ get --raw /readyz

launch kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig="$PKI/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 \
  --controllers='*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller'
launch kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
  --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
  --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1

log "starting containerd"
write_containerd_config "$STATE/containerd" "$CONTAINERD_SOCK" "$STATE/cni/net.d"
write_cni_config "$STATE/cni" "$(pod_subnet 1 "$NODES")"
launch containerd containerd --config "$STATE/containerd/config.toml"
wait_for containerd 30 ctr --address "$CONTAINERD_SOCK" version

log "importing images"
"$REPO_ROOT/hack/images/build.sh" >/dev/null
"$REPO_ROOT/hack/images/import.sh"

log "starting the kubelet and kube-proxy"
write_kubelet_config "$STATE/kubelet.yaml" "$CONTAINERD_SOCK" "$STATE/pod-logs"
launch kubelet "$K8S_BIN/kubelet" --config="$STATE/kubelet.yaml" \
  --kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$KUBELET_ROOT" --cert-dir="$STATE/kubelet-pki" \
  --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --oom-score-adj=0 --v=1
launch kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$PKI/kube-proxy.kubeconfig" \
  --hostname-override="$NODE_NAME" --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
  --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256

for ((k = 2; k <= NODES; k++)); do
  log "starting node$k"
  "$REPO_ROOT/hack/cluster/node.sh" "$k"
done

wait_for "node $NODE_NAME to be Ready" 120 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
for ((k = 2; k <= NODES; k++)); do
  wait_for "node node$k to be Ready" 120 kubectl_ wait --for=condition=Ready "node/node$k" --timeout=2s
done
# The ServiceAccount admission plugin rejects pods until this exists.
wait_for "the default ServiceAccount" 60 kubectl_ -n default get serviceaccount default
log "up in $(( $(date +%s) - start ))s; $NODES node(s) Ready: $(node_names "$NODES" | tr '\n' ' ')(node 1: $NODE_NAME, $NODE_IP)"
echo "export KUBECONFIG=$KUBECONFIG_PATH"
