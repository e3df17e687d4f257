"""The GPU check: every CUDA path of this repository and its numbers on one GPU, in one prepared call.

    bash scripts/gpu_wheels.sh                        # here: the wheels the GPU machine lacks, into .whl/
    bash scripts/gpu_wheels.sh --command              # here: the device call's exact arguments
    bash scripts/gpu_check.sh                         # there: installs them, then runs this within the budget
    bash scripts/gpu_check.sh --dry-run               # anywhere: the same steps on the CPU, tiny model

This module is the parent: it prints the plan (bench.gpu_plan: each step, what it does, its time limit),
then runs the steps in order, each in a process of its own (bench.gpu_steps) and a process group of its
own, so that a CUDA fault, an out-of-memory or a hang in one cannot stop the others, and so that ending a
step ends everything it started. A step is ended at its box, when the parent is told to stop (SIGTERM,
SIGINT: the handler ends the running step's group, records it as `stopped` and writes the results), and,
should the parent itself be killed, by its own watchdog at its deadline. The results are rewritten after
every step, and a step records its parts as it goes, so a step that runs out of time loses only itself.

Into --out (flat, at most 8 files): gpu-check.json (everything), gpu-check.md (the tables), gpu-check.log
(the steps' output) and pytest-gpu.txt; scripts/gpu_check.sh adds gpu-check-console.txt.

Standard library only at the top: the parent, the plan and `--list-wheels` stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu_plan import FINAL_S, MIN_BOX_S, OTHERS, OVERRUN, STEPS, Step, box_for, estimates, plan, plan_text

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# -- the GPU machine (nvidia-h200, as the device notes' KINDS.md describe it, read 2026-11-17) -----------
# Its Python, for evaluating requirement markers; scripts/gpu_wheels.sh downloads for the same version.
GPU_PYTHON = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
}
# Versions its pip list showed, for the packages this check leans on (the rest are only known to be there).
GPU_VERSIONS = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0",
    "accelerate": "1.15.0",
    "safetensors": "0.8.0",
    "numpy": "2.5.2",
}
GPU_PACKAGES = set(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
    peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
    transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp
    """.split()
)
# What the check imports that the machine lacks or has too old: travels as wheels in .whl/, at the versions
# requirements.txt pins. Anything else the check imports must already be there (the env step checks).
CARRIED = {
    "transformers": "5.17 there; the library needs 5.24 (pyproject)",
    "av": "not there; app.media imports PyAV at import time, and app.turn imports app.media",
    "plotly": "not there; app.video imports app.overlay, which imports plotly.colors",
}
# Not on the GPU machine: the steps make them unimportable, so a dry run that passes here proves the
# check never needs them there. gradio is too big to carry (about 60 MiB with its dependencies).
BLOCKED = ("gradio", "spaces")
TRAVEL_LIMIT = 64 * 2**20  # a device call carries at most this: working tree plus carried folders

# -- what the check runs ------------------------------------------------------------------------------------
CUDA_TESTS = ["tests/test_gpu.py"]  # every test file that skips without CUDA (tests/test_gpu_check.py checks)
BUDGETS = ["640", "320", "160"]
OTHER_METHODS = OTHERS  # every registered method but VisionZip, at 320 (a test keeps it equal to the registry)
# bf16 bytes of the random 7B (7.06 B parameters) and 13B (13.35 B) checkpoints the steps write, and room to spare.
CHECKPOINT_BYTES = (7_063_431_168 + 13_351_499_776) * 2 + 2 * GIB
BUDGET_S = 400  # the whole call, from scripts/gpu_check.sh's start: 6 min 40 s (BENCHMARKS.md, "The GPU check")
DRY_BUDGET_S = 420
RESULT_JSON, RESULT_MD = "gpu-check.json", "gpu-check.md"
RUN_TIMEOUT_S = BUDGET_S + 30  # the device call's timeout_s: the script's backstop ends it 15 s after the budget
RUN_CARRY = [".whl"]


# -- wheels and what travels ----------------------------------------------------------------------------------
def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names: list[str], environment: dict[str, str] | None = None) -> dict[str, str]:
    """name -> version that requirements.txt pins for `names`, markers evaluated for `environment`
    (default: this interpreter)."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        if normalize(requirement.name) in names:
            (spec,) = requirement.specifier  # the file pins each package exactly
            pins[normalize(requirement.name)] = spec.version
    missing = set(names) - set(pins)
    if missing:
        raise SystemExit(f"requirements.txt pins no version of {sorted(missing)} for this environment")
    return pins


def wheel_pins() -> list[str]:
    """NAME==VERSION for every carried package, for the GPU machine's Python."""
    pins = pinned(list(CARRIED), GPU_PYTHON)
    return [f"{name}=={pins[name]}" for name in CARRIED]


def travelling_files() -> list[Path]:
    """What a device call sends besides its carried folders: tracked files and untracked files git does not ignore."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    paths = [REPO / name for name in listing.split("\0") if name]
    return [path for path in paths if path.is_symlink() or path.exists()]  # listed but deleted: it does not travel


def travel_report(wheel_dir: Path) -> tuple[str, bool]:
    """The wheels with their sizes, the tree's size and the total against the 64 MiB a call carries;
    and whether it fits, with one version of each package."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    tree = sum(path.lstat().st_size for path in travelling_files())
    names = [normalize(wheel.name.split("-")[0]) for wheel in wheels]
    lines = [f"{wheel.name}  {wheel.stat().st_size / 2**20:.1f} MiB" for wheel in wheels]
    total = tree + sum(wheel.stat().st_size for wheel in wheels)
    lines.append(f"wheels: {len(wheels)}, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB")
    lines.append(f"working tree (tracked + untracked not ignored): {tree / 2**20:.1f} MiB")
    lines.append(f"total that travels: {total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB")
    problems = []
    if total > TRAVEL_LIMIT:
        problems.append("over the limit: carry less (see CARRIED in bench/gpu_check.py)")
    if len(set(names)) != len(names):
        problems.append("two versions of one package: the install there would stop")
    if missing := set(CARRIED) - set(names):
        problems.append(f"missing wheels: {sorted(missing)} (run scripts/gpu_wheels.sh)")
    lines += [f"PROBLEM: {problem}" for problem in problems]
    return "\n".join(lines), not problems


# -- the parent: each step in its own process group, under its box ---------------------------------------
def choose_cache(dry_run: bool, scratch: Path) -> Path:
    """Where the steps write checkpoints. A dry run: $VISIONZIP_CACHE or the scratch folder. On the GPU:
    /dev/shm when it holds the 7B and 13B checkpoints (about 43 GB; writing and reading them there runs at
    memory speed, where a disk would cost a good part of the time budget), else the temp folder with the
    most room (the registry step then trims the 13B-shaped model's layers to fit)."""
    if os.environ.get("VISIONZIP_CACHE"):
        return Path(os.environ["VISIONZIP_CACHE"])
    if dry_run:
        return scratch / "cache"
    places = [Path(p) for p in ("/dev/shm", tempfile.gettempdir()) if os.access(p, os.W_OK)]
    free = {place: shutil.disk_usage(place).free for place in places}
    roomy = [place for place in places if free[place] >= CHECKPOINT_BYTES]
    chosen = roomy[0] if roomy else max(places, key=free.__getitem__)
    return chosen / "visionzip-gpu-check"


def child_env(cache: Path, dry_run: bool) -> dict[str, str]:
    """The steps' environment: no network (pip was --no-index; the hub and gradio are told to stay offline,
    and bench.gpu_steps refuses any socket connection beyond this machine), checkpoints in `cache`. A dry
    run's steps use one CPU thread: their timings mean nothing, and on a shared machine (CI) two threads
    spin for each other and cost three to four times the CPU time."""
    env = dict(os.environ)
    if dry_run:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(
        VISIONZIP_CACHE=str(cache),  # tiny and random-weight checkpoints, shared by the steps
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",  # a step killed at its box still leaves its output in the log
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Stopped(Exception):
    """The parent was told to stop (SIGTERM from the script's backstop or the device tool, SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def raise_stopped(signum: int, frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # one stop is enough: a second signal must not cut the cleanup
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def end_group(process: subprocess.Popen, grace_s: float = 3) -> None:
    """End a step's process group (the step and everything it started): TERM, then KILL. Also after a step
    exits by itself: a child it left behind must not hold GPU memory or /dev/shm into the next step."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # a member that ignored TERM though the leader left


def run_child(step: Step, args: argparse.Namespace, scratch: Path, cache: Path, box_s: float) -> dict[str, Any]:
    """Run one step in its own process group with output to its log, for at most `box_s`; its record."""
    command = [sys.executable, "-m", "bench.gpu_steps", "--step", step.name, "--scratch", str(scratch)]
    command += ["--deadline", f"{time.time() + box_s:.1f}", "--budgets", *args.budgets]
    command += ["--dry-run"] if args.dry_run else []
    (scratch / f"step-{step.name}.json").unlink(missing_ok=True)
    start, cpu_start, status, code = time.monotonic(), children_cpu_s(), None, None
    with (args.out / step.log).open("a") as log:
        log.write(f"\n===== {step.name}: {' '.join(command[1:])} (box {box_s:.0f} s) =====\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=child_env(cache, args.dry_run),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
        except Stopped:
            status = "stopped"
            raise
        finally:
            end_group(process)
            args.record = finish_record(step, scratch, status, code if code is not None else process.returncode)
            seconds, cpu_s = round(time.monotonic() - start, 1), round(children_cpu_s() - cpu_start, 1)
            args.record.update(seconds=seconds, cpu_s=cpu_s, time_box_s=round(box_s))
            if status == "timeout":
                args.record["error"] = f"killed with its children at its box of {box_s:.0f} s; what it saved is kept"
    return args.record


def children_cpu_s() -> float:
    """CPU seconds of the ended steps so far: a step's share is what a dry run costs on an idle machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def finish_record(step: Step, scratch: Path, status: str | None, code: int | None) -> dict[str, Any]:
    record = read_json(scratch / f"step-{step.name}.json")
    if status == "stopped":
        record["error"] = "the check was stopped (signal) while this step ran; it was ended with its children"
    status = status or record.get("status") or ("ok" if code == 0 else "failed")
    if status == "failed" and "error" not in record:
        record["error"] = f"exit status {code} without a result: see {step.log}"
    record.update(status=status, exit=code)
    return record


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def commit_here() -> str | None:
    """The commit of this checkout, '+dirty' with uncommitted changes; None without git (the GPU machine)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return run.stdout.strip()[:12] + ("+dirty" if dirty.strip() else "")
    return None


def chosen_steps(args: argparse.Namespace) -> list[Step]:
    steps = [step for step in STEPS if step.name in args.steps]
    if args.test_overrun and OVERRUN.name not in args.steps:  # the tests' step that outlives its box: after env,
        steps.insert(min(1, len(steps)), OVERRUN)  # so the steps after it show that they still run
    elif OVERRUN.name in args.steps:
        steps.append(OVERRUN)
    return steps


def left_s(args: argparse.Namespace) -> float:
    """Seconds left for the steps: the budget counts from the script's start (the wheel install included)."""
    return args.started_at + args.budget_s - FINAL_S - time.time()


def print_plan(args: argparse.Namespace, steps: list[Step], left: float) -> list[dict[str, Any]]:
    rows = plan(steps, left, estimates(args.dry_run, steps), args.box)
    wheels_s = 0 if args.dry_run else args.wheel_limit_s
    print(plan_text(rows, args.budget_s, left, args.dry_run, wheels_s), flush=True)
    return rows


def orchestrate(args: argparse.Namespace) -> int:
    """Every chosen step in order, each under its box; results rewritten after each; stop on a signal."""
    args.out.mkdir(parents=True, exist_ok=True)
    steps = chosen_steps(args)
    meta = {
        "dry_run": args.dry_run,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "budget_s": args.budget_s,
        "commit": args.commit,
        "host": platform.node(),
        "budgets": args.budgets,
        "boxes_set_by_hand": args.box,
    }
    meta["plan"] = print_plan(args, steps, left_s(args))
    results: dict[str, Any] = {"meta": meta, "steps": {step.name: {"status": "pending"} for step in steps}}
    for log in {step.log for step in steps}:
        (args.out / log).write_text("")  # the steps append to them
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    meta["cache"] = str(cache := choose_cache(args.dry_run, scratch))
    cache.mkdir(parents=True, exist_ok=True)
    previous = {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopped, index = None, 0
    try:
        for index, step in enumerate(steps):
            args.record = results["steps"][step.name] = {"status": "running"}
            write_results(results, args)  # before and after every step: a call cut short keeps what ran
            results["steps"][step.name] = run_in_budget(args, steps, index, scratch, cache)
    except Stopped as stop:
        stopped = stop
        results["steps"][steps[index].name] = args.record
        for later in steps[index + 1 :]:
            results["steps"][later.name] = {"status": "not-run", "note": str(stop)}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        write_results(results, args)
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"[gpu-check] wrote {args.out / RESULT_JSON} and {args.out / RESULT_MD}", flush=True)
    if stopped:
        return 128 + stopped.signum
    return 0 if all(r["status"] in ("ok", "skipped") for r in results["steps"].values()) else 1


def run_in_budget(args: argparse.Namespace, steps: list[Step], index: int, scratch: Path, cache: Path) -> dict:
    """Step `index` under its box (bench.gpu_plan.box_for); recorded as `no-time` where the box is too short."""
    step, left = steps[index], left_s(args)
    box = box_for(index, steps, left, estimates(args.dry_run, steps), args.box)
    if box < MIN_BOX_S and step.name not in args.box:
        return {"status": "no-time", "note": f"{max(box, 0):.0f} s of the budget would be its share"}
    print(f"[gpu-check] {step.name}: up to {box:.0f} s ({left:.0f} s left)", flush=True)
    record = run_child(step, args, scratch, cache, box)
    for recording in scratch.glob("*.vzrec.json"):  # the conversation step's, for a speaker's laptop
        shutil.move(recording, args.out / recording.name)
    print(f"[gpu-check] {step.name}: {record['status']} in {record['seconds']} s", flush=True)
    return record


def write_results(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Both result files, rewritten whole (flat $OUT holds at most 8 files: no file per step)."""
    results["meta"]["seconds_since_script_start"] = round(time.time() - args.started_at, 1)
    (args.out / RESULT_JSON).write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / RESULT_MD).write_text(markdown(results) + "\n")


def markdown(results: dict[str, Any]) -> str:
    """A status table of the steps, then each step's own tables."""
    meta = results["meta"]
    title = "GPU check, dry run (CPU, tiny model)" if meta["dry_run"] else "GPU check"
    lines = [f"# {title}", "", *(f"- {key}: {value}" for key, value in meta.items() if key != "plan"), ""]
    estimate = {row["step"]: row["estimate_s"] for row in meta["plan"]}
    lines += ["| step | status | seconds | box s | estimate s | note |", "|---|---|---|---|---|---|"]
    for name, record in results["steps"].items():
        note = record.get("error") or record.get("note") or ""
        note = note.strip().splitlines()[-1] if note.strip() else ""
        seconds, box = record.get("seconds", "-"), record.get("time_box_s", "-")
        lines.append(f"| {name} | {record['status']} | {seconds} | {box} | {estimate.get(name, '-')} | {note} |")
    for name, record in results["steps"].items():
        if record.get("markdown"):
            lines += ["", f"## {name}", "", record["markdown"]]
    return "\n".join(lines)


def device_call(commit: str | None) -> dict[str, Any]:
    """The device tool's `run` arguments for the whole check, with this checkout's commit passed in (the
    machine gets the working tree without .git)."""
    command = f"GPU_CHECK_COMMIT={commit or 'unknown'} bash scripts/gpu_check.sh"
    return {"command": command, "carry": RUN_CARRY, "timeout_s": RUN_TIMEOUT_S}


def box_setting(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in [s.name for s in STEPS] or not seconds.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SECONDS with STEP one of the steps")
    return name, float(seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the results (flat, at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with the tiny model")
    parser.add_argument(
        "--budget-s", type=float, help=f"seconds for the whole call (default {BUDGET_S}; dry run {DRY_BUDGET_S})"
    )
    parser.add_argument("--started-at", type=float, help="time.time() of the script's start (default: now)")
    parser.add_argument(
        "--steps", nargs="+", choices=[s.name for s in [*STEPS, OVERRUN]], default=[s.name for s in STEPS]
    )
    parser.add_argument(
        "--box", nargs="+", type=box_setting, default=[], metavar="STEP=SECONDS", help="set boxes by hand"
    )
    parser.add_argument("--budgets", nargs="+", default=BUDGETS, help="token budgets for phases and conversation")
    parser.add_argument("--commit", default=os.environ.get("GPU_CHECK_COMMIT"), help="the commit checked (from here)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the steps' scratch folder")
    parser.add_argument("--print-plan", action="store_true", help="print the plan and stop")
    parser.add_argument("--wheel-limit-s", type=float, default=0, help=argparse.SUPPRESS)  # for the plan's first line
    parser.add_argument("--list-wheels", action="store_true", help="print NAME==VERSION of the wheels to carry")
    parser.add_argument("--check-travel", type=Path, metavar="WHEEL_DIR", help="sizes of what a device call carries")
    parser.add_argument("--device-call", action="store_true", help="print the device call's run arguments (JSON)")
    parser.add_argument("--test-overrun", type=float, help=argparse.SUPPRESS)  # tests: a step outliving this box
    args = parser.parse_args(argv)
    args.box = dict(args.box)
    if args.test_overrun:
        args.box[OVERRUN.name] = args.test_overrun
    args.budget_s = args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    args.started_at = args.started_at or time.time()
    args.commit = args.commit or commit_here() or "unknown: pass GPU_CHECK_COMMIT"
    if not (args.list_wheels or args.check_travel or args.out or args.print_plan or args.device_call):
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_wheels:
        print("\n".join(wheel_pins()))
        return 0
    if args.check_travel:
        text, fits = travel_report(args.check_travel)
        print(text)
        return 0 if fits else 1
    if args.device_call:
        print(json.dumps(device_call(commit_here()), indent=1))
        return 0
    if args.print_plan:
        print_plan(args, chosen_steps(args), left_s(args) - args.wheel_limit_s)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
