#!/usr/bin/env bash
# Stops the local cluster and removes everything it made: processes, mounts,
# network namespaces, veths, the bridges, cgroups, CNI state, iptables chains
# and its state directory; the extra nodes' namespaces too (their mounts,
# pod networks and iptables rules go with them). Safe to run when nothing
# is running, and after a crash. Ends with check-clean.sh, which fails if
# anything is left.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root"

stop() { # NAME: SIGTERM, wait up to 20s, then SIGKILL
  local pid i
  [ -f "$STATE/pids/$1.pid" ] || return 0
  pid=$(cat "$STATE/pids/$1.pid")
  rm -f "$STATE/pids/$1.pid"
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 40; i++)); do
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "" ] || return 0
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 0
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null
  log "$1 did not stop in 20s: killed"
}

# The extra nodes that up.sh started, even partly.
extra=$(ls "$NODES_STATE" 2>/dev/null | sed -n 's/^node\([2-9]\)$/\1/p')
tasks_left() { local s; for s in $(containerd_socks); do ctr --address "$s" -n k8s.io tasks ls -q 2>/dev/null; done; }

if [ -d "$STATE" ]; then
  if running kube-apiserver && running kubelet && running containerd; then
    log "deleting pods (the kubelet tears down their mounts, netns and cgroups)"
    # Nothing must recreate them meanwhile.
    stop kube-controller-manager
    stop kube-scheduler
    # Workloads first, while the layercache node agent can still unmount
    # their volumes; then everything else.
    kubectl_ get ns -o name 2>/dev/null | grep -v '^namespace/layercache-system$' | cut -d/ -f2 |
      xargs -r -I{} "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" -n {} delete pods --all \
        --grace-period=2 --wait=false >/dev/null 2>&1
    for ((i = 0; i < 60; i++)); do
      [ -z "$(kubectl_ get pods -A --no-headers -o custom-columns=NS:.metadata.namespace 2>/dev/null | grep -vx layercache-system)" ] && break
      sleep 1
    done
    kubectl_ delete pods --all -A --grace-period=2 --timeout=60s >/dev/null 2>&1
    # Deleted from the API; wait until the kubelets have stopped the sandboxes.
    for ((i = 0; i < 60; i++)); do
      [ -z "$(tasks_left)" ] && break
      sleep 1
    done
  fi
  stop kubelet
  stop kube-proxy
  for k in $extra; do stop "node$k-kubelet"; stop "node$k-kube-proxy"; done
  # The extra nodes' rules go with their network namespaces.
  [ -x "$K8S_BIN/kube-proxy" ] && "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1
  for s in $(containerd_socks); do
    ctr --address "$s" version >/dev/null 2>&1 || continue
    for t in $(ctr --address "$s" -n k8s.io tasks ls -q 2>/dev/null); do ctr --address "$s" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $(ctr --address "$s" -n k8s.io tasks ls -q 2>/dev/null); do ctr --address "$s" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1; done
  done
  for k in $extra; do stop "node$k-containerd"; done
  for c in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
fi

# Leftover container processes and shims of our containerd (after a crash).
for f in /sys/fs/cgroup/*/k8s.io/*/cgroup.procs; do
  [ -f "$f" ] && xargs -r kill -9 < "$f" 2>/dev/null
done
# Every node's containerd socket is below $STATE.
for p in $(pgrep -f containerd-shim-runc-v2 2>/dev/null); do
  tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "-address $STATE/" && kill -9 "$p" 2>/dev/null
done
sleep 0.5
# The extra nodes: the holder of each one's mount namespace (the namespace
# and all its mounts go once nothing runs in it), then its network
# namespace (its veth, pod bridge and iptables rules go with it).
for k in $extra; do stop "node$k-ns"; done
for p in $(pgrep -f "^layercache-node-ns $NODES_STATE/" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^lcn[2-9]$/ {print $1}'); do ip netns del "$n" 2>/dev/null; done
# The kernel frees a network namespace, and the veth into it, a moment
# after its last user is gone.
for ((i = 0; i < 20; i++)); do
  ip -o link show 2>/dev/null | grep -q ': lcn[2-9]-h@' || break
  sleep 0.5
done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^lcn[2-9]-h@/ {split($2, a, "@"); print a[1]}'); do
  ip link del "$l" 2>/dev/null
done
ip link del "$NODES_BRIDGE" 2>/dev/null
for c in /sys/fs/cgroup/*/k8s.io; do
  [ -d "$c" ] || continue
  find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
done

# Mounts, deepest first: pod volumes, container rootfs, netns pins, and
# finally the propagation bind mounts.
awk '{print $5}' /proc/self/mountinfo |
  grep -E "^($STATE|$KUBELET_ROOT|/var/lib/layercache|/run/netns|/run/containerd)(/|$)" | sort -r | uniq |
  while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
rm -f /run/netns/cni-* 2>/dev/null

# Network: the bridge (its veths went with the pods' namespaces).
for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link del "$v" 2>/dev/null
done
ip link del "$BRIDGE" 2>/dev/null

# iptables chains of kube-proxy, the kubelet and the portmap plugin.
for ipt in iptables ip6tables; do
  command -v $ipt >/dev/null || continue
  for t in filter nat mangle; do
    $ipt -t $t -S 2>/dev/null | grep -E -- '^-A [A-Z]+ .*-j (KUBE|CNI)-' | grep -Ev -- '^-A (KUBE|CNI)-' |
      sed 's/^-A /-D /' | while read -r rule; do eval "$ipt -t $t $rule" 2>/dev/null; done
    chains=$($ipt -t $t -S 2>/dev/null | awk '/^-N (KUBE|CNI)-/ {print $2}')
    for ch in $chains; do $ipt -t $t -F "$ch" 2>/dev/null; done
    for ch in $chains; do $ipt -t $t -X "$ch" 2>/dev/null; done
  done
done

created=""
if [ -f "$STATE/host-paths" ]; then
  created=$(cat "$STATE/host-paths")
  for p in $created; do rm -rf "$p"; done
fi
if [ -f "$STATE/ip_forward" ]; then
  sysctl -qw net.ipv4.ip_forward="$(cat "$STATE/ip_forward")"
fi
rm -rf "$STATE"
CREATED_PATHS="$created" "$(dirname "$0")/check-clean.sh"
