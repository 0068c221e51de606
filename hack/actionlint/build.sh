#!/usr/bin/env bash
# Builds actionlint (github.com/rhysd/actionlint, pinned in this module's
# go.mod as a tool) into DIR (default bin/): make lint checks the GitHub
# Actions workflows with it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../bin}
mkdir -p "$out"
cd "$here"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid=" -o "$out/actionlint" github.com/rhysd/actionlint/cmd/actionlint
