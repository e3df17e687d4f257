#!/usr/bin/env bash
# The GPU check, as the one command a device call runs (BENCHMARKS.md, "The GPU check"):
#
#   GPU_CHECK_COMMIT=abc123 bash scripts/gpu_check.sh    # on the GPU machine: results into $OUT
#   bash scripts/gpu_check.sh --dry-run                   # anywhere: the same steps on the CPU, tiny model (the tests)
#
# Prints the plan first (each step, what it does, its time limit), installs the wheels carried in .whl/ (made
# here by scripts/gpu_wheels.sh) into a private folder that shadows the machine's own packages, and stops the
# call if that fails: the machine's transformers 5.17 is not one the library supports. Then it prints the
# versions and runs python -m bench.gpu_check, which keeps every step to its box inside the budget; the
# budget counts from this script's start. Arguments pass through (--steps, --box STEP=S, --budgets ...).
# Environment: OUT (results folder, default /tmp/gpu-check-out), PYTHON (default python3: on the GPU machine,
# the one that holds PyTorch), GPU_CHECK_BUDGET_S (the whole call, default 400; a dry run 420),
# GPU_CHECK_COMMIT (the commit checked: the machine gets no .git), GPU_CHECK_WHEELS (default .whl),
# GPU_CHECK_SITE (where the wheels go, default /tmp/site).
set -uo pipefail
STARTED=$(date +%s.%N)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
WHEEL_LIMIT_S=60
mkdir -p "$OUT"
# No network there: pip gets --no-index, the hub and its clients are told to stay offline.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  DO_NOT_TRACK=1 GRADIO_ANALYTICS_ENABLED=False PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done
if [ "$dry_run" = 1 ]; then BUDGET_S=${GPU_CHECK_BUDGET_S:-420}; else BUDGET_S=${GPU_CHECK_BUDGET_S:-400}; fi
check=("$PYTHON" -m bench.gpu_check --started-at "$STARTED" --budget-s "$BUDGET_S")

install_wheels() {
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check.sh: STOPPED: no wheels in $WHEELS/ (make them here with scripts/gpu_wheels.sh and carry .whl):" \
      "the machine's own transformers 5.17 is not one the library supports" >&2
    return 1
  fi
  # --no-deps: every wheel needed is there; --upgrade: an earlier install is replaced.
  if ! timeout "$WHEEL_LIMIT_S" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl; then
    echo "gpu_check.sh: STOPPED: installing $WHEELS/*.whl failed (or took over $WHEEL_LIMIT_S s); nothing was run:" \
      "the machine's own transformers 5.17 is not one the library supports" >&2
    return 1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

run() {
  "${check[@]}" --print-plan --wheel-limit-s "$([ "$dry_run" = 1 ] && echo 0 || echo "$WHEEL_LIMIT_S")" "$@" || return 2
  if [ "$dry_run" = 1 ]; then
    echo "dry run: no wheels installed (it checks the code with this machine's packages)"
  else
    install_wheels || return 3
  fi
  "$PYTHON" - <<'PY'
import importlib.metadata as metadata, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
for name in ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors", "av", "plotly"):
    try:
        dist = metadata.distribution(name)
        print(f"{name} {dist.version} ({dist.locate_file('')})")
    except metadata.PackageNotFoundError:
        print(f"{name} missing")
PY
  if command -v nvidia-smi >/dev/null; then timeout 20 nvidia-smi; fi
  # bench.gpu_check ends each step at its box and itself within the budget; timeout is the backstop, 10 s
  # after the budget (then KILL 5 s later), well inside the device call's timeout_s (budget + 30 s).
  left=$("$PYTHON" -c "import time; print(max(1, int($STARTED + $BUDGET_S - time.time())))")
  timeout --kill-after=5 "$((left + 10))" "${check[@]}" --out "$OUT" "$@"
}

run "$@" 2>&1 | tee "$OUT/gpu-check-console.txt"
exit "${PIPESTATUS[0]}"
