#!/usr/bin/env bash
# Build the local cluster's binaries from Go modules into a cache outside the repository.
#
# There is no Docker engine and no download site on the build machines, only the Go
# module proxy, so kube-apiserver & co. are compiled here. A cold build takes many
# minutes on two cores; every step prints progress. Binaries already in the cache are
# reused, so a warm run takes well under a second.
#
# Usage: hack/build-binaries.sh            build what is missing, print the bin dir
#        hack/build-binaries.sh --print-dir print the bin dir only (builds nothing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${GPUYARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuyard}"
bin_dir="$cache/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"

if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

# A module that needs a newer Go must fail here, not fetch a toolchain behind our back.
export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

mkdir -p "$bin_dir"
started=$SECONDS

log() { printf '[build %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }

# `go build -v` names every package it compiles: a counter shows that a long build moves.
progress() {
  awk -v what="$1" '{ n++; if (n % 50 == 0) { printf "[build] %s: %d packages compiled (last: %s)\n", what, n, $0; fflush() } }
    END { printf "[build] %s: %d packages compiled\n", what, n }' >&2
}

# make_module DIR MODULE-LINES...: a throwaway wrapper module that requires what we build.
make_module() {
  local dir="$1"; shift
  mkdir -p "$dir"
  printf '%s\n' "$@" > "$dir/go.mod"
}

build_kubernetes() {
  local needed=()
  for name in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x "$bin_dir/$name" ]] || needed+=("$name")
  done
  [[ ${#needed[@]} -gt 0 ]] || return 0

  local src="$cache/src/kubernetes-$K8S_VERSION"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${K8S_VERSION#v1.}"
  log "kubernetes $K8S_VERSION: resolving modules (staging modules pinned to $staging)"
  make_module "$src" "module gpuyard.local/kubernetes-build" "" "go 1.26.0" "" \
    "require k8s.io/kubernetes $K8S_VERSION"
  # k8s.io/kubernetes lists its staging modules at v0.0.0 and points them at ./staging
  # with replace directives, which only apply inside its own repository. Every one of
  # them is published as v0.<minor>.<patch>: pin them to that.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
  local replaces
  replaces="$(awk '/^\tk8s\.io\/[a-z0-9-]+ v0\.0\.0$/ { print "replace " $1 " => " $1 " " v }' v="$staging" "$gomod")"
  printf '%s\n' "$replaces" >> "$src/go.mod"
  (cd "$src" && go mod tidy >/dev/null 2>&1 || true
   for name in "${needed[@]}"; do
     local pkg="k8s.io/kubernetes/cmd/$name"
     go get "$pkg" >/dev/null
   done)

  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for name in "${needed[@]}"; do
    log "kubernetes $K8S_VERSION: building $name"
    (cd "$src" && go build -v -ldflags "$ldflags" -o "$bin_dir/$name.tmp" "k8s.io/kubernetes/cmd/$name" 2>&1 | progress "$name")
    [[ -x "$bin_dir/$name.tmp" ]] || { log "building $name failed"; return 1; }
    mv "$bin_dir/$name.tmp" "$bin_dir/$name"
  done
}

build_etcd() {
  [[ -x "$bin_dir/etcd" ]] && return 0
  local src="$cache/src/etcd-$ETCD_VERSION"
  log "etcd $ETCD_VERSION: resolving modules"
  make_module "$src" "module gpuyard.local/etcd-build" "" "go 1.26.0" "" \
    "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  cat > "$src/main.go" <<'GO'
// The etcd server binary: the same entry point as etcd's own main package.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$src" && go mod tidy >/dev/null)
  log "etcd $ETCD_VERSION: building"
  (cd "$src" && go build -v -ldflags "-s -w" -o "$bin_dir/etcd.tmp" . 2>&1 | progress etcd)
  mv "$bin_dir/etcd.tmp" "$bin_dir/etcd"
}

# build_tool NAME MODULE VERSION PACKAGE [LDFLAGS]
build_tool() {
  local name="$1" module="$2" version="$3" pkg="$4" ldflags="${5:-}"
  [[ -x "$bin_dir/$name" ]] && return 0
  local src="$cache/src/$name-$version"
  log "$name $version: resolving modules"
  make_module "$src" "module gpuyard.local/$name-build" "" "go 1.26.0" "" "require $module $version"
  (cd "$src" && go get "$pkg" >/dev/null)
  log "$name $version: building"
  (cd "$src" && go build -v -ldflags "-s -w $ldflags" -o "$bin_dir/$name.tmp" "$pkg" 2>&1 | progress "$name")
  mv "$bin_dir/$name.tmp" "$bin_dir/$name"
}

build_etcd
build_tool kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_kubernetes

log "all binaries ready in $bin_dir"
echo "$bin_dir"
