#!/usr/bin/env bash
# Create .venv at the repository root and install what the demo (and, with --test, the tests) need.
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
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_tests" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
