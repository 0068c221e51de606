#!/usr/bin/env bash
# Makes extra node K vanish as a crashed machine does, for tests: its
# kubelet and kube-proxy stop, every container on it (its node agent too)
# is killed, and its containerd stops. Its namespaces and data stay, so
# node.sh K brings it back.
#
#   node-stop.sh K
set -euo pipefail
. "$(dirname "$0")/lib.sh"
k=${1:?usage: node-stop.sh K}
[[ "$k" =~ ^[2-9]$ ]] || die "node-stop.sh: K must be 2 to 9, not $k"
kill9() { # NAME: stop a component started by launch, at once
  local pid
  [ -f "$STATE/pids/$1.pid" ] || return 0
  pid=$(cat "$STATE/pids/$1.pid")
  rm -f "$STATE/pids/$1.pid"
  kill -9 "$pid" 2>/dev/null || true
}
kill9 "node$k-kubelet"
kill9 "node$k-kube-proxy"
sock=$(node_sock "$k")
for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
  ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
done
for ((i = 0; i < 20; i++)); do
  [ -z "$(ctr --address "$sock" -n k8s.io tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"')" ] && break
  sleep 0.5
done
kill9 "node$k-containerd"
log "node$k stopped (its kubelet, kube-proxy, containers and containerd)"
