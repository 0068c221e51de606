#!/usr/bin/env bash
# make release VERSION=vX.Y.Z REGISTRY=HOST[:PORT]/PREFIX: builds the
# manager, the node agent and the CLI for linux/amd64 and linux/arm64,
# pushes each as an OCI image index by digest (tagged VERSION) with an
# SPDX SBOM per platform attached as a referrer (hack/release), writes
# dist/release/install.yaml (config/default) and the chart
# (dist/release/layercache-X.Y.Z.tgz, its values pinned by digest), pushes
# the chart to oci://REGISTRY/charts, and writes dist/release/SHA256SUMS.
# REGISTRY_INSECURE=true: plain HTTP. REGISTRY_AUTH_FILE: a Docker
# config.json (or .dockerconfigjson) with the registry's credentials.
# The same sources give the same image digests.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
version=${VERSION:-}
registry=${REGISTRY:-}
die() { echo "release: $*" >&2; exit 2; }
[[ $version =~ ^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$ ]] ||
  die "VERSION=\"$version\": want vMAJOR.MINOR.PATCH[-PRERELEASE], for example VERSION=v0.2.0"
[[ $registry == */* ]] || die "REGISTRY=\"$registry\": want HOST[:PORT]/PREFIX, for example REGISTRY=registry.example.com/layercache"
registry=${registry%/}
out=$repo/dist/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out" && mkdir -p "$out"

export DOCKER_CONFIG=$work/docker
mkdir -p "$DOCKER_CONFIG"
if [ -n "${REGISTRY_AUTH_FILE:-}" ]; then
  [ -r "$REGISTRY_AUTH_FILE" ] || die "REGISTRY_AUTH_FILE=$REGISTRY_AUTH_FILE cannot be read"
  cp "$REGISTRY_AUTH_FILE" "$DOCKER_CONFIG/config.json"
else
  echo '{}' > "$DOCKER_CONFIG/config.json"
fi
insecure=()
helm_http=()
if [ "${REGISTRY_INSECURE:-false}" = true ]; then insecure=(--insecure); helm_http=(--plain-http); fi

# The images carry a static binary and Debian's CA certificates (package
# ca-certificates, architecture all: the same file on every platform).
[ -f /etc/ssl/certs/ca-certificates.crt ] || hack/cluster/install-deps.sh
cacerts=$(dpkg-query -W -f '${Version}' ca-certificates)
images=()
for name in manager node-agent layercache; do
  spec=$name=
  for arch in amd64 arm64; do
    root=$work/$arch/$name
    mkdir -p "$root/etc/ssl/certs"
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    GOOS=linux GOARCH=$arch CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid=" \
      -o "$root/$name" "./cmd/$name"
    spec+="$arch:$root:$root/$name,"
  done
  images+=(--image "${spec%,}")
done
created=$(TZ=UTC git log -1 --date=format-local:%Y-%m-%dT%H:%M:%SZ --format=%cd 2>/dev/null || echo 1970-01-01T00:00:00Z)
(cd hack/release && go run . --version "$version" --registry "$registry" --out "$out" --created "$created" \
  --deb "ca-certificates=$cacerts" "${insecure[@]}" "${images[@]}")
ref() { awk -v n="$1" '$1 == n {print $2}' "$out/images.txt"; }
# COSIGN=keyless signs each image with the CI's OIDC identity (the release
# workflow); COSIGN=KEYFILE, with a key (its password in COSIGN_PASSWORD).
# COSIGN_TLOG=false: no entry in the Rekor transparency log (a registry
# without the internet). The cosign of PATH, else hack/cosign's in bin/.
cosign_args=(--yes)
[ "${COSIGN_TLOG:-true}" = true ] || cosign_args+=(--tlog-upload=false)
[ "${REGISTRY_INSECURE:-false}" != true ] || cosign_args+=(--allow-insecure-registry --allow-http-registry)
cosign=$(command -v cosign || echo "$repo/bin/cosign")
case "${COSIGN:-}" in
  "") ;;
  keyless) awk '{print $2}' "$out/images.txt" | xargs -n1 "$cosign" sign "${cosign_args[@]}" ;;
  *) [ -r "$COSIGN" ] || die "COSIGN=$COSIGN: no such key file"
     [ -x "$cosign" ] || hack/cosign/build.sh bin
     awk '{print $2}' "$out/images.txt" | xargs -n1 "$cosign" sign "${cosign_args[@]}" --key "$COSIGN" ;;
esac
manager=$(ref manager) agent=$(ref node-agent)

# install.yaml: config/default with the images by digest.
hack/k8s/build.sh bin/k8s/v1.33.13 kubectl >/dev/null
bin/k8s/v1.33.13/kubectl kustomize config/default |
  sed -e "s#localhost/layercache/manager:dev#$manager#g" -e "s#localhost/layercache/node-agent:dev#$agent#g" > "$out/install.yaml"
! grep -q 'localhost/layercache' "$out/install.yaml" || die "install.yaml still names a local image"

# The chart, its version the release's, its images pinned by digest.
[ -x bin/helm ] || hack/helm/build.sh bin
chart=$work/chart/layercache
mkdir -p "$work/chart" && cp -a dist/chart "$chart"
sed -i -e "s/^version: .*/version: ${version#v}/" -e "s/^appVersion: .*/appVersion: \"$version\"/" "$chart/Chart.yaml"
sed -i -e "s#repository: localhost/layercache/manager#repository: ${manager%@*}#" \
  -e "s#repository: localhost/layercache/node-agent#repository: ${agent%@*}#" "$chart/values.yaml"
awk -v m="${manager#*@}" -v a="${agent#*@}" '
  /^  manager:$/ {sec="m"} /^  nodeAgent:$/ {sec="a"}
  /^    digest: ""$/ {print "    digest: " (sec == "m" ? m : a); next} {print}' "$chart/values.yaml" > "$chart/values.yaml.new"
mv "$chart/values.yaml.new" "$chart/values.yaml"
grep -q "digest: ${manager#*@}" "$chart/values.yaml" && grep -q "digest: ${agent#*@}" "$chart/values.yaml" ||
  die "the chart's values were not pinned by digest"
bin/helm package "$chart" --destination "$out" >/dev/null
bin/helm push "$out/layercache-${version#v}.tgz" "oci://$registry/charts" --registry-config "$DOCKER_CONFIG/config.json" "${helm_http[@]}"

(cd "$out" && find . -type f ! -name SHA256SUMS | sort | sed 's#^\./##' | xargs sha256sum > SHA256SUMS)
echo "released $version to $registry: images in dist/release/images.txt, chart oci://$registry/charts/layercache --version ${version#v}"
