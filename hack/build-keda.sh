#!/usr/bin/env bash
# Build KEDA's operator and metrics API server (the external metrics adapter) from the Go
# module proxy, into a cache outside the repository keyed by KEDA_VERSION, for the
# side-by-side with gpuyard (issue 19). Only when asked: `make keda`.
#
# KEDA's go.mod carries a replace directive; a replace applies only in the main module,
# so the wrapper module here repeats every one it has.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"

cache="${GPUYARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuyard}"
bin_dir="$cache/bin/keda-$KEDA_VERSION"
if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
started=$SECONDS
log() { printf '[keda %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
progress() {
  awk -v what="$1" '{ n++; if (n % 100 == 0) { printf "[keda] %s: %d packages compiled (last: %s)\n", what, n, $0; fflush() } }
    END { printf "[keda] %s: %d packages compiled\n", what, n }' >&2
}

# KEDA's CRDs as this version's module ships them (config/crd/bases), next to the binaries
# that need them; hack/localcluster/keda.py installs them. Not committed: they follow
# KEDA_VERSION.
copy_crds() {
  [[ -f "$bin_dir/crd/keda.sh_scaledobjects.yaml" ]] && return 0
  local module_dir
  module_dir="$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  mkdir -p "$bin_dir/crd.tmp"
  cp "$module_dir"/config/crd/bases/*.yaml "$bin_dir/crd.tmp/"
  # The module cache is read-only; the copies need not be.
  chmod u+w "$bin_dir"/crd.tmp/*.yaml
  rm -rf "$bin_dir/crd"
  mv "$bin_dir/crd.tmp" "$bin_dir/crd"
  log "keda $KEDA_VERSION: CRDs copied to $bin_dir/crd"
}

needed=()
for name in operator adapter; do
  [[ -x "$bin_dir/keda-$name" ]] || needed+=("$name")
done
if [[ ${#needed[@]} -eq 0 ]]; then
  mkdir -p "$bin_dir"
  copy_crds
  echo "$bin_dir"
  exit 0
fi

mkdir -p "$bin_dir"
src="$cache/src/keda-$KEDA_VERSION"
mkdir -p "$src"
log "keda $KEDA_VERSION: resolving modules"
gomod="$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
{
  printf 'module gpuyard.local/keda-build\n\ngo 1.26.0\n\nrequire github.com/kedacore/keda/v2 %s\n\n' "$KEDA_VERSION"
  grep -E '^replace .*=>' "$gomod" || true
} > "$src/go.mod"
(cd "$src" && for name in "${needed[@]}"; do go get "github.com/kedacore/keda/v2/cmd/$name@$KEDA_VERSION" >/dev/null; done)
ldflags="-s -w -X github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION"
for name in "${needed[@]}"; do
  log "keda $KEDA_VERSION: building $name"
  (cd "$src" && go build -v -ldflags "$ldflags" -o "$bin_dir/keda-$name.tmp" \
    "github.com/kedacore/keda/v2/cmd/$name" 2>&1 | progress "$name")
  [[ -x "$bin_dir/keda-$name.tmp" ]] || { log "building $name failed"; exit 1; }
  mv "$bin_dir/keda-$name.tmp" "$bin_dir/keda-$name"
done
copy_crds
log "keda binaries ready in $bin_dir"
echo "$bin_dir"
