#!/usr/bin/env bash
# Writes the cluster's PKI and kubeconfigs into $PKI (once): a CA, the API
# server's serving certificate, its client certificate towards the kubelet,
# the service-account key pair, random static tokens, one kubeconfig per
# component and one for the admin.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NODE_IP=${NODE_IP:-$(node_ip)}
[ -f "$PKI/ca.crt" ] && [ -f "$KUBECONFIG_PATH" ] && exit 0
mkdir -p "$PKI"
cd "$PKI"
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=layercache-local-ca" \
  -keyout ca.key -out ca.crt 2>/dev/null
cat > apiserver.ext <<EOT
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:$NODE_NAME,IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
EOT
printf 'keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
sign() { # NAME SUBJECT EXTFILE
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}
sign apiserver "/CN=kube-apiserver" apiserver.ext
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client.ext
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
token() { openssl rand -hex 16; }
admin=$(token) kcm=$(token) sched=$(token) kubelet=$(token) proxy=$(token)
cat > tokens.csv <<EOT
$admin,admin,uid-admin,"system:masters"
$kcm,system:kube-controller-manager,uid-kcm
$sched,system:kube-scheduler,uid-scheduler
$kubelet,system:node:$NODE_NAME,uid-kubelet,"system:nodes"
$proxy,system:kube-proxy,uid-proxy
EOT
kubeconfig() { # FILE TOKEN
  cat > "$1" <<EOT
apiVersion: v1
kind: Config
clusters:
- name: layercache-local
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority: $PKI/ca.crt
users:
- name: user
  user:
    token: $2
contexts:
- name: layercache-local
  context: {cluster: layercache-local, user: user}
current-context: layercache-local
EOT
}
kubeconfig controller-manager.kubeconfig "$kcm"
kubeconfig scheduler.kubeconfig "$sched"
kubeconfig kubelet.kubeconfig "$kubelet"
kubeconfig kube-proxy.kubeconfig "$proxy"
kubeconfig "$KUBECONFIG_PATH" "$admin"
