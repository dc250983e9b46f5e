#!/usr/bin/env bash
# Build hack/health (gpuyard-health: kstatus and Argo CD's Lua engine reading gpuyard's
# objects, for tests/integration/test_gitops_health.py) into a cache outside the
# repository, keyed by a hash of its sources and the Go version, and print the binary's
# path. A cold build downloads a few modules from the Go module proxy and compiles in well
# under a minute; a warm run only hashes.
#
# Usage: hack/build-health-check.sh    build when missing, print the binary's path
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/health"
cache="${GPUYARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuyard}"

command -v go >/dev/null || { echo "[health] Go is required to build hack/health" >&2; exit 1; }
hash="$( (cd "$src" && cat go.mod go.sum ./*.go && go version) | sha256sum | cut -c1-16)"
binary="$cache/health-$hash/gpuyard-health"

if [[ ! -x "$binary" ]]; then
  started=$SECONDS
  echo "[health] building hack/health into $(dirname "$binary")" >&2
  mkdir -p "$(dirname "$binary")"
  # go.sum pins every module: nothing is resolved anew, and a newer Go is never fetched.
  (cd "$src" && GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
    go build -o "$binary.tmp" .)
  mv "$binary.tmp" "$binary"
  echo "[health] built in $((SECONDS - started))s" >&2
fi
echo "$binary"
