#!/usr/bin/env bash
# Writes the cluster's container images as OCI layout tarballs, without a
# daemon or a registry. With no argument, into bin/images:
#   registry.k8s.io/pause:3.10        the sandbox image containerd expects
#   localhost/busybox:dev             Debian's busybox-static, for test pods
#   localhost/layercache/NAME:dev     one per project binary in cmd/, with
#                                     Debian's CA certificates (HTTPS registries)
#   localhost/registry:dev            CNCF Distribution (hack/registry) on
#                                     busybox, the local cluster's registry
# With `golang`, only bin/bench/golang.tar (for make bench-e2e and the
# Tekton e2e):
#   localhost/golang:dev              busybox plus this machine's Go toolchain
# With `tekton`, bin/tekton/NAME.tar (for make test-extended):
#   localhost/tekton/NAME:dev         Tekton Pipelines' controller, webhook,
#                                     entrypoint, nop, workingdirinit and
#                                     sidecarlogresults (hack/tekton), at
#                                     /ko-app/NAME as Tekton expects
# With `podman`, bin/podman/podman.tar (for make test-extended):
#   localhost/podman:dev              Debian 12 with podman, crun and
#                                     fuse-overlayfs from Debian's packages
#                                     (mmdebstrap, with this machine's apt
#                                     sources), set up for nested builds
# Reproducible: the same sources give the same digests (printed).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
case "${1:-}" in
  "") out=$repo/bin/images ;;
  golang) out=$repo/bin/bench ;;
  tekton) out=$repo/bin/tekton ;;
  podman) out=$repo/bin/podman ;;
  *) echo "usage: $0 [golang|tekton|podman]" >&2; exit 2 ;;
esac
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
busybox_root() { # DIR: busybox-static with its applets, a passwd and a /tmp
  local bb=$1 applet
  [ -x /bin/busybox ] || "$repo/hack/cluster/install-deps.sh"
  mkdir -p "$bb"/{bin,etc,tmp,proc,sys,dev,root}
  chmod 1777 "$bb/tmp"
  install -m 0755 /bin/busybox "$bb/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$bb/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$bb/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$bb/etc/group"
  chmod 0644 "$bb/etc/passwd" "$bb/etc/group"
}

if [ "${1:-}" = golang ]; then
  # What `go build` needs of GOROOT: the tools, the standard library's
  # sources, go.env and VERSION (no tests, docs or API files).
  goroot=$(go env GOROOT)
  root=$work/golang
  busybox_root "$root"
  mkdir -p "$root/usr/local/go"
  for part in bin pkg src lib go.env VERSION; do
    cp -a "$goroot/$part" "$root/usr/local/go/"
  done
  layout golang localhost/golang:dev "$root" --cmd sh \
    --env PATH=/usr/local/go/bin:/bin,GOTOOLCHAIN=local,CGO_ENABLED=0,GOPROXY=off
  exit 0
fi

if [ "${1:-}" = podman ]; then
  if ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  fi
  root=$work/podman
  SOURCE_DATE_EPOCH=0 mmdebstrap --quiet --mode=root --variant=essential \
    --include=podman,crun,conmon,fuse-overlayfs,ca-certificates \
    --aptopt='Acquire::Check-Valid-Until "false"' bookworm "$root"
  rm -rf "${root:?}"/dev/* # the runtime makes /dev
  # Nested podman: its storage on a layercache volume (an overlay, which
  # the kernel cannot stack another overlay's upper dir on), so through
  # fuse-overlayfs; no cgroups or network of its own (the pod has them).
  cat > "$root/etc/containers/storage.conf" <<'CONF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"

[storage.options.overlay]
mount_program = "/usr/bin/fuse-overlayfs"
CONF
  cat > "$root/etc/containers/containers.conf" <<'CONF'
[containers]
netns = "host"
cgroups = "disabled"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
CONF
  mkdir -p "$root/etc/containers/registries.conf.d"
  cat > "$root/etc/containers/registries.conf.d/50-layercache-local.conf" <<'CONF'
# The local cluster's registry (config/local) speaks plain HTTP.
[[registry]]
location = "10.96.0.50:5000"
insecure = true
CONF
  layout podman localhost/podman:dev "$root" --cmd bash
  exit 0
fi

if [ "${1:-}" = tekton ]; then
  [ -f /etc/ssl/certs/ca-certificates.crt ] || "$repo/hack/cluster/install-deps.sh"
  "$repo/hack/tekton/build.sh" "$work/bin"
  for name in controller webhook entrypoint nop workingdirinit sidecarlogresults; do
    mkdir -p "$work/$name/ko-app" "$work/$name/etc/ssl/certs" "$work/$name/tmp"
    chmod 1777 "$work/$name/tmp"
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$work/$name/etc/ssl/certs/"
    install -m 0755 "$work/bin/$name" "$work/$name/ko-app/$name"
    layout "$name" "localhost/tekton/$name:dev" "$work/$name" --entrypoint "/ko-app/$name"
  done
  exit 0
fi

mkdir -p "$work/pause"
gobuild "$work/pause/pause" ./hack/images/pause
layout pause registry.k8s.io/pause:3.10 "$work/pause" --entrypoint /pause

busybox_root "$work/busybox"
layout busybox localhost/busybox:dev "$work/busybox" --cmd sh

[ -f /etc/ssl/certs/ca-certificates.crt ] || "$repo/hack/cluster/install-deps.sh"
for dir in cmd/*/; do
  name=$(basename "$dir")
  mkdir -p "$work/$name/etc/ssl/certs"
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$work/$name/etc/ssl/certs/"
  gobuild "$work/$name/$name" "./$dir"
  layout "$name" "localhost/layercache/$name:dev" "$work/$name" --entrypoint "/$name"
done

busybox_root "$work/registry"
mkdir -p "$work/registry/etc/distribution" "$work/registry/var/lib/registry"
"$repo/hack/registry/build.sh" "$work/registry/bin"
rm "$work/registry/bin/registry-htpasswd"
cat > "$work/registry/etc/distribution/config.yml" <<'YAML'
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
  secret: layercache-local-cluster
YAML
chmod 0644 "$work/registry/etc/distribution/config.yml"
layout registry localhost/registry:dev "$work/registry" --entrypoint /bin/registry --cmd serve,/etc/distribution/config.yml
