#!/usr/bin/env bash
# Fails, listing what it found, if anything of the local cluster is left on
# the machine: processes, mounts, network namespaces, links, cgroups,
# iptables chains, state. CREATED_PATHS lists host paths up.sh created.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
left=()

for p in /proc/[0-9]*; do
  exe=$(readlink "$p/exe" 2>/dev/null) || continue
  cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
  case "$exe" in
    # envtest runs the same binaries: only ours reference the state dir.
    "$K8S_BIN"/*) [[ "$cmd" == *"$STATE"* ]] && left+=("process ${p#/proc/}: $exe") ;;
    */containerd|*/containerd-shim*|*/runc)
      [[ "$cmd" == *"$STATE"* ]] && left+=("process ${p#/proc/}: $cmd") ;;
  esac
  # The holder of an extra node's namespaces.
  [[ "$cmd" == "layercache-node-ns $STATE/"* ]] && left+=("process ${p#/proc/}: $cmd")
done
while read -r m; do left+=("mount $m"); done < <(awk '{print $5}' /proc/self/mountinfo |
  grep -E "^($STATE|$KUBELET_ROOT|/var/lib/layercache|/run/netns|/run/containerd)(/|$)")
ls /run/netns/cni-* >/dev/null 2>&1 && left+=("network namespaces: $(ls /run/netns)")
ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("link $BRIDGE")
ip link show "$NODES_BRIDGE" >/dev/null 2>&1 && left+=("link $NODES_BRIDGE")
for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^lcn[2-9]$/ {print $1}'); do left+=("network namespace $n"); done
while read -r l; do [ -n "$l" ] && left+=("link $l"); done < <(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}')
for c in /sys/fs/cgroup/*/k8s.io; do [ -d "$c" ] && left+=("cgroup $c"); done
for ipt in iptables ip6tables; do
  command -v $ipt >/dev/null || continue
  for t in filter nat mangle; do
    while read -r ch; do [ -n "$ch" ] && left+=("$ipt -t $t chain $ch"); done < <($ipt -t $t -S 2>/dev/null | awk '/^-N (KUBE|CNI)-/ {print $2}')
  done
done
[ -e "$STATE" ] && left+=("state dir $STATE")
for p in ${CREATED_PATHS:-}; do [ -e "$p" ] && left+=("host path $p"); done

if [ ${#left[@]} -gt 0 ]; then
  printf '[cluster] left behind:\n' >&2
  printf '  %s\n' "${left[@]}" >&2
  exit 1
fi
log "clean: no process, mount, netns, link, cgroup, iptables chain or state of the cluster is left"
