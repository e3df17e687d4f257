#!/usr/bin/env bash
# Set up .venv and start the demo on the embedded tiny LLaVA-NeXT (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/python app.py "$@"
