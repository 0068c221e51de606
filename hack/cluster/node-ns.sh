#!/usr/bin/env bash
# The first process of an extra node's mount and UTS namespaces: node.sh
# starts it with unshare inside the node's network namespace, and it stays
# alive to hold them; the node's containerd, kubelet and kube-proxy join
# them with nsenter.
#
#   node-ns.sh STATE NODE_DIR NODE_NAME
#
# The new mount namespace starts as a private copy of the host's. Every path
# that the kubelet, containerd, runc and the CNI plugins hard-code gets the
# node's own directory, so that no two nodes share one: /var/lib/kubelet
# (made rshared, a peer group of its own: the Bidirectional mounts of this
# node's pods reach this node's kubelet and never the host),
# /var/lib/layercache (the node agent's store), /run/containerd (shim
# sockets, runc state), /run/netns (pod network namespaces), /var/lib/cni,
# /var/log/pods and /var/log/containers.
set -euo pipefail
state=$1 dir=$2
# hostNetwork pods of this node see its name.
hostname "$3"

# The copies of the host's mounts below those paths would pin the host's
# pod volumes and network namespaces for as long as this node lives: drop
# them (lazily: the host keeps its own). None on a fresh host.
awk '{print $5}' /proc/self/mountinfo |
  grep -E "^(/var/lib/kubelet|/var/lib/layercache|/run/netns|/run/containerd|/var/lib/cni|/var/log/pods|/var/log/containers|$state)(/|$)" |
  sort -r | uniq | while read -r m; do umount -l "$m"; done || true

for pair in kubelet:/var/lib/kubelet layercache:/var/lib/layercache run-containerd:/run/containerd \
  netns:/run/netns cni:/var/lib/cni log-pods:/var/log/pods log-containers:/var/log/containers; do
  src=$dir/fs/${pair%%:*} dst=${pair#*:}
  mkdir -p "$src" "$dst"
  mount --bind "$src" "$dst"
done
mount --make-rshared /var/lib/kubelet

touch "$dir/ns-ready"
# Named after its node, for down.sh and check-clean.sh.
exec -a "layercache-node-ns $dir" sleep infinity
