#!/usr/bin/env bash
# Imports OCI layout tarballs into the containerd of every node of the local
# cluster: the files given, or every image of bin/images.
set -euo pipefail
. "$(dirname "$0")/../cluster/lib.sh"
running containerd || die "the local cluster's containerd is not running (make cluster-up)"
[ $# -gt 0 ] || set -- "$REPO_ROOT"/bin/images/*.tar
for img in "$@"; do
  [ -e "$img" ] || die "no image $img (make images)"
  for sock in $(containerd_socks); do
    ctr --address "$sock" -n k8s.io images import "$img" >/dev/null
  done
done
log "imported into $(containerd_socks | wc -l) node(s): $(ctr_ images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
