#!/usr/bin/env bash
# Set up .venv (Chromium included) and .venv-vllm (a CPU vLLM with the plugin, for tests/test_vllm_plugin.py;
# SKIP_VLLM=1 leaves it out, and those tests skip), check formatting and lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
[ "${SKIP_VLLM:-}" = 1 ] || bash scripts/setup.sh --vllm
.venv/bin/ruff format --check --quiet . || { echo "ruff format: run '.venv/bin/ruff format .'" >&2; exit 1; }
.venv/bin/ruff check --quiet .
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -rs "$@"
