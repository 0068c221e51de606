#!/usr/bin/env bash
# The end-to-end tests on a real cluster, as make test runs them: bring the
# local cluster up with 3 nodes (NODES, default 3), smoke-test it, install
# layercache from config/local, run the e2e suite, and always tear down,
# checking that nothing is left.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "skipping the cluster tests: they need root (they run a kubelet)"
  exit 0
fi
rc=0
export NODES=${NODES:-3}
hack/cluster/up.sh && hack/cluster/smoke.sh && hack/deploy-local.sh &&
  go test -tags e2e -count=1 -timeout 30m -v ./e2e/ || rc=1
hack/cluster/down.sh || rc=1
exit $rc
