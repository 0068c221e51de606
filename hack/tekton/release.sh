#!/usr/bin/env bash
# Writes Tekton Pipelines' release manifests (the pinned module's own
# config/: namespace, RBAC, CRDs, config maps, controller and webhook; no
# resolvers, no events controller) to stdout, with the images that
# hack/images/build.sh tekton builds (localhost/tekton/NAME:dev) in place of
# its ko:// references, and this project's busybox as the shell image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
src=$(go list -m -f '{{.Dir}}' github.com/tektoncd/pipeline)
[ -d "$src/config" ] || { echo "no config/ in $src" >&2; exit 1; }
files=("$src"/config/100-namespace/*.yaml "$src"/config/200-*.yaml "$src"/config/201-*.yaml
  "$src"/config/300-crds/*.yaml "$src"/config/config-*.yaml "$src"/config/clusterrole-aggregate-*.yaml
  "$src/config/controller.yaml" "$src/config/webhook.yaml" "$src/config/500-webhooks.yaml")
for f in "${files[@]}"; do
  echo "---"
  sed -e 's#ko://github.com/tektoncd/pipeline/cmd/\([a-z]*\)#localhost/tekton/\1:dev#g' \
      -e 's#"cgr.dev/chainguard/busybox@sha256:[0-9a-f]*"#"localhost/busybox:dev"#' "$f"
done
