#!/usr/bin/env bash
# Starts a real single-node Kubernetes on this machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy.
# Returns when the node is Ready and the default ServiceAccount exists.
# Running it again while the cluster is up does nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "must run as root (it starts a kubelet and containerd)"
"$REPO_ROOT/hack/cluster/install-deps.sh"
"$REPO_ROOT/hack/k8s/build.sh" "$K8S_BIN"

ready() {
  kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True &&
    kubectl_ -n default get serviceaccount default >/dev/null 2>&1
}
all_running() {
  local c
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
    running "$c" || return 1
  done
}
if all_running && ready; then
  log "already up: export KUBECONFIG=$KUBECONFIG_PATH"
  exit 0
fi
if [ -d "$STATE" ] && ! all_running; then
  log "a previous cluster left state behind: cleaning it up first"
  "$REPO_ROOT/hack/cluster/down.sh"
fi

start=$(date +%s)
NODE_IP=$(node_ip)
export NODE_IP
mkdir -p "$STATE"/{logs,pids,etcd,kubelet,containerd,cni/net.d,cni/ipam,hostpath,pod-logs}

# Host paths that the kubelet, containerd and CNI plugins hard-code:
# remember the ones we create, so that cluster-down removes exactly those.
if [ ! -f "$STATE/host-paths" ]; then
  for p in "$KUBELET_ROOT" /var/lib/layercache /var/log/containers /var/log/pods /var/lib/cni /run/netns /run/containerd /opt/containerd /etc/cni; do
    [ -e "$p" ] || echo "$p" >> "$STATE/host-paths"
  done
  touch "$STATE/host-paths"
  sysctl -n net.ipv4.ip_forward > "$STATE/ip_forward"
fi

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

launch() { # NAME COMMAND...: start a component in the background
  local name=$1
  shift
  if running "$name"; then return 0; fi
  setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}

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
cat > "$STATE/containerd/config.toml" <<EOT
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
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
    conf_dir = "$STATE/cni/net.d"
EOT
cat > "$STATE/cni/net.d/10-layercache.conflist" <<EOT
{"cniVersion": "0.4.0", "name": "layercache-local", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$STATE/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOT
launch containerd containerd --config "$STATE/containerd/config.toml"
wait_for containerd 30 ctr --address "$CONTAINERD_SOCK" version

log "importing images"
"$REPO_ROOT/hack/images/build.sh" >/dev/null
"$REPO_ROOT/hack/images/import.sh"

log "starting the kubelet and kube-proxy"
cat > "$STATE/kubelet.yaml" <<EOT
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
podLogsDir: $STATE/pod-logs
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
launch kubelet "$K8S_BIN/kubelet" --config="$STATE/kubelet.yaml" \
  --kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$KUBELET_ROOT" --cert-dir="$STATE/kubelet-pki" \
  --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --oom-score-adj=0 --v=1
launch kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$PKI/kube-proxy.kubeconfig" \
  --hostname-override="$NODE_NAME" --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
  --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256

wait_for "node $NODE_NAME to be Ready" 120 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
# The ServiceAccount admission plugin rejects pods until this exists.
wait_for "the default ServiceAccount" 60 kubectl_ -n default get serviceaccount default
log "up in $(( $(date +%s) - start ))s; node $NODE_NAME ($NODE_IP) is Ready"
echo "export KUBECONFIG=$KUBECONFIG_PATH"
