#!/usr/bin/env bash
# Writes the cluster's container images as OCI layout tarballs into
# bin/images, without a daemon or a registry:
#   registry.k8s.io/pause:3.10        the sandbox image containerd expects
#   localhost/busybox:dev             Debian's busybox-static, for test pods
#   localhost/layercache/NAME:dev     one per project binary in cmd/
# Reproducible: the same sources give the same digests (printed).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$repo/bin/images
work=$out/.work
rm -rf "$work"
mkdir -p "$work" "$out"
trap 'rm -rf "$work"' EXIT
cd "$repo"

gobuild() { # OUT PKG: a static, reproducible binary
  CGO_ENABLED=0 go build -trimpath -ldflags '-s -w -buildid=' -o "$1" "$2"
}
layout() { # NAME REF ROOTFS FLAGS...
  local name=$1 ref=$2 root=$3
  shift 3
  find "$root" -exec touch -h -d @0 {} +
  go run ./hack/images/ocilayout --ref "$ref" --out "$out/$name.tar" "$@" "$root"
}

mkdir -p "$work/pause"
gobuild "$work/pause/pause" ./hack/images/pause
layout pause registry.k8s.io/pause:3.10 "$work/pause" --entrypoint /pause

[ -x /bin/busybox ] || "$repo/hack/cluster/install-deps.sh"
bb=$work/busybox
mkdir -p "$bb"/{bin,etc,tmp,proc,sys,dev,root}
chmod 1777 "$bb/tmp"
install -m 0755 /bin/busybox "$bb/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$bb/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$bb/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$bb/etc/group"
chmod 0644 "$bb/etc/passwd" "$bb/etc/group"
layout busybox localhost/busybox:dev "$bb" --cmd sh

for dir in cmd/*/; do
  name=$(basename "$dir")
  mkdir -p "$work/$name"
  gobuild "$work/$name/$name" "./$dir"
  layout "$name" "localhost/layercache/$name:dev" "$work/$name" --entrypoint "/$name"
done
