#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, built for its Python 3.12 on manylinux
# x86_64, and check that they and the working tree fit the 64 MiB a device call carries
# (BENCHMARKS.md, "The GPU check"). Which packages, and why: CARRIED in bench/gpu_check.py; their
# versions: requirements.txt.
#
#   bash scripts/gpu_wheels.sh            # download (from the package index), then check the sizes
#   bash scripts/gpu_wheels.sh --list     # only print NAME==VERSION (offline)
#   bash scripts/gpu_wheels.sh --check    # only check what .whl/ holds now (offline)
#   bash scripts/gpu_wheels.sh --command  # the device call's run arguments, this commit passed in (offline)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

case "${1:-}" in
  --list) exec "$PYTHON" -m bench.gpu_check --list-wheels ;;
  --check) exec "$PYTHON" -m bench.gpu_check --check-travel .whl ;;
  --command) exec "$PYTHON" -m bench.gpu_check --device-call ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_wheels.sh [--list | --check | --command]" >&2; exit 2 ;;
esac

mapfile -t pins < <("$PYTHON" -m bench.gpu_check --list-wheels)
[ "${#pins[@]}" -gt 0 ] || { echo "gpu_wheels.sh: no wheels listed" >&2; exit 1; }
# pip matches manylinux_2_N exactly: name every N the wheels may be tagged with (the device notes' list).
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
# Python 3.12 as GPU_PYTHON in bench/gpu_check.py; --no-deps: what the wheels need is there (the env step checks).
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]/#/--platform=}" -d "$staging" "${pins[@]}"
rm -rf .whl  # one version of each package: two would stop the install there
mkdir .whl
mv "$staging"/*.whl .whl/
exec "$PYTHON" -m bench.gpu_check --check-travel .whl
