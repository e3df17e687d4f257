"""The GPU check's plan: its steps, what each costs, and the time box each gets out of the budget.

Standard library only: the check's parent process (bench.gpu_check) and the plan it prints first stay light.

A step's box is not a constant. Each step counts its work on the GPU (`Work`: imports, checkpoint bytes
written and loaded, layer calls the host must issue, bf16 FLOPs) and turns it into seconds with the rates
below; in a dry run the estimate is what the step took in a CPU dry run. When a step starts, the seconds
left in the budget are shared among it and the steps still to come in proportion to their estimates: if
every step uses its whole box, each gets exactly the box the plan printed; a step that ends early hands
its spare time to the later ones. `--box STEP=SECONDS` sets a step's box by hand (a narrowed rerun).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- rates on the H200 (nvidia-h200; the device notes' KINDS.md, read 2026-11-17) -------------------------
TFLOPS_BF16 = 300.0  # effective: 38 % of the 790 TFLOP/s an 8192^3 bf16 product reached there (HF layers, ~3k tokens)
HOST_S_PER_LAYER = 1.0e-3  # one decoder/encoder layer call issued from Python: the CPU dry run's tiny
#   model takes 0.7-1.4 ms per LM layer per decode step (bench.phases decode_ms_per_token / 4 layers, 2 cores),
#   which is host work alone; kernel launches there (about 12 per layer, under 10 us each) add little
WRITE_GBPS = 1.0  # a random checkpoint built on the GPU, copied to the host and saved into /dev/shm
BUILD_GBPS = 5.0  # a random model initialised on the GPU and kept there (no host copy): not measured yet, a
#   guess well under the device's bandwidth (the Python side of transformers' per-module init dominates)
LOAD_GBPS = 2.0  # a checkpoint read from /dev/shm onto the GPU by from_pretrained
IMPORT_S = 8.0  # a step process: python, torch, transformers, the project (compiled .pyc there)
FIRST_IMPORT_S = 15.0  # the first one also compiles what `pip install --no-compile` left (the env step)
SAFETY = 1.15  # the default plan leaves at least this multiple of every estimate with the wheel install at its
#   60 s limit (a test checks); it takes about 15 s, which leaves about 1.3 times every estimate

# -- the work, counted on LLaVA-NeXT-7B's shape (bench.phases.build_wide, 32 LM layers) --------------------
# TFLOP of one forward on the 672x672 image, from bench.phases' tower_flops and prefill_flops (a test
# recomputes them): the tower on 5 tiles, and the LM prefill at each mode's context length.
TOWER_TFLOP = 1.910
PREFILL_TFLOP = {"full": 40.94, "640": 9.102, "320": 4.868, "160": 2.771, "fastv:320": 7.118}
GB_7B, GB_13B, GB_CLIP = 14.1, 26.7, 0.9  # bf16 checkpoints: 7.06 B and 13.35 B parameters; random CLIP-L
TOWER_LAYERS, LM_LAYERS = 24, 32
OTHERS = ["visionzip_dominant", "random", "pool", "divprune", "vispruner", "fastv", "cdpruner"]


@dataclass(frozen=True)
class Shape:
    """A 7B-shaped model's work on the 672x672 image, from bench.phases' FLOP counts (a test recomputes them)."""

    tower_tflop: float
    prefill_tflop: dict[str, float]  # mode -> LM prefill TFLOP at its context length
    tower_layers: int
    lm_layers: int
    gb: float  # bf16 weights


LLAVA_NEXT_7B = Shape(TOWER_TFLOP, PREFILL_TFLOP, TOWER_LAYERS, LM_LAYERS, GB_7B)
# The families step: random models of Qwen2.5-VL-7B's and llava-onevision-qwen2-7b's configs (bench.phases
# build_wide_qwen / build_wide_onevision, 28 LM layers; Qwen with the tiny checkpoint's vocabulary), built
# on the GPU. The other methods run at the middle budget; CDPruner refuses both (the step asks the library).
FAMILY_SHAPES = {
    "qwen2_5_vl": Shape(
        3.040, {"full": 8.089, "256": 3.854, "128": 2.172, "64": 1.333, "fastv:128": 2.595}, 32, 28, 14.4
    ),
    "llava_onevision": Shape(
        3.209, {"full": 51.39, "640": 8.769, "320": 4.527, "160": 2.422, "fastv:320": 7.875}, 26, 28, 16.1
    ),
}
FAMILY_OTHERS = [name for name in OTHERS if name != "cdpruner"]


@dataclass(frozen=True)
class Rounds:
    """How long a bench.phases run on the GPU is: untimed rounds, timed rounds (the median), decode tokens."""

    warmup: int
    repeats: int
    new_tokens: int

    @property
    def total(self) -> int:
        return self.warmup + self.repeats

    def argv(self) -> list[str]:
        return ["--warmup", str(self.warmup), "--repeats", str(self.repeats), "--new-tokens", str(self.new_tokens)]


# One warm-up round runs every mode once (cuBLAS and SDPA pick their kernels for its shapes on first use).
# Sized so that the default plan fits its budget with the families step in it (a test checks).
PHASES_ROUNDS, OTHERS_ROUNDS, FAMILY_ROUNDS = Rounds(1, 4, 3), Rounds(1, 4, 1), Rounds(1, 2, 1)
CONVERSATION_NEW_TOKENS = 3  # per answer (bench.gpu_steps.conversation_argv)


def family_modes(family: str) -> list[str]:
    """The families step's modes on the GPU: full, VisionZip's middle preset and every other method at about
    that count (each at its preset nearest it: the same prefill here)."""
    budgets = [name for name in FAMILY_SHAPES[family].prefill_tflop if name != "full" and ":" not in name]
    middle = budgets[1]
    return ["full", middle, *(f"fastv:{middle}" if name == "fastv" else middle for name in FAMILY_OTHERS)]


@dataclass(frozen=True)
class Work:
    """What a step does on the GPU, counted; `seconds` turns it into time with the rates above."""

    imports_s: float = IMPORT_S
    build_gb: float = 0.0
    write_gb: float = 0.0
    load_gb: float = 0.0
    layer_calls: int = 0
    tflop: float = 0.0
    other_s: float = 0.0  # what the counts above miss (pytest's own tests, processor calls, the profiler)

    def seconds(self) -> float:
        io = self.build_gb / BUILD_GBPS + self.write_gb / WRITE_GBPS + self.load_gb / LOAD_GBPS
        return self.imports_s + io + self.layer_calls * HOST_S_PER_LAYER + self.tflop / TFLOPS_BF16 + self.other_s


def bench_work(
    modes: list[str], rounds: int, new_tokens: int, authors: bool, shape: Shape = LLAVA_NEXT_7B
) -> tuple[int, float]:
    """(layer calls, TFLOP) of bench.phases: every mode once per round, a prefill (tower + LM) and
    `new_tokens` decode steps each, and the authors' eager tower once per round."""
    per_mode = shape.tower_layers + shape.lm_layers * (1 + new_tokens)
    calls = rounds * (len(modes) * per_mode + (shape.tower_layers if authors else 0))
    tower = shape.tower_tflop
    tflop = rounds * (sum(tower + shape.prefill_tflop[mode] for mode in modes) + (tower if authors else 0))
    return calls, tflop


def families_work() -> Work:
    """Both families built on the GPU, then bench.phases on each (a processor call per mode)."""
    rounds = FAMILY_ROUNDS
    counts = [
        bench_work(family_modes(family), rounds.total, rounds.new_tokens, False, shape)
        for family, shape in FAMILY_SHAPES.items()
    ]
    modes = sum(len(family_modes(family)) for family in FAMILY_SHAPES)
    return Work(
        build_gb=sum(shape.gb for shape in FAMILY_SHAPES.values()),
        layer_calls=sum(calls for calls, _ in counts),
        tflop=sum(tflop for _, tflop in counts),
        # the tiny models' refusal check; a processor call per mode (at most 0.36 s on the loaded 2-core CPU here)
        other_s=len(FAMILY_SHAPES) * 0.5 + 0.4 * modes,
    )


def gpu_work() -> dict[str, Work]:
    """Each step's work with the default arguments (bench.gpu_measure's *_ARGV and the *_ROUNDS above)."""
    phases = PHASES_ROUNDS
    phases_calls, phases_tflop = bench_work(["full", "640", "320", "160"], phases.total, phases.new_tokens, True)
    # every other method keeps 320 tokens, so its prefill is VisionZip 320's, but FastV's (it prunes inside the LM)
    other_modes = ["full", "320", *("fastv:320" if name == "fastv" else "320" for name in OTHERS)]
    others_calls, others_tflop = bench_work(other_modes, OTHERS_ROUNDS.total, OTHERS_ROUNDS.new_tokens, False)
    every_mode = ["full", "640", "320", "160", *other_modes[2:]]
    profile_calls = 2 * len(every_mode) * (TOWER_LAYERS + LM_LAYERS)  # a warm-up and a captured prefill each
    # 3 budgets x (1 + 1) conversations x 3 turns x 2 sides
    conversation_calls = 6 * 3 * 2 * (TOWER_LAYERS + LM_LAYERS * (1 + CONVERSATION_NEW_TOKENS))
    return {
        "env": Work(imports_s=FIRST_IMPORT_S, other_s=8),  # nvidia-smi, the processor check
        "pytest": Work(other_s=15),  # tests/test_gpu.py: tiny-model turns on CUDA
        "phases": Work(
            write_gb=GB_7B + GB_CLIP,  # the random 7B and CLIP-L, built once for every later step
            load_gb=2 * GB_7B,  # the benchmark, then the profiler's own copy
            layer_calls=phases_calls + profile_calls,
            tflop=phases_tflop + 2 * sum(TOWER_TFLOP + PREFILL_TFLOP[m] for m in every_mode),
            other_s=4 + 0.5 * len(every_mode),  # processor calls per mode; reading each profile
        ),
        "others": Work(load_gb=GB_7B, layer_calls=others_calls, tflop=others_tflop, other_s=5),
        "families": families_work(),
        # fp32 wide, 4 LM layers, built on the GPU and kept there; the tiny models of three families on both devices
        "correct": Work(build_gb=6.0, layer_calls=4 * 9 * (TOWER_LAYERS + 4), other_s=10),
        "conversation": Work(
            load_gb=GB_7B, layer_calls=conversation_calls, tflop=6 * 3 * 2 * 45 / 2, other_s=5
        ),  # each turn: the full side about 45 TFLOP, VisionZip's a few
        # side by side, then tight: both loaded again; the ballast, the unloading and what the 7B's user is told
        "registry": Work(write_gb=GB_13B, load_gb=2 * (GB_7B + GB_13B), other_s=15),
    }


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # one line for the plan
    dry_s: float  # its CPU seconds in the dry run (tiny model, one thread; the record's cpu_s), about its idle time
    log: str = "gpu-check.log"  # the file in --out that takes its output


STEPS = [
    Step("env", "versions, the device, the image processor, imports against the machine's packages", 4.0),
    Step("pytest", "tests/test_gpu.py (the tests that skip without CUDA), gradio unimportable", 4.6, "pytest-gpu.txt"),
    Step("phases", "the random 7B built once; bench.phases, VisionZip beside full; a profiler capture per mode", 5.5),
    Step("others", "bench.phases, every other method at 320 beside full and VisionZip 320, one decode token", 5.2),
    Step("families", "Qwen2.5-VL and LLaVA-OneVision at 7B shape, 28 LM layers: bench.phases, every method", 10.5),
    Step(
        "correct",
        "selections on CUDA = CPU (fp32, every method, 3 families); bf16 vs fp32 overlap, first-token KL",
        8.9,
    ),
    Step("conversation", "bench.conversation: three turns through the app's turn code, full vs VisionZip", 5.5),
    Step("registry", "7B- and 13B-shaped models through the app's registry; then its memory policy", 4.2),
]
OVERRUN = Step("overrun", "test only: sleeps in a child process past its box (--test-overrun)", 1.0)
MIN_BOX_S = 10  # a step offered less is recorded as `no-time`, not started
FINAL_S = 5  # kept at the end for writing the results


def estimates(dry_run: bool, steps: list[Step]) -> dict[str, float]:
    work = gpu_work()
    return {step.name: step.dry_s if dry_run else round(work[step.name].seconds(), 1) for step in steps}


def box_for(index: int, steps: list[Step], left_s: float, estimate: dict[str, float], fixed: dict[str, float]) -> float:
    """Step `index`'s box: its share of the seconds left, in proportion to the estimates of it and the
    steps after it; a step with a box set by hand (`fixed`) gets that, as far as the time left allows."""
    rest = steps[index:]
    name = steps[index].name
    pinned = sum(fixed[s.name] for s in rest[1:] if s.name in fixed)
    if name in fixed:
        return min(fixed[name], left_s - MIN_BOX_S * sum(s.name not in fixed for s in rest[1:]))
    shared = sum(estimate[s.name] for s in rest if s.name not in fixed)
    return (left_s - pinned) * estimate[name] / shared


def plan(steps: list[Step], left_s: float, estimate: dict[str, float], fixed: dict[str, float]) -> list[dict[str, Any]]:
    """Each step's box if every step before it uses its whole box."""
    rows = []
    for index, step in enumerate(steps):
        box = box_for(index, steps, left_s, estimate, fixed)
        rows.append({"step": step.name, "what": step.what, "estimate_s": estimate[step.name], "box_s": round(box)})
        left_s -= max(box, 0)
    return rows


def plan_text(rows: list[dict[str, Any]], budget_s: float, left_s: float, dry_run: bool, wheels_s: float = 0) -> str:
    """The plan as printed first: each step, its estimate, its limit and what it does."""
    basis = "CPU dry-run seconds" if dry_run else "counted work at the H200's rates (bench/gpu_plan.py)"
    lines = [
        f"[gpu-check] plan: {budget_s:.0f} s from the script's start, {left_s:.0f} s left for the steps; "
        f"estimates from {basis}; a step that ends early leaves its time to the later ones",
        f"[gpu-check]   {'step':<13} {'estimate s':>10} {'limit s':>8}  what",
    ]
    if wheels_s:
        lines.append(
            f"[gpu-check]   {'wheels':<13} {'15':>10} {wheels_s:>8.0f}  install .whl/*.whl (scripts/gpu_check.sh)"
        )
    lines += [f"[gpu-check]   {r['step']:<13} {r['estimate_s']:>10.0f} {r['box_s']:>8.0f}  {r['what']}" for r in rows]
    return "\n".join(lines)


# -- what a step's process gets from the parent ------------------------------------------------------------
@dataclass
class Context:
    dry_run: bool
    scratch: Path
    deadline: float  # time.time() at which the parent kills this step
    budgets: list[str]
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
