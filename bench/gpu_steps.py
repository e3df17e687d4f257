"""The GPU check's steps, each run in a process of its own by the parent (bench.gpu_check):

    python -m bench.gpu_steps --step NAME --scratch DIR --deadline EPOCH [--dry-run] [--budgets ...]

A step's process refuses network connections beyond this machine (the GPU machine has none, and a dry run
that passes here shows nothing tries), makes gradio unimportable (it is not there), and ends its own
process group at its deadline should the parent be gone. Each step saves what it has as it goes
(Context.save), so a step ended at its box keeps what it finished. The measuring steps (phases, others,
correct) live in bench.gpu_measure.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_check import (
    BLOCKED,
    CARRIED,
    CUDA_TESTS,
    GPU_PACKAGES,
    GPU_PYTHON,
    GPU_VERSIONS,
    REPO,
    normalize,
    pinned,
)
from bench.gpu_measure import free_memory, gpu_memory, model_checkpoint
from bench.gpu_plan import CONVERSATION_NEW_TOKENS, OVERRUN, STEPS, Context

GIB = 2**30
WATCHDOG_GRACE_S = 3  # after its deadline a step ends its own group, in case the parent could not

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


def recording_name(dry_run: bool) -> str:
    """The conversation step's recording, as it lands in $OUT (one of the 8 files a device call returns)."""
    return "gpu-check-dry-run.vzrec.json" if dry_run else "h200-7b-shape.vzrec.json"


def conversation_argv(dry_run: bool) -> list[str]:
    """bench.conversation arguments, less the budgets: three turns; on the GPU one warm-up conversation per
    budget (the app warms up per model and mode too) and one measured, CONVERSATION_NEW_TOKENS per answer."""
    if dry_run:
        return "--device cpu --dtype float32 --turns 3 --repeats 1 --warmup 0 --max-new-tokens 2".split()
    argv = "--wide 32 --dtype bfloat16 --device cuda --turns 3 --repeats 1 --warmup 1 --max-new-tokens".split()
    return [*argv, str(CONVERSATION_NEW_TOKENS)]


# -- the app, through as few names as possible ------------------------------------------------------------
# app/ is being reshaped; this check reaches it only here and through bench.conversation (which owns the
# turn path). If ModelRegistry moves, change this function.
def app_registry(source: str, device: str, dtype: str) -> Any:
    """The app's model registry (labels, lazy loading, least-recently-used unloading on CUDA) with `source`
    as its default model. Used: .default, .choices, .get(label), .loaded(), .ready(label); a loaded model's
    .label and .weight_bytes."""
    from app.models import ModelRegistry

    return ModelRegistry(source, device=device, dtype=dtype)


# -- the step's process: guards, then the step ---------------------------------------------------------------
def refuse_network() -> None:
    """Connections beyond this machine raise: the GPU machine has no network, and the dry run must show that
    nothing in the check tries to reach one (a hub download, telemetry)."""
    local = ("127.0.0.1", "::1", "localhost")

    def guarded(original: Callable) -> Callable:
        def connect(self: socket.socket, address: Any, *args: Any) -> Any:
            if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
                raise OSError(f"the GPU check allows no network: a connection to {address[0]} was refused")
            return original(self, address, *args)

        return connect

    socket.socket.connect = guarded(socket.socket.connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded(socket.socket.connect_ex)  # type: ignore[method-assign]


def watch_deadline(deadline: float) -> None:
    """End this step's whole process group at its deadline (plus a grace) even if the parent is gone; and
    end this process if the parent dies (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    timer = threading.Timer(
        max(deadline - time.time(), 0) + WATCHDOG_GRACE_S, os.killpg, (os.getpgrp(), signal.SIGKILL)
    )
    timer.daemon = True
    timer.start()


def run_step(args: argparse.Namespace) -> int:
    for name in BLOCKED:  # as on the GPU machine: `import gradio` raises ImportError
        sys.modules[name] = None  # type: ignore[assignment]
    refuse_network()
    watch_deadline(args.deadline)
    context = Context(args.dry_run, args.scratch, args.deadline, args.budgets, args.step)
    try:
        record = step_functions()[args.step](context)
    except BaseException as error:  # recorded for the parent, which carries on with the next step
        traceback.print_exc()
        context.save(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        return 1
    context.save(**record)
    return 0


def step_functions() -> dict[str, Callable[[Context], dict[str, Any]]]:
    from bench import gpu_measure

    return {
        "env": step_env,
        "pytest": step_pytest,
        "phases": gpu_measure.step_phases,
        "others": gpu_measure.step_others,
        "families": gpu_measure.step_families,
        "correct": gpu_measure.step_correct,
        "conversation": step_conversation,
        "registry": step_registry,
        OVERRUN.name: step_overrun,
    }


def step_overrun(context: Context) -> dict[str, Any]:
    """Test only: start a child that sleeps, record its pid, then outlive the box. The parent must end both."""
    child = subprocess.Popen(["sleep", "600"])
    context.save(data={"child_pid": child.pid, "pid": os.getpid()}, note="sleeps past its box on purpose")
    print(f"overrun: child pid {child.pid}", flush=True)
    time.sleep(600)
    return {}


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
        "image_processor": image_processor_check(),
        "network": "refused beyond this machine (bench.gpu_steps.refuse_network); HF_HUB_OFFLINE=1",
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
    for module in (
        "bench.phases",
        "bench.conversation",
        "bench.gpu_measure",
        *(Path(test).stem for test in CUDA_TESTS),
    ):
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
        ("image processor", processor_line(data["image_processor"])),
        ("network", data["network"]),
    ]
    return "\n".join(["| what | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def image_processor_check() -> dict[str, Any]:
    """Which image processor AutoProcessor picks (with torchvision present, transformers takes the fast,
    torchvision one: every processor call on the GPU machine takes that path), and how far its pixel values
    are from the slow one's on the benchmark image."""
    from transformers import AutoProcessor

    from bench.phases import bench_image
    from visionzip.tiny import tiny_checkpoint

    path = tiny_checkpoint("llava_next")
    chosen = AutoProcessor.from_pretrained(path).image_processor
    report: dict[str, Any] = {
        "class": type(chosen).__name__,
        "torchvision": importlib.util.find_spec("torchvision") is not None,
    }
    try:
        slow = AutoProcessor.from_pretrained(path, use_fast=False).image_processor
        pixels = [p(bench_image(), return_tensors="pt")["pixel_values"].float() for p in (chosen, slow)]
        report["slow_class"] = type(slow).__name__
        report["max_abs_diff_vs_slow"] = float((pixels[0] - pixels[1]).abs().max())
    except Exception as error:  # recorded: the comparison is a side note, the class is the answer
        report["slow_error"] = f"{type(error).__name__}: {error}"
    return report


def processor_line(report: dict[str, Any]) -> str:
    line = f"{report['class']} (torchvision {'there' if report['torchvision'] else 'absent'})"
    if "max_abs_diff_vs_slow" in report:
        line += f"; pixel values vs {report['slow_class']}: max |diff| {report['max_abs_diff_vs_slow']:.2g}"
    return line + (f"; slow one: {report['slow_error']}" if "slow_error" in report else "")


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


# -- step: conversation -------------------------------------------------------------------------------------
def step_conversation(context: Context) -> dict[str, Any]:
    """bench.conversation through its command-line entry: the app's registry loads the model (on the GPU
    a random 7B-shaped checkpoint that the benchmark writes once into the cache folder), then three-turn
    conversations run through the app's turn code, full on one side and VisionZip on the other."""
    from bench import conversation

    folder = context.scratch / "conversation"
    budgets = [min(context.budgets, key=int)] if context.dry_run else context.budgets  # the dry run: one, for time
    argv = conversation_argv(context.dry_run) + ["--budgets", *budgets, "--out", str(folder)]
    # A recording a speaker can replay on a laptop (app/recording.py); the parent copies it into $OUT.
    recording = context.scratch / recording_name(context.dry_run)
    argv += ["--record", str(recording), "--record-media", "assets/house_and_car.png"]
    argv += ["--record-where", "scripts/gpu_check.sh (the prepared GPU check), 7B-shaped random weights"]
    print("python -m bench.conversation", " ".join(argv), flush=True)
    started = time.monotonic()
    conversation.main(argv)
    (path,) = folder.glob("*.json")
    report = json.loads(path.read_text())
    meta = "\n".join(f"- {key}: {value}" for key, value in report["meta"].items())
    note = f"{time.monotonic() - started:.0f} s in bench.conversation, the checkpoint's build and load included"
    return {
        "note": note,
        "data": {"argv": argv, "report": report, "recording": recording.name},
        "markdown": f"{meta}\n\n{conversation.markdown(report['rows'])}",
    }


# -- step: registry -------------------------------------------------------------------------------------------
def step_registry(context: Context) -> dict[str, Any]:
    """The 7B-shaped and a 13B-shaped model through the app's registry: first side by side (what does it
    keep?), then, on CUDA, with memory taken so that the 13B fits only once the 7B is unloaded."""
    dtype = "float32" if context.dry_run else "bfloat16"
    small = model_checkpoint(context.dry_run)
    big, big_note = thirteen_b(context, dtype)
    data: dict[str, Any] = {"checkpoints": {"7b": str(small), "13b": str(big)}, "13b": big_note}
    data["side_by_side"] = side_by_side(context, small, big, dtype)
    context.save(data=data)
    free_memory()
    data["after_release"] = gpu_memory(context.device)
    if context.dry_run:
        data["tight"] = {"skipped": "the registry makes room only on CUDA (its policy reads torch.cuda.mem_get_info)"}
    elif context.left_s() < (need := tight_memory_need_s(data["side_by_side"])):
        left = context.left_s()
        data["tight"] = {"skipped": f"{left:.0f} s left in the step's box; the two loads need about {need:.0f} s"}
    else:
        data["tight"] = tight_memory(context, small, big, dtype)
    return {"note": big_note, "data": data, "markdown": registry_markdown(data)}


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


def tight_memory_need_s(loads: list[dict[str, Any]]) -> float:
    """Time the tight-memory scenario needs, from the two loads just measured: it loads both again (the
    7B, then the 13B after unloading it), 1.3 times as long to be safe, and 10 s for the ballast."""
    return 1.3 * sum(event["seconds"] for event in loads) + 10


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--step", required=True, choices=[s.name for s in [*STEPS, OVERRUN]])
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="time.time() at which the parent ends it")
    parser.add_argument("--budgets", nargs="+", default=["640", "320", "160"])
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_step(parse_args(None)))
