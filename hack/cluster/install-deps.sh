#!/usr/bin/env bash
# Installs the Debian packages the local cluster needs, when missing.
set -euo pipefail
pkgs=(containerd runc containernetworking-plugins iptables conntrack socat busybox-static iproute2 openssl procps ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "[cluster] installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package starts a system containerd on /run/containerd; the cluster
# runs its own, so stop the system one (and keep it from starting again).
if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
  systemctl disable --now containerd >/dev/null 2>&1 || true
fi
