#!/usr/bin/env bash
# The GPU check, as the one command a device call runs (BENCHMARKS.md, "The GPU check"):
#
#   bash scripts/gpu_check.sh                 # on the GPU machine: results into $OUT
#   bash scripts/gpu_check.sh --dry-run       # anywhere: the same steps on the CPU, tiny model (the tests run this)
#
# Installs the wheels carried in .whl/ (made here by scripts/gpu_wheels.sh) into a private folder that
# shadows the machine's own packages, prints the versions it runs with, then runs python -m bench.gpu_check
# under a wall-clock budget. Arguments are passed on to it (--steps, --budgets, --budget-s ...).
# Environment: OUT (results folder, default /tmp/gpu-check-out), PYTHON (default python3: on the GPU machine,
# the one that holds PyTorch), GPU_CHECK_BUDGET_S (default 255: the steps' budget, so that installing
# the wheels, a step killed at its box and writing the results still end inside a 300-second call),
# GPU_CHECK_SITE (where the wheels go, default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-255}
SITE=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done

run() {
  if [ "$dry_run" = 1 ]; then
    echo "dry run: no wheels installed (it checks the code with this machine's packages)"
  elif compgen -G ".whl/*.whl" >/dev/null; then
    # --no-deps: every wheel needed is in .whl/; --upgrade: a warm machine's earlier install is replaced.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
      || echo "gpu_check.sh: installing .whl/*.whl FAILED: the check runs on the machine's own packages" >&2
  else
    echo "gpu_check.sh: no .whl/*.whl: the machine's own packages are used (run scripts/gpu_wheels.sh here first)" >&2
  fi
  "$PYTHON" - <<'EOF'
import importlib.metadata as metadata, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
for name in ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors", "av", "plotly"):
    try:
        dist = metadata.distribution(name)
        print(f"{name} {dist.version} ({dist.locate_file('')})")
    except metadata.PackageNotFoundError:
        print(f"{name} missing")
EOF
  if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
  # The Python entry keeps to its budget itself (each step has a time box); timeout is the backstop.
  timeout --kill-after=5 "$((BUDGET_S + 15))" "$PYTHON" -m bench.gpu_check --out "$OUT" --budget-s "$BUDGET_S" "$@"
}

run "$@" 2>&1 | tee "$OUT/gpu-check-console.txt"
exit "${PIPESTATUS[0]}"
