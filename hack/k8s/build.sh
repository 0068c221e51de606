#!/usr/bin/env bash
# Builds Kubernetes and etcd from the Go module proxy into a version-keyed
# folder. A binary that is already there is not rebuilt.
#
#   hack/k8s/build.sh OUTDIR [component...]   (default: every component)
#
# Components: etcd kube-apiserver kube-controller-manager kube-scheduler
# kubelet kube-proxy kubectl.
set -euo pipefail

KUBE_VERSION=v1.33.13
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR [component...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)

comps=("$@")
if [ ${#comps[@]} -eq 0 ]; then
  comps=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
fi

ver=${KUBE_VERSION#v}
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=${KUBE_VERSION} \
 -X k8s.io/component-base/version.gitMajor=${ver%%.*} \
 -X k8s.io/component-base/version.gitMinor=$(echo "$ver" | cut -d. -f2) \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

cd "$here"
for c in "${comps[@]}"; do
  if [ ! -d "cmd/$c" ]; then
    echo "build.sh: unknown component $c" >&2
    exit 2
  fi
  if [ -x "$out/$c" ]; then
    continue
  fi
  start=$(date +%s)
  # Build to a temporary name so an interrupted build never leaves a
  # half-written binary that a later run would take as done.
  CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/.$c.tmp" "./cmd/$c"
  mv "$out/.$c.tmp" "$out/$c"
  echo "built $c in $(( $(date +%s) - start ))s"
done
