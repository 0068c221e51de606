#!/usr/bin/env bash
# Starts extra node K (2..9) of the local cluster, or what of it is not
# running: up.sh calls it once the control plane and node 1 (the host) run,
# and a test that stopped a node (node-stop.sh) calls it to bring the node
# back. The node's state lives in $STATE/nodes/nodeK.
#
#   network   netns lcnK: eth0 10.87.0.K/24, its veth peer lcnK-h on the
#             host bridge lcnodes (10.87.0.1), default route via the host,
#             a route to every other extra node's pods via that node; the
#             host routes 10.88.K.0/24 via 10.87.0.K. Pods: a bridge in
#             lcnK, 10.88.K.0/24, no masquerading.
#   mounts    a mount and UTS namespace held by node-ns.sh.
#   identity  a kubelet client certificate system:node:nodeK (group
#             system:nodes) signed by the cluster CA: the Node authorizer
#             applies, and the API server need not restart.
#
#   node.sh K
set -euo pipefail
. "$(dirname "$0")/lib.sh"
k=${1:?usage: node.sh K}
[[ "$k" =~ ^[2-9]$ ]] || die "node.sh: K must be 2 to 9, not $k"
n=$(cluster_nodes)
[ "$k" -le "$n" ] || die "node.sh: the cluster was started with $n node(s)"
name=node$k
dir=$(node_dir "$k")
ip=$NODES_NET.$k
netns=lcn$k
sock=$(node_sock "$k")
mkdir -p "$dir"/{containerd,pod-logs,kubelet-pki,fs}

# The network namespace and its link to the host bridge.
[ -e "/run/netns/$netns" ] || ip netns add "$netns"
if ! ip link show "$netns-h" >/dev/null 2>&1; then
  ip link add "$netns-h" type veth peer name eth0 netns "$netns"
  ip link set "$netns-h" master "$NODES_BRIDGE" up
  ip -n "$netns" addr add "$ip/24" dev eth0
  ip -n "$netns" link set eth0 up
  ip -n "$netns" link set lo up
  ip -n "$netns" route add default via "$NODES_NET.1"
fi
# Not `ip netns exec`: it remounts /sys, and /sys/fs/cgroup with it.
nsenter --net="/run/netns/$netns" sysctl -qw net.ipv4.ip_forward=1
ip route replace "$(pod_subnet "$k" "$n")" via "$ip" dev "$NODES_BRIDGE"
for ((j = 2; j <= n; j++)); do
  [ "$j" = "$k" ] || ip -n "$netns" route replace "$(pod_subnet "$j" "$n")" via "$NODES_NET.$j"
done

# The mount and UTS namespaces.
if ! running "node$k-ns"; then
  rm -f "$dir/ns-ready"
  launch "node$k-ns" nsenter --net="/run/netns/$netns" \
    unshare --mount --uts --propagation private -- bash "$REPO_ROOT/hack/cluster/node-ns.sh" "$STATE" "$dir" "$name"
  wait_for "node $name's mount namespace" 20 test -e "$dir/ns-ready"
fi
in_node=(nsenter --target "$(cat "$STATE/pids/node$k-ns.pid")" --mount --uts --net --)

# Credentials, once: the kubelet's client certificate, and kubeconfigs that
# reach the API server on the nodes' bridge.
if [ ! -f "$dir/kubelet.kubeconfig" ]; then
  (
    umask 077
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$name" \
      -keyout "$dir/kubelet-client.key" -out "$dir/kubelet-client.csr" 2>/dev/null
    openssl x509 -req -in "$dir/kubelet-client.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
      -days 3650 -extfile "$PKI/client.ext" -out "$dir/kubelet-client.crt" 2>/dev/null
    rm -f "$dir/kubelet-client.csr"
    cat > "$dir/kubelet.kubeconfig" <<EOT
apiVersion: v1
kind: Config
clusters:
- name: layercache-local
  cluster:
    server: https://$NODES_NET.1:6443
    certificate-authority: $PKI/ca.crt
users:
- name: user
  user:
    client-certificate: $dir/kubelet-client.crt
    client-key: $dir/kubelet-client.key
contexts:
- name: layercache-local
  context: {cluster: layercache-local, user: user}
current-context: layercache-local
EOT
    sed "s#server: https://127.0.0.1:6443#server: https://$NODES_NET.1:6443#" "$PKI/kube-proxy.kubeconfig" > "$dir/kube-proxy.kubeconfig"
  )
fi

write_containerd_config "$dir/containerd" "$sock" "$dir/cni/net.d"
write_cni_config "$dir/cni" "$(pod_subnet "$k" "$n")"
if ! running "node$k-containerd"; then
  launch "node$k-containerd" "${in_node[@]}" containerd --config "$dir/containerd/config.toml"
  wait_for "node $name's containerd" 30 ctr --address "$sock" version
  for img in "$REPO_ROOT"/bin/images/*.tar; do
    ctr --address "$sock" -n k8s.io images import "$img" >/dev/null
  done
fi

write_kubelet_config "$dir/kubelet.yaml" "$sock" "$dir/pod-logs"
launch "node$k-kubelet" "${in_node[@]}" "$K8S_BIN/kubelet" --config="$dir/kubelet.yaml" \
  --kubeconfig="$dir/kubelet.kubeconfig" --root-dir="$KUBELET_ROOT" --cert-dir="$dir/kubelet-pki" \
  --hostname-override="$name" --node-ip="$ip" --oom-score-adj=0 --v=1
launch "node$k-kube-proxy" "${in_node[@]}" "$K8S_BIN/kube-proxy" --kubeconfig="$dir/kube-proxy.kubeconfig" \
  --hostname-override="$name" --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
  --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
