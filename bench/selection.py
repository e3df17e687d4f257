"""The diversity methods' own cost (DivPrune, CDPruner) beside the vision tower's: this checkout's
selection functions and a baseline commit's, swapped in turn into the same model, side by side in one run.

    python -m bench.selection --baseline 8ad2ec4 --threads 1 --repeats 3 --warmup 1 --out benchmarks/selection

The wide preset's model (`bench.phases`: CLIP-L/14-336 at real width, LLaVA-NeXT-7B's projector, random
weights), one 672x672 image (5 tiles, 2,928 stock tokens), each method at the paper's "320".  One run of a
variant is one vision step, `get_image_features` under the method; `own ms` is that step less the tower's
and the projector's time, as `bench.phases` counts it (DivPrune's therefore holds the stock unpad/newline
packing it chooses from, which the full model pays too; `stock` shows that part alone, and `own beyond
stock` is DivPrune's own less stock's).  CDPruner's swap is its whole `reduce_tiles` and its CLIP side
(`ClipText.embed_text`, the question's text tower); the projector is timed apart in both rows.  Every
round runs every variant, in an order rotated each round; the first --warmup rounds are dropped, each
figure is the median of the rest.  `selection alone` then times just the selection functions
(DivPrune's greedy max-min, CDPruner's kernel and greedy MAP), variants interleaved, 3 x --repeats rounds
after one untimed, on the arguments they got in a vision step.  Every %tower divides by the tower's median
over all variants' rounds (the same work in each; on a shared CPU its time swings with the load).  The
baseline's functions are read from git (`git show COMMIT:path`), so the run needs the repository's
history, and a baseline file gets the baseline's own copy of the library modules in BASELINE_IMPORTS; the
run checks that both variants keep the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

import visionzip
from bench.phases import (
    DTYPES,
    Clock,
    load_subject,
    machine_description,
    markdown_table,
    mode_context,
    parse_budget,
    prepare_modes,
)

REPOSITORY = Path(__file__).resolve().parents[1]
# What is swapped for the baseline's, per method: the modules it chooses in and the functions of each
# ("Class.method" for a method of a class there).  SELECTED: what the selection alone runs, in the first module.
SWAPPED = {
    "divprune": {"visionzip/methods/divprune.py": ("divprune_select",)},
    "cdpruner": {
        "visionzip/methods/cdpruner.py": ("CDPruner.reduce_tiles",),  # its kernel and picks, whatever their names
        "visionzip/clip_text.py": ("ClipText.embed_text",),  # the CLIP side: the question's text tower
    },
}
SELECTED = {"divprune": "divprune_select", "cdpruner": "dpp_select"}
# The library modules a baseline's method file imports relatively that it gets in the baseline's version too
# (else an older divprune.py would run with this checkout's similarity.py)
BASELINE_IMPORTS = ("similarity",)
TABLE = [
    ("variant", "variant", "{}"),
    ("tower ms", "tower_ms", "{:.1f}"),
    ("projector ms", "projector_ms", "{:.1f}"),
    ("own ms", "own_ms", "{:.1f}"),
    ("own %tower", "own_pct_of_tower", "{:.2f}"),
    ("own beyond stock ms", "beyond_stock_ms", "{:.1f}"),
    ("beyond stock %tower", "beyond_stock_pct_of_tower", "{:.2f}"),
    ("selection alone ms", "selection_ms", "{:.1f}"),
    ("selection %tower", "selection_pct_of_tower", "{:.2f}"),
    ("same tokens as baseline", "same_choice", "{}"),
]


def baseline_functions(commit: str, path: str, names: tuple[str, ...]) -> dict[str, Callable]:
    """The named functions of `path` as it was at `commit`, loaded as a module of this package (its
    relative imports resolve here, but for BASELINE_IMPORTS, which are the commit's too)."""
    source = git_show(commit, path)
    package = ".".join(Path(path).parent.parts)
    dots = "." * (package.count(".") + 1)  # as the file imports a module of visionzip/: from ..similarity
    for name in BASELINE_IMPORTS:
        if f"from {dots}{name} import" in source:
            private = baseline_module(commit, f"visionzip/{name}.py", "visionzip").__name__.rpartition(".")[2]
            source = source.replace(f"from {dots}{name} import", f"from {dots}{private} import")
    module = baseline_module(commit, path, package, source)
    return {name: _attribute(module, name) for name in names}


def baseline_module(commit: str, path: str, package: str, source: str | None = None) -> types.ModuleType:
    """`path` at `commit` (or `source` given for it) as a module `_baseline_NAME` of `package`."""
    module = types.ModuleType(f"{package}._baseline_{Path(path).stem}")
    module.__package__ = package
    sys.modules[module.__name__] = module  # a dataclass in it looks its module up while being made
    exec(compile(source or git_show(commit, path), f"{commit}:{path}", "exec"), module.__dict__)
    return module


def git_show(commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    ).stdout


def baseline_selection(commit: str, method: str) -> Callable:
    """The baseline's selection alone, called as this checkout's SELECTED function: CDPruner before
    `dpp_select` existed is its `fast_greedy_map` of its `dpp_kernel`."""
    path = next(iter(SWAPPED[method]))
    try:
        return baseline_functions(commit, path, (SELECTED[method],))[SELECTED[method]]
    except AttributeError:
        if method != "cdpruner":
            raise
    old = baseline_functions(commit, path, ("dpp_kernel", "fast_greedy_map"))
    return lambda features, scores, steps: old["fast_greedy_map"](old["dpp_kernel"](features, scores), steps)


def _attribute(module: Any, name: str) -> Any:
    """`name` ("function" or "Class.method") of `module`."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _owner(module: Any, name: str) -> tuple[Any, str]:
    """The object holding `name` ("function" or "Class.method") in `module`, and the attribute's name."""
    *path, attribute = name.split(".")
    return _attribute(module, ".".join(path)) if path else module, attribute


@contextlib.contextmanager
def swapped(module: types.ModuleType, functions: dict[str, Callable]) -> Iterator[None]:
    """The method's module (or a class of it, for "Class.method" names) calls `functions` instead of its
    own inside the block."""
    own = {name: _attribute(module, name) for name in functions}
    for name, function in functions.items():
        setattr(*_owner(module, name), function)
    try:
        yield
    finally:
        for name, function in own.items():
            setattr(*_owner(module, name), function)


def _module(path: str) -> types.ModuleType:
    """This checkout's module of a file path, e.g. visionzip/clip_text.py -> visionzip.clip_text."""
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))  # clip_text: not yet imported


@dataclass
class Variant:
    name: str  # "stock", or "METHOD:320 (this checkout)" / "METHOD:320 (baseline COMMIT)"
    method: str | None
    functions: dict[str, dict[str, Callable]] | None  # per swapped file, the baseline's; None: this checkout's
    selection: Callable | None = None  # the baseline's selection alone (as SELECTED is called); None: this checkout's

    def select(self, *arguments: Any) -> torch.Tensor:
        if self.selection is not None:
            return self.selection(*arguments)
        return getattr(_module(next(iter(SWAPPED[self.method]))), SELECTED[self.method])(*arguments)


def variants(baseline: str) -> list[Variant]:
    rows = [Variant("stock", None, None)]
    for method, files in SWAPPED.items():
        functions = {path: baseline_functions(baseline, path, names) for path, names in files.items()}
        selection = baseline_selection(baseline, method)
        rows.append(Variant(f"{method}:320 (baseline {baseline})", method, functions, selection))
        rows.append(Variant(f"{method}:320 (this checkout)", method, None))
    return rows


def run_vision_step(subject: Any, inputs: dict, variant: Variant, clock: Clock) -> tuple[dict[str, float], list]:
    """One `get_image_features` under the variant: its phases (ms) and the tokens it kept, per tile."""
    base = subject.model.model
    marks: dict[str, Any] = {}

    def mark(name: str) -> Callable[..., None]:
        return lambda *args: marks.__setitem__(name, clock.now())

    hooks = [
        base.vision_tower.register_forward_pre_hook(mark("tower_start")),
        base.vision_tower.register_forward_hook(mark("tower_end")),
        base.multi_modal_projector.register_forward_pre_hook(mark("projector_start")),
        base.multi_modal_projector.register_forward_hook(mark("projector_end")),
    ]
    reduction = parse_budget(f"{variant.method}:320") if variant.method else None
    try:
        with torch.inference_mode(), mode_context(subject.model, subject.processor, reduction) as call:
            with contextlib.ExitStack() as swaps:
                for path, functions in (variant.functions or {}).items():
                    swaps.enter_context(swapped(_module(path), functions))
                start = clock.now()
                base.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
                end = clock.now()
            kept = [[tile.kept.tolist() for tile in image.tiles] for image in call.selection] if call else []
    finally:
        for hook in hooks:
            hook.remove()
    phases = {
        "vision_ms": clock.ms(start, end),
        "tower_ms": clock.ms(marks["tower_start"], marks["tower_end"]),
        "projector_ms": clock.ms(marks["projector_start"], marks["projector_end"]),
    }
    phases["own_ms"] = phases["vision_ms"] - phases["tower_ms"] - phases["projector_ms"]
    return phases, kept


def selection_arguments(subject: Any, inputs: dict, method: str, clock: Clock) -> tuple:
    """The arguments this checkout's selection function of `method` gets in one vision step."""
    path, name = next(iter(SWAPPED[method])), SELECTED[method]
    function, arguments = getattr(_module(path), name), []

    def record(*args: Any) -> Any:
        arguments.append(args)
        return function(*args)

    run_vision_step(subject, inputs, Variant("recording", method, {path: {name: record}}), clock)
    return arguments[-1]


def time_selections(subject: Any, inputs: dict, rows: list[Variant], clock: Clock, repeats: int) -> dict[str, list]:
    """Each method's selection alone, per variant, on the inputs a vision step gave it: `repeats` timed
    rounds after one untimed, variants interleaved.  Returns the ms of each round and the last output."""
    times: dict[str, list] = {row.name: [] for row in rows if row.method}
    outputs: dict[str, torch.Tensor] = {}
    arguments = {method: selection_arguments(subject, inputs, method, clock) for method in SWAPPED}
    for round_ in range(1 + repeats):
        for row in (row for row in rows if row.method):
            with torch.inference_mode():
                start = clock.now()
                outputs[row.name] = row.select(*arguments[row.method])
                end = clock.now()
            if round_:
                times[row.name].append(clock.ms(start, end))
    return {"times": times, "outputs": outputs}


def run(baseline: str, dtype: str, device: str, repeats: int, warmup: int, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]
    subject = load_subject("wide", torch_dtype, torch_device, 1, None)  # the LM is not run: one layer
    inputs = prepare_modes(subject, [], torch_device, torch_dtype)[0].inputs
    rows, clock = variants(baseline), Clock(torch_device)
    runs: dict[str, list[dict[str, float]]] = {row.name: [] for row in rows}
    choices: dict[str, list] = {}
    for round_ in range(warmup + repeats):
        shift = round_ % len(rows)
        for variant in rows[shift:] + rows[:shift]:
            phases, choices[variant.name] = run_vision_step(subject, inputs, variant, clock)
            if round_ >= warmup:
                runs[variant.name].append(phases)
    selections = time_selections(subject, inputs, rows, clock, 3 * repeats)
    table = []
    stock_own = statistics.median(run["own_ms"] for run in runs["stock"])
    # Every variant runs the same tower; on a shared CPU its time swings with the load, so every share is
    # of the median over all variants' rounds, not of the row's own few.
    tower = statistics.median(run["tower_ms"] for name in runs for run in runs[name])
    for row in rows:
        medians = {key: statistics.median(run[key] for run in runs[row.name]) for key in runs[row.name][0]}
        medians["own_pct_of_tower"] = 100 * medians["own_ms"] / tower
        if row.method == "divprune":  # its own cost holds the stock packing it chooses from; this is the rest
            medians["beyond_stock_ms"] = medians["own_ms"] - stock_own
            medians["beyond_stock_pct_of_tower"] = 100 * medians["beyond_stock_ms"] / tower
        baseline_name = f"{row.method}:320 (baseline {baseline})"
        same = "-"
        if row.method and not row.functions:  # both the kept tokens and the selection's own output
            same_output = torch.equal(selections["outputs"][row.name], selections["outputs"][baseline_name])
            same = str(choices[row.name] == choices[baseline_name] and same_output)
        if row.method:
            medians["selection_ms"] = statistics.median(selections["times"][row.name])
            medians["selection_pct_of_tower"] = 100 * medians["selection_ms"] / tower
        table.append({"variant": row.name, **medians, "same_choice": same})
    meta = {
        "machine": machine_description(torch_device),
        "model": subject.description,
        "dtype": dtype,
        "baseline": baseline,
        "repeats": repeats,
        "warmup": warmup,
        "tower ms, median of all rows (every %tower divides by it)": round(tower, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "visionzip": visionzip.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at the end": " ".join(f"{value:.2f}" for value in _load_average()),
    }
    return {"meta": meta, "rows": table, "runs": runs, "selection_runs": selections["times"]}


def _load_average() -> tuple[float, ...]:
    with contextlib.suppress(OSError):
        return tuple(float(value) for value in Path("/proc/loadavg").read_text().split()[:3])
    return ()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit whose selection functions are compared")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every variant)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    parser.add_argument("--out", type=Path, help="folder for the JSON result")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    results = run(args.baseline, args.dtype, args.device, args.repeats, args.warmup, args.threads)
    print("\n".join(f"- {key}: {value}" for key, value in results["meta"].items()))
    print()
    print(markdown_table(results["rows"], TABLE))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"selection-wide-{args.dtype}-{args.device}.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
