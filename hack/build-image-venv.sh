#!/usr/bin/env bash
# Build the operator's runtime virtual environment into DIR. The Dockerfile runs this very
# script, so a venv built here holds exactly what the image holds: tests/unit/test_image.py
# builds one and runs it as UID 65532 to prove the image's contents without a Docker engine.
#
# Usage: hack/build-image-venv.sh DIR
#   PYTHON   interpreter to base the venv on (default: python3; the image's is 3.11)
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="$1"
python="${PYTHON:-python3}"
# requirements/constraints.txt is a `pip freeze`, which leaves pip itself out: pin it here.
pip_version=26.3

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Build the wheel from a copy of the sources: setuptools writes build/ and *.egg-info next to
# the sources, which must not land in a developer's work tree.
mkdir -p "$work/src"
cp -R "$root/pyproject.toml" "$root/operator" "$work/src/"
if [[ -f "$root/README.md" ]]; then cp "$root/README.md" "$work/src/"; fi
find "$work/src" -depth \( -name __pycache__ -o -name '*.egg-info' \) -exec rm -rf {} +

"$python" -m venv "$target"
venv_python="$target/bin/python"
"$venv_python" -m pip install --quiet "pip==$pip_version"
"$venv_python" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$work/src"
# Every dependency at the version CI tests with; pip refuses a package the constraints
# would have to break. Bytecode is compiled now, since the image cannot write it later.
"$venv_python" -m pip install --quiet --constraint "$root/requirements/constraints.txt" \
  "$work"/wheels/gpuyard-*.whl
# The image runs the operator, nothing else: leave out the installers.
"$venv_python" -m pip uninstall --quiet --yes pip setuptools
echo "build-image-venv: $target ready" >&2
