#!/usr/bin/env bash
# Imports the images of bin/images into the local cluster's containerd.
set -euo pipefail
. "$(dirname "$0")/../cluster/lib.sh"
running containerd || die "the local cluster's containerd is not running (make cluster-up)"
for img in "$REPO_ROOT"/bin/images/*.tar; do
  [ -e "$img" ] || die "no images in bin/images (make images)"
  ctr_ images import "$img" >/dev/null
done
log "imported: $(ctr_ images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
