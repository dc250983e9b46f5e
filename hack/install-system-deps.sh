#!/usr/bin/env bash
# Install the Debian packages the local cluster needs, when they are missing:
# Prometheus (the real server, for the autoscaler's and the tests' queries), openssl
# (certificates for the API server) and PostgreSQL 15 (the usage ledger's tests and the
# local cluster's database: hack/localcluster/postgres.py runs its own initdb). Go is
# part of the build machine's image.
set -euo pipefail

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
[[ -x /usr/lib/postgresql/15/bin/initdb ]] || command -v initdb >/dev/null || missing+=(postgresql)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "[deps] installing ${missing[*]} from Debian's packages" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package enables a system-wide Prometheus service; where systemd runs it,
# it holds port 9090 and is not ours. The local cluster starts its own on a free port.
# The same holds for the postgresql package's cluster on 5432: ours use free ports.
command -v go >/dev/null || { echo "[deps] Go is required to build the cluster binaries" >&2; exit 1; }
