"""The GPU check: every CUDA path of this repository and its numbers on one GPU, in one prepared call.

    bash scripts/gpu_wheels.sh                        # here: the wheels the GPU machine lacks, into .whl/
    bash scripts/gpu_check.sh                         # there: installs them, then runs this with a time budget
    python -m bench.gpu_check --dry-run --out DIR     # anywhere: the same steps on the CPU, tiny model, seconds

The steps, in order, each in a process of its own (a CUDA fault, an out-of-memory or a hang in one cannot
stop the others, and each is killed at its time box), each recorded with its status:

    env           versions, the device, and the check's own imports against what the GPU machine has
    pytest        the tests that skip without CUDA (tests/test_gpu.py), with gradio unimportable
    phases        bench.phases on LLaVA-NeXT-7B shapes in bf16: full and every method at every budget
    conversation  bench.conversation: three turns through the app's turn code, full vs VisionZip
    registry      a 13B-shaped model loaded beside the 7B one through the app's registry and its memory policy

Into --out (flat, at most 8 files): gpu-check.json (everything), gpu-check.md (the tables), gpu-check.log
(the steps' output) and pytest-gpu.txt; scripts/gpu_check.sh adds gpu-check-console.txt. Both result files
are rewritten after every step, so a run cut short keeps what it finished.

This module imports only the standard library at the top: the parent process and `--list-wheels` stay
light, and only the step processes load torch.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gc
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
# Method name -> the bench.phases arguments that select it at the given budgets. A method added to the
# library (and to bench.phases) is benchmarked by adding a line here; each runs beside `full`.
# Every other registered method at the paper's 320 (tests/test_gpu_check.py checks the list against the registry).
OTHER_METHODS = ["visionzip_dominant", "random", "pool", "divprune", "vispruner", "fastv", "cdpruner"]
METHODS: dict[str, Callable[[list[str]], list[str]]] = {
    "visionzip": lambda budgets: ["--budgets", *budgets],
    "others": lambda budgets: ["--budgets", "320", *(f"{name}:320" for name in OTHER_METHODS)],
}
# LLaVA-NeXT-13B's language model (llava-v1.6-vicuna-13b): the tower and vocabulary are the 7B's.
SHAPE_13B = {
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "head_dim": 128,
}
DRY_13B = {  # the dry run's stand-in: the tiny model's LM widened by 5120 / 4096, one layer more
    "hidden_size": 160,
    "intermediate_size": 432,
    "num_hidden_layers": 3,
    "num_attention_heads": 5,
    "num_key_value_heads": 5,
    "head_dim": 32,
}
# bf16 bytes of the random 7B (7.06 B parameters) and 13B (13.35 B) checkpoints the steps write.
CHECKPOINT_BYTES = (7_063_431_168 + 13_351_499_776) * 2 + 2 * GIB


@dataclass(frozen=True)
class Step:
    name: str
    gpu_box_s: int  # time box on the GPU (scripts/gpu_check.sh gives the whole check 255 s)
    log: str = "gpu-check.log"  # the file in --out that takes its output


STEPS = [  # expected on an H200: about 10, 20, 40, 60 and 50 s (nothing measured there yet)
    Step("env", 30),
    Step("pytest", 45, log="pytest-gpu.txt"),
    Step("phases", 75),
    Step("conversation", 90),
    Step("registry", 90),
]
DRY_BOX_S = 60  # per step in a dry run; each takes a few seconds on 2 cores
RESULT_JSON, RESULT_MD = "gpu-check.json", "gpu-check.md"


def phases_argv(dry_run: bool) -> list[str]:
    """bench.phases arguments, less the method's (METHODS). On the GPU: real 7B shapes in bf16, 3 warm-up
    rounds (cuBLAS and SDPA pick their kernels on first use) and the median of 10; a round of every mode
    takes well under a second there."""
    if dry_run:
        return "--preset tiny --dtype float32 --device cpu --repeats 1 --warmup 0 --new-tokens 2".split()
    return "--preset wide --llm-layers 32 --dtype bfloat16 --device cuda --repeats 10 --warmup 3 --new-tokens 8".split()


def conversation_argv(dry_run: bool) -> list[str]:
    """bench.conversation arguments, less the budgets: three turns; on the GPU one warm-up conversation per
    budget (the app warms up per model and mode too) and the median of two."""
    if dry_run:
        return "--device cpu --dtype float32 --turns 3 --repeats 1 --warmup 0 --max-new-tokens 2".split()
    return "--wide 32 --dtype bfloat16 --device cuda --turns 3 --repeats 2 --warmup 1 --max-new-tokens 16".split()


# -- the app, through as few names as possible ------------------------------------------------------------
# app/ is being reshaped; this check reaches it only here and through bench.conversation (which owns the
# turn path). If ModelRegistry moves, change this function.
def app_registry(source: str, device: str, dtype: str) -> Any:
    """The app's model registry (labels, lazy loading, least-recently-used unloading on CUDA) with `source`
    as its default model. Used: .default, .choices, .get(label), .loaded(), .ready(label); a loaded model's
    .label and .weight_bytes."""
    from app.models import ModelRegistry

    return ModelRegistry(source, device=device, dtype=dtype)


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


# -- the parent: runs each step in its own process, under its time box ----------------------------------
def child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VISIONZIP_CACHE=str(cache),  # tiny and random-weight checkpoints, shared by the steps
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",  # a step killed at its time box still leaves its output in the log
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


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


def stop(process: subprocess.Popen) -> None:
    """End a step's process group (it was started in a session of its own): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(step: Step, args: argparse.Namespace, scratch: Path, cache: Path, box_s: float) -> dict[str, Any]:
    """Run one step in its own process with output to its log; returns its record."""
    command = [sys.executable, "-m", "bench.gpu_check", "--step", step.name, "--scratch", str(scratch)]
    command += ["--deadline", f"{time.time() + box_s:.1f}", "--budgets", *args.budgets, "--methods", *args.methods]
    command += ["--dry-run"] if args.dry_run else []
    (scratch / f"step-{step.name}.json").unlink(missing_ok=True)
    start = time.monotonic()
    with (args.out / step.log).open("a") as log:
        log.write(f"\n===== {step.name}: {' '.join(command[1:])} (time box {box_s:.0f} s) =====\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=REPO, env=child_env(cache), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code, timed_out = process.wait(timeout=box_s), False
        except subprocess.TimeoutExpired:
            stop(process)
            code, timed_out = process.returncode, True
    record = read_json(scratch / f"step-{step.name}.json")
    status = "timeout" if timed_out else record.get("status") or ("ok" if code == 0 else "failed")
    if status != "ok" and "error" not in record and not timed_out:
        record["error"] = f"exit status {code} without a result: see {step.log}"
    record.update(status=status, seconds=round(time.monotonic() - start, 1), time_box_s=round(box_s), exit=code)
    if timed_out:
        record["error"] = f"killed at its time box of {box_s:.0f} s; what it saved before is kept"
    return record


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return run.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    return None  # the device machine gets a copy of the working tree, maybe without .git


def orchestrate(args: argparse.Namespace) -> int:
    """Every chosen step in order, each under min(its box, the time left); results rewritten after each."""
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = choose_cache(args.dry_run, scratch)
    cache.mkdir(parents=True, exist_ok=True)
    meta = {
        "dry_run": args.dry_run,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "budget_s": args.budget_s,
        "commit": git_commit(),
        "host": platform.node(),
        "cache": str(cache),
        "budgets": args.budgets,
        "methods": args.methods,
        "phases_argv": phases_argv(args.dry_run),
        "conversation_argv": conversation_argv(args.dry_run),
    }
    results: dict[str, Any] = {"meta": meta, "steps": {}}
    for log in {step.log for step in STEPS}:
        (args.out / log).write_text("")  # the steps append to them
    try:
        for index, step in enumerate(STEPS):
            results["steps"][step.name] = record = run_in_budget(args, index, time.monotonic() - start, scratch, cache)
            meta["seconds"] = round(time.monotonic() - start, 1)
            write_results(results, args.out)
            print(f"[gpu-check] {step.name}: {record['status']} {record.get('seconds', 0)} s", flush=True)
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"[gpu-check] wrote {args.out / RESULT_JSON} and {args.out / RESULT_MD}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results["steps"].values()) else 1


def time_box(step: Step, dry_run: bool) -> int:
    return DRY_BOX_S if dry_run else step.gpu_box_s


def run_in_budget(args: argparse.Namespace, index: int, elapsed: float, scratch: Path, cache: Path) -> dict[str, Any]:
    """Step `index` under min(its time box, what the budget leaves once every later step is kept 20 s to
    start in: a step that hangs cannot starve the rest)."""
    step = STEPS[index]
    if step.name not in args.steps:
        return {"status": "skipped", "note": "not chosen (--steps)"}
    later = [s for s in STEPS[index + 1 :] if s.name in args.steps]
    left = args.budget_s - elapsed - 5 - sum(min(time_box(s, args.dry_run), 20) for s in later)  # 5 s: writing
    box = min(time_box(step, args.dry_run), left)
    if box < 15:
        return {"status": "no-time", "note": f"{max(left, 0):.0f} s of the budget left for it"}
    print(f"[gpu-check] {step.name}: up to {box:.0f} s", flush=True)
    return run_child(step, args, scratch, cache, box)


def write_results(results: dict[str, Any], out: Path) -> None:
    (out / RESULT_JSON).write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / RESULT_MD).write_text(markdown(results) + "\n")


def markdown(results: dict[str, Any]) -> str:
    """A status table of the steps, then each step's own tables."""
    meta = results["meta"]
    title = "GPU check, dry run (CPU, tiny model)" if meta["dry_run"] else "GPU check"
    lines = [f"# {title}", "", *(f"- {key}: {value}" for key, value in meta.items()), ""]
    lines += ["| step | status | seconds | time box s | note |", "|---|---|---|---|---|"]
    for name, record in results["steps"].items():
        note = record.get("error") or record.get("note") or ""
        note = note.strip().splitlines()[-1] if note.strip() else ""
        lines.append(
            f"| {name} | {record['status']} | {record.get('seconds', '-')} | {record.get('time_box_s', '-')} | {note} |"
        )
    for name, record in results["steps"].items():
        if record.get("markdown"):
            lines += ["", f"## {name}", "", record["markdown"]]
    return "\n".join(lines)


# -- a step's process --------------------------------------------------------------------------------------
@dataclass
class Context:
    dry_run: bool
    scratch: Path
    deadline: float  # time.time() at which the parent kills this step
    budgets: list[str]
    methods: list[str]
    name: str
    saved: dict[str, Any] = field(default_factory=dict)

    def save(self, **record: Any) -> None:
        """Record (part of) the step's result now: a step killed later keeps it."""
        self.saved.update(record)
        (self.scratch / f"step-{self.name}.json").write_text(json.dumps(self.saved, default=str) + "\n")

    def left_s(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


def run_step(args: argparse.Namespace) -> int:
    for name in BLOCKED:  # as on the GPU machine: `import gradio` raises ImportError
        sys.modules[name] = None  # type: ignore[assignment]
    context = Context(args.dry_run, args.scratch, args.deadline, args.budgets, args.methods, args.step)
    if os.environ.get("GPU_CHECK_STALL") == args.step:  # the tests' hang, to see the time box end it
        context.save(note="stalled on purpose (GPU_CHECK_STALL)")
        time.sleep(600)
    try:
        record = STEP_FUNCTIONS[args.step](context)
    except BaseException as error:  # recorded for the parent, which carries on with the next step
        traceback.print_exc()
        context.save(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        return 1
    context.save(**record)
    return 0


def free_memory() -> None:
    """Hand memory back between parts of a step, so the registry's free-memory reading is honest."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_memory(device: str) -> dict[str, float] | None:
    import torch

    if not device.startswith("cuda"):
        return None
    free, total = torch.cuda.mem_get_info()
    return {"free_gib": round(free / GIB, 2), "total_gib": round(total / GIB, 2)}


# -- step: env --------------------------------------------------------------------------------------------
def step_env(context: Context) -> dict[str, Any]:
    import torch

    data = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "packages": package_versions(),
        "carried_pins": carried_pins(),
        "imports": import_check(),
        "torch": torch_description(torch),
        "nvidia_smi": nvidia_smi(),
        "cache": {"path": os.environ.get("VISIONZIP_CACHE"), "free_gib": cache_free_gib()},
    }
    return {"data": data, "markdown": env_markdown(data)}


def package_versions() -> dict[str, str]:
    """Version and place of every package the check runs on ("missing" where absent)."""
    from importlib import metadata

    names = ["torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors", "numpy"]
    names += ["pillow", "av", "plotly", "narwhals", "regex", "pytest", "torchvision", "bitsandbytes", "gradio"]
    found = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
            found[name] = f"{dist.version} ({dist.locate_file('')})"
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def carried_pins() -> dict[str, Any]:
    """Whether the carried packages run at the versions requirements.txt pins (the wheels were installed)."""
    from importlib import metadata

    pins = pinned(list(CARRIED))
    report = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        report[name] = {"pinned": version, "installed": installed, "ok": installed == version}
    return report


def module_level_imports(path: Path) -> set[str]:
    """Top-level names a file imports when it is imported: not those inside functions (lazy, optional)
    nor inside a `try` that catches ImportError."""
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Try):
                optional = any("ImportError" in ast.unparse(handler.type or ast.Name("")) for handler in node.handlers)
                if not optional:
                    visit(node.body)
            elif isinstance(node, ast.If):
                visit(node.body + node.orelse)

    visit(ast.parse(path.read_text()).body)
    return names


def is_project_source(path: Path) -> bool:
    """A Python file of this repository (not of a virtual environment inside it). Relative paths are
    skipped: torch names some generated modules by a bare file name."""
    if not path.is_absolute() or path.suffix != ".py" or not path.is_file():
        return False
    parts = path.relative_to(REPO).parts if path.is_relative_to(REPO) else ()
    return bool(parts) and not parts[0].startswith(".") and "site-packages" not in parts


def import_check() -> dict[str, Any]:
    """Import what the steps import, read the module-level imports of every file of this repository that
    got loaded, and name the distributions among them that the GPU machine lacks and no wheel carries;
    likewise for what the carried wheels require (markers for its Python)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    sys.path.insert(0, str(REPO / "tests"))
    for module in ("bench.phases", "bench.conversation", *(Path(test).stem for test in CUDA_TESTS)):
        importlib.import_module(module)
    files = {Path(module.__file__) for module in list(sys.modules.values()) if getattr(module, "__file__", None)}
    ours = sorted(path for path in files if is_project_source(path))
    own = {path.stem for path in ours} | {path.parent.name for path in ours}  # app, bench, conftest, ...
    top = set().union(*(module_level_imports(path) for path in ours)) - set(sys.stdlib_module_names) - own
    distributions = metadata.packages_distributions()
    direct = sorted({normalize(dist) for name in top for dist in distributions.get(name, [])})
    present = GPU_PACKAGES | set(CARRIED)
    needs = []
    for name in CARRIED:
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({**GPU_PYTHON, "extra": ""}):
                needs.append(requirement)
    return {
        "project_files_loaded": len(ours),
        "direct": direct,
        "missing_on_gpu": [name for name in direct if name not in present],
        "carried_requires": [str(r) for r in needs],
        "carried_requires_missing_on_gpu": sorted({r.name for r in needs if normalize(r.name) not in present}),
        "carried_requires_known_too_old": [
            f"{r} (there: {GPU_VERSIONS[normalize(r.name)]})"
            for r in needs
            if normalize(r.name) in GPU_VERSIONS
            and normalize(r.name) not in CARRIED
            and not r.specifier.contains(GPU_VERSIONS[normalize(r.name)], prereleases=True)
        ],
    }


def torch_description(torch: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda}
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(
            device=torch.cuda.get_device_name(0),
            devices=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            multiprocessors=props.multi_processor_count,
            total_gib=round(total / GIB, 1),
            free_gib=round(free / GIB, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,memory.total,memory.used,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
        return (done.stdout or done.stderr).strip()
    return None


def cache_free_gib() -> float | None:
    cache = os.environ.get("VISIONZIP_CACHE")
    return round(shutil.disk_usage(cache).free / GIB, 1) if cache and os.path.isdir(cache) else None


def env_markdown(data: dict[str, Any]) -> str:
    t = data["torch"]
    device = f"{t['device']} ({t['total_gib']} GiB, {t['free_gib']} free)" if t["cuda_available"] else "no CUDA"
    imports = data["imports"]
    rows = [
        ("python", f"{data['python']} ({data['executable']})"),
        ("torch", f"{t['version']} (CUDA {t['cuda']})"),
        ("device", device),
        ("nvidia-smi", (data["nvidia_smi"] or "-").replace("\n", "<br>")),
        *((name, version) for name, version in data["packages"].items() if name != "torch"),
        (
            "carried at their pins",
            ", ".join(f"{n} {'yes' if p['ok'] else 'NO'}" for n, p in data["carried_pins"].items()),
        ),
        ("imports the GPU machine lacks", ", ".join(imports["missing_on_gpu"]) or "none"),
        ("carried wheels' needs it lacks", ", ".join(imports["carried_requires_missing_on_gpu"]) or "none"),
        ("needs known too old there", ", ".join(imports["carried_requires_known_too_old"]) or "none"),
        ("cache", f"{data['cache']['path']} ({data['cache']['free_gib']} GiB free)"),
    ]
    return "\n".join(["| what | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


# -- step: pytest -------------------------------------------------------------------------------------------
def step_pytest(context: Context) -> dict[str, Any]:
    """The CUDA tests, in this process (gradio blocked), output to pytest-gpu.txt, outcomes from JUnit XML.
    In a dry run the same files run: the CUDA tests skip with pytest's reason, which the record keeps."""
    import pytest

    report = context.scratch / "pytest.xml"
    argv = ["-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={report}", *CUDA_TESTS]
    print("python -m pytest", " ".join(argv), flush=True)
    code = int(pytest.main(argv))
    tests = junit_outcomes(report)
    counts = {
        outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "error", "skipped")
    }
    note = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n)
    if context.dry_run:
        note += "; dry run: the CUDA tests skip on the CPU (reasons in the table)"
    status = "ok" if code == 0 else "failed"
    table = ["| test | outcome | seconds | message |", "|---|---|---|---|"]
    table += [f"| {t['name']} | {t['outcome']} | {t['seconds']} | {t['message']} |" for t in tests]
    return {
        "status": status,
        "note": note,
        "data": {"exit": code, "counts": counts, "tests": tests},
        "markdown": "\n".join(table),
    }


def junit_outcomes(path: Path) -> list[dict[str, Any]]:
    import xml.etree.ElementTree as ElementTree

    if not path.exists():
        return []
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": case.get("time"), "message": message})
    return tests


# -- step: phases ---------------------------------------------------------------------------------------------
def step_phases(context: Context) -> dict[str, Any]:
    """bench.phases once per method (each beside `full`), through its command-line entry."""
    from bench import phases

    runs: dict[str, Any] = {}
    sections = []
    for method in context.methods:
        folder = context.scratch / f"phases-{method}"
        argv = phases_argv(context.dry_run) + METHODS[method](context.budgets) + ["--out", str(folder)]
        print("python -m bench.phases", " ".join(argv), flush=True)
        if phases.main(argv) != 0:
            raise RuntimeError(f"bench.phases {method} exited with failure")
        (path,) = [p for p in folder.glob("*.json")]
        results = json.loads(path.read_text())
        runs[method] = {"argv": argv, "results": results, "targets_issue16": issue16_targets(results)}
        sections.append(f"### {method}\n\n{phases.report(results)}\n\n{targets_markdown(runs[method])}")
        context.save(data=runs, markdown="\n\n".join(sections))  # a later method may run out of time
        free_memory()
    return {"data": runs, "markdown": "\n\n".join(sections)}


def issue16_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's targets for the smallest budget (set for the H200 at 7B shape; read, never asserted)."""
    full, small = results["rows"][0], [row for row in results["rows"] if row["mode"].isdigit()][-1]  # VisionZip's
    vision = {entry["approach"]: entry for entry in results["vision"]}
    stock_peak, ours_peak = vision["stock"]["vision_peak_mib"], vision["visionzip"]["vision_peak_mib"]
    checks = [
        (f"TTFT speed-up full/{small['mode']} / its FLOP bound", small["ttft_speedup_vs_bound"], ">=", 0.9),
        (f"LM prefill speed-up full/{small['mode']}", small["prefill_speedup"], ">=", 12.0),
        (f"method's own time at {small['mode']}, % of the tower", small.get("visionzip_pct_of_tower"), "<=", 1.0),
        (
            f"vision-phase peak at {small['mode']} / stock's",
            None if not stock_peak or ours_peak is None else ours_peak / stock_peak,
            "<=",
            1.0,
        ),
    ]
    compare = {">=": float.__ge__, "<=": float.__le__}
    return [
        {
            "target": name,
            "value": value,
            "goal": f"{op} {goal}",
            "met": None if value is None else compare[op](float(value), goal),
            "full_value_for_context": full["mode"],
        }
        for name, value, op, goal in checks
    ]


def targets_markdown(run: dict[str, Any]) -> str:
    lines = ["| issue 16 target | value | goal | met |", "|---|---|---|---|"]
    for t in run["targets_issue16"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines)


# -- step: conversation -------------------------------------------------------------------------------------
def step_conversation(context: Context) -> dict[str, Any]:
    """bench.conversation through its command-line entry: the app's registry loads the model (on the GPU
    a random 7B-shaped checkpoint that the benchmark writes once into the cache folder), then three-turn
    conversations run through the app's turn code, full on one side and VisionZip on the other."""
    from bench import conversation

    folder = context.scratch / "conversation"
    budgets = [min(context.budgets, key=int)] if context.dry_run else context.budgets  # the dry run: one, for time
    argv = conversation_argv(context.dry_run) + ["--budgets", *budgets, "--out", str(folder)]
    print("python -m bench.conversation", " ".join(argv), flush=True)
    started = time.monotonic()
    conversation.main(argv)
    (path,) = folder.glob("*.json")
    report = json.loads(path.read_text())
    meta = "\n".join(f"- {key}: {value}" for key, value in report["meta"].items())
    note = f"{time.monotonic() - started:.0f} s in bench.conversation, the checkpoint's build and load included"
    return {
        "note": note,
        "data": {"argv": argv, "report": report},
        "markdown": f"{meta}\n\n{conversation.markdown(report['rows'])}",
    }


# -- step: registry -------------------------------------------------------------------------------------------
def step_registry(context: Context) -> dict[str, Any]:
    """The 7B-shaped and a 13B-shaped model through the app's registry: first side by side (what does it
    keep?), then, on CUDA, with memory taken so that the 13B fits only once the 7B is unloaded."""
    dtype = "float32" if context.dry_run else "bfloat16"
    small = seven_b(context, dtype)
    big, big_note = thirteen_b(context, dtype)
    data: dict[str, Any] = {"checkpoints": {"7b": str(small), "13b": str(big)}, "13b": big_note}
    data["side_by_side"] = side_by_side(context, small, big, dtype)
    context.save(data=data)
    free_memory()
    data["after_release"] = gpu_memory(context.device)
    if context.dry_run:
        data["tight"] = {"skipped": "the registry makes room only on CUDA (its policy reads torch.cuda.mem_get_info)"}
    elif context.left_s() < 45:
        data["tight"] = {"skipped": f"{context.left_s():.0f} s left in the step's time box: needs two more loads"}
    else:
        data["tight"] = tight_memory(context, small, big, dtype)
    return {"note": big_note, "data": data, "markdown": registry_markdown(data)}


def seven_b(context: Context, dtype: str) -> Path:
    """The 7B-shaped checkpoint the conversation step wrote (built now if it did not); the tiny one in a dry run."""
    if context.dry_run:
        from visionzip.tiny import tiny_checkpoint

        return tiny_checkpoint("llava_next")
    import torch

    from bench.conversation import wide_checkpoint

    path = wide_checkpoint(32, dtype, torch.device("cuda"))
    free_memory()
    return path


def thirteen_b(context: Context, dtype: str) -> tuple[Path, str]:
    """A random-weight LLaVA-NeXT with LLaVA-NeXT-13B's language model (the dry run: DRY_13B), written
    once into the cache folder. Layers are trimmed only when the folder lacks room for all 40."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from bench.phases import build_wide
    from visionzip.tiny import cache_folder, tiny_checkpoint

    shape = dict(DRY_13B if context.dry_run else SHAPE_13B)
    if context.dry_run:
        tiny = tiny_checkpoint("llava_next")
        base, processor = AutoConfig.from_pretrained(tiny), AutoProcessor.from_pretrained(tiny)
    else:
        shell, processor = build_wide(1, getattr(torch, dtype), torch.device("meta"))  # configs only, no memory
        base = shell.config
    wanted, folder = shape["num_hidden_layers"], cache_folder()
    path = folder / f"shape13b-llava_next-{wanted}L-{dtype}"
    if not (path / "config.json").exists():  # not written by an earlier run on this machine
        shape["num_hidden_layers"] = layers_that_fit(base, shape, getattr(torch, dtype), folder)
        path = folder / f"shape13b-llava_next-{shape['num_hidden_layers']}L-{dtype}"
        if not (path / "config.json").exists():
            write_shaped(base, shape, processor, getattr(torch, dtype), torch.device(context.device), path)
    layers = shape["num_hidden_layers"]
    note = f"13B-shaped LM: {layers} of {wanted} layers" + (
        "" if layers == wanted else " (the cache folder lacked room)"
    )
    return path, note


def shaped_config(base: Any, shape: dict[str, int]) -> Any:
    config = copy.deepcopy(base)
    for key, value in shape.items():
        setattr(config.text_config, key, value)
    return config


def layers_that_fit(base: Any, shape: dict[str, int], dtype: Any, folder: Path) -> int:
    """The most LM layers (up to the shape's) whose checkpoint fits the folder's free space less 2 GiB."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    sizes = []
    for layers in (1, 2):  # counted on the meta device: no memory, no time
        with torch.device("meta"):
            shell = LlavaNextForConditionalGeneration._from_config(
                shaped_config(base, {**shape, "num_hidden_layers": layers})
            )
        sizes.append(sum(p.numel() for p in shell.parameters()) * dtype.itemsize)
    per_layer, fixed = sizes[1] - sizes[0], 2 * sizes[0] - sizes[1]
    room = shutil.disk_usage(folder).free - 2 * GIB - fixed
    if room < per_layer:
        raise RuntimeError(f"{folder} has no room for even one layer of the 13B-shaped model")
    return int(min(shape["num_hidden_layers"], room // per_layer))


def write_shaped(base: Any, shape: dict[str, int], processor: Any, dtype: Any, device: Any, path: Path) -> None:
    """Build the model on `device` (random init there is fast) and save it; renamed when complete."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(
            shaped_config(base, shape), dtype=dtype, attn_implementation="sdpa"
        )
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    del model
    free_memory()
    partial.rename(path)


def snapshot(registry: Any, action: str, seconds: float, device: str) -> dict[str, Any]:
    return {
        "action": action,
        "seconds": round(seconds, 2),
        "kept": [model.label for model in registry.loaded()],
        "weights_gib": {model.label: round(model.weight_bytes / GIB, 2) for model in registry.loaded()},
        "gpu": gpu_memory(device),
    }


def side_by_side(context: Context, small: Path, big: Path, dtype: str) -> list[dict[str, Any]]:
    """Load the 7B-shaped model, then the 13B-shaped one, and record what the registry kept after each."""
    registry = app_registry(str(small), context.device, dtype)
    registry.choices[big.name] = str(big)
    events = []
    for label in (registry.default, big.name):
        started = time.perf_counter()
        registry.get(label)
        events.append(snapshot(registry, f"load {label}", time.perf_counter() - started, context.device))
        context.save(data={"side_by_side": events})
    return events


def tight_memory(context: Context, small: Path, big: Path, dtype: str) -> dict[str, Any]:
    """The same two loads with ballast on the GPU, sized so that the 13B fits the registry's rule (free >=
    1.2 x weights) only once the 7B is gone: the policy must unload the 7B, and the page's GPU task then
    hears why it is gone."""
    import torch

    registry = app_registry(str(small), context.device, dtype)
    registry.choices[big.name] = str(big)
    small_bytes = registry.get(registry.default).weight_bytes  # no reference kept: unloading must free it
    need = sum(part.stat().st_size for part in big.glob("*.safetensors"))
    free, _ = torch.cuda.mem_get_info()
    ballast_bytes = int(free - 1.2 * need + small_bytes / 2)
    if ballast_bytes <= 0:
        return {"skipped": f"the GPU is too small to stage this: {free / GIB:.1f} GiB free with the 7B loaded"}
    ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda")
    events = [snapshot(registry, f"ballast {ballast_bytes / GIB:.1f} GiB", 0.0, context.device)]
    started = time.perf_counter()
    registry.get(big.name)
    events.append(snapshot(registry, f"load {big.name}", time.perf_counter() - started, context.device))
    try:
        registry.ready(registry.default)
        told = "the 7B still answers (it was not unloaded)"
    except Exception as error:  # the app's ModelLoadError: what the page would show
        told = str(error)
    del ballast
    return {
        "events": events,
        "expected_kept": [big.name],
        "as_expected": events[-1]["kept"] == [big.name],
        "7b_told": told,
    }


def registry_markdown(data: dict[str, Any]) -> str:
    lines = [f"- {data['13b']}", "", "| scenario | action | seconds | kept | GPU free GiB |", "|---|---|---|---|---|"]
    scenarios = [("side by side", data["side_by_side"]), ("tight memory", data["tight"].get("events", []))]
    for scenario, events in scenarios:
        for e in events:
            free = e["gpu"]["free_gib"] if e["gpu"] else "-"
            lines.append(f"| {scenario} | {e['action']} | {e['seconds']} | {', '.join(e['kept'])} | {free} |")
    tight = data["tight"]
    lines += [
        "",
        f"- tight memory: {tight.get('skipped') or ('as expected' if tight['as_expected'] else 'NOT as expected')}",
    ]
    if "7b_told" in tight:
        lines.append(f"- asking for the unloaded 7B then says: {tight['7b_told']}")
    return "\n".join(lines)


STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "env": step_env,
    "pytest": step_pytest,
    "phases": step_phases,
    "conversation": step_conversation,
    "registry": step_registry,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the results (flat, at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with the tiny model")
    parser.add_argument("--budget-s", type=float, default=255, help="wall-clock budget of all steps (default 255)")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], default=[s.name for s in STEPS])
    parser.add_argument("--budgets", nargs="+", default=BUDGETS, help="token budgets for phases and conversation")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--keep-scratch", action="store_true", help="keep the steps' scratch folder")
    parser.add_argument("--list-wheels", action="store_true", help="print NAME==VERSION of the wheels to carry")
    parser.add_argument("--check-travel", type=Path, metavar="WHEEL_DIR", help="sizes of what a device call carries")
    parser.add_argument("--step", choices=list(STEP_FUNCTIONS), help=argparse.SUPPRESS)  # one step's process
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.step or args.list_wheels or args.check_travel or args.out):
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
    if args.step:
        return run_step(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
