#!/usr/bin/env bash
# The extended end-to-end tests (make test-extended; CI runs them after
# make test): layercache under tools users already run, each the real tool
# built from the Go module proxy or Debian's packages. On a local cluster
# (NODES, default 2): the previous release installed with the real helm,
# upgraded to this tree during a build with nothing lost, upgraded again
# and uninstalled, the build-cache story in between (hack/test-helm.sh);
# then, on config/local, a real Tekton Pipelines (hack/tekton) running a
# pipeline whose build task's workspace is a cache, and a nested podman
# (Debian's podman and fuse-overlayfs) whose image storage is a cache; and
# a rollout restart of the manager during a creation storm.
# Always tears down, checking that nothing is left.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "skipping the extended cluster tests: they need root (they run a kubelet)"
  exit 0
fi
. hack/cluster/lib.sh
export NODES=${NODES:-2}
rc=0
{
  hack/images/build.sh tekton >/dev/null && hack/images/build.sh golang >/dev/null &&
    hack/images/build.sh podman >/dev/null &&
    hack/cluster/up.sh && hack/test-helm.sh && hack/deploy-local.sh &&
    hack/images/import.sh bin/tekton/*.tar bin/bench/golang.tar bin/podman/podman.tar &&
    hack/tekton/install.sh &&
    go test -tags e2e,extended -count=1 -timeout 30m -v -run 'Tekton|Podman|Rollout' ./e2e/
} || rc=1
hack/cluster/down.sh || rc=1
exit $rc
