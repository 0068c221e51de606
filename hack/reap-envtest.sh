#!/usr/bin/env bash
# Stops envtest control planes whose test binary died without stopping them
# (a go test -timeout panic skips every t.Cleanup): processes of our etcd
# and kube-apiserver, running with an envtest temp dir, whose parent is gone
# (re-parented to init). A live test run's are its children: untouched.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bins=$repo/bin/k8s
dirs=()
for p in /proc/[0-9]*; do
  exe=$(readlink "$p/exe" 2>/dev/null) || continue
  [[ "$exe" == "$bins"/*/etcd || "$exe" == "$bins"/*/kube-apiserver ]] || continue
  cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
  [[ "$cmd" == *k8s_test_framework_* ]] || continue
  [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = 1 ] || continue
  pid=${p#/proc/}
  echo "reaping an orphaned envtest process $pid: ${exe##*/}"
  kill -9 "$pid" 2>/dev/null
  for d in $(grep -o '/tmp/k8s_test_framework_[0-9]*' <<< "$cmd" | sort -u); do dirs+=("$d"); done
done
for d in "${dirs[@]}"; do rm -rf "$d"; done
exit 0
