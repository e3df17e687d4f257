"""The GPU check's measuring steps (bench.gpu_steps runs them): bench.phases with a profiler capture per
mode, every other method, Qwen2.5-VL and LLaVA-OneVision, and the CUDA correctness checks. Torch and the project load inside the steps.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from bench.gpu_plan import FAMILY_ROUNDS, FAMILY_SHAPES, OTHERS, OTHERS_ROUNDS, PHASES_ROUNDS, Context

# bench.phases arguments, less the budgets and --out. On the GPU the random 7B the phases step saved, in bf16,
# with the rounds bench/gpu_plan.py counts (PHASES_ROUNDS, OTHERS_ROUNDS); the families step builds random
# models of the 7B configs on the GPU (28 LM layers: bench.phases.FULL_DEPTH).
PHASES_ARGV = {
    True: "--preset tiny --dtype float32 --device cpu --repeats 1 --warmup 0 --new-tokens 2".split(),
    False: "--preset real --dtype bfloat16 --device cuda".split() + PHASES_ROUNDS.argv(),
}
OTHERS_ARGV = {
    True: "--preset tiny --dtype float32 --device cpu --repeats 1 --warmup 0 --new-tokens 1 --no-authors".split(),
    False: "--preset real --dtype bfloat16 --device cuda --no-authors".split() + OTHERS_ROUNDS.argv(),
}
FAMILY_ARGV = {
    True: "--preset tiny --dtype float32 --device cpu --repeats 1 --warmup 0 --new-tokens 1".split(),
    False: "--preset wide --dtype bfloat16 --device cuda".split() + FAMILY_ROUNDS.argv(),
}
EVERY_METHOD = ["320", *(f"{name}:320" for name in OTHERS)]  # the correctness checks' modes, after "full"
# The dry run goes through every path with fewer modes (its time is the test suite's): VisionZip's budgets
# and the methods with their own record or FLOP count (FastV), not every method again (tests/test_methods_*).
DRY_MODES = ["320", "fastv:320"]  # after "full", which bench.phases.prepare_modes always puts first
DRY_OTHERS = ["random", "fastv"]
PRECISION_LM_LAYERS = 4  # bf16 vs fp32 at 7B width: every layer shape, FastV's K=2 inside, 6 GB in fp32
SDPA_OPS = re.compile(r"aten::_(scaled_dot_product|flash_attention|efficient_attention|cudnn_attention)\w*")


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
    return {"free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}


def model_checkpoint(dry_run: bool) -> Path:
    """The model the benchmarks load: the tiny checkpoint in a dry run, else the random 7B (32 LM layers,
    bf16) that bench.conversation.wide_checkpoint builds on the GPU and saves on first use (the phases step, first)."""
    if dry_run:
        from visionzip.tiny import tiny_checkpoint

        return tiny_checkpoint("llava_next")
    import torch

    from bench.conversation import wide_checkpoint

    path = wide_checkpoint(32, "bfloat16", torch.device("cuda"))
    free_memory()
    return path


def clip_for_cdpruner(dry_run: bool) -> None:
    """On the GPU, CDPruner's question scorer is a random CLIP-L/14-336 text tower (no hub there); the tiny
    model brings its own."""
    if not dry_run and "VISIONZIP_CLIP" not in os.environ:
        from bench.phases import random_clip_l

        os.environ["VISIONZIP_CLIP"] = str(random_clip_l())


def build_once(context: Context) -> dict[str, Any]:
    """The checkpoint every later step loads (bench.conversation.wide_checkpoint: built on the GPU, saved
    into the cache folder) and CDPruner's random CLIP-L, timed; the tiny checkpoint in a dry run."""
    started = time.monotonic()
    path = model_checkpoint(context.dry_run)
    clip_for_cdpruner(context.dry_run)
    size = sum(part.stat().st_size for part in path.glob("*.safetensors"))
    built = {"checkpoint": str(path), "gib": round(size / 2**30, 2), "clip": os.environ.get("VISIONZIP_CLIP")}
    built["note"] = f"{path.name}: {built['gib']} GiB ready in {time.monotonic() - started:.0f} s"
    context.save(data={"model": built})
    return built


# -- steps: phases and others ------------------------------------------------------------------------------
def run_phases(context: Context, name: str, argv: list[str], checkpoint: bool = True) -> dict[str, Any]:
    """bench.phases through its command-line entry, on the saved checkpoint (model_checkpoint) unless
    `checkpoint` is False (argv names the model then); its JSON results."""
    from bench import phases

    if checkpoint:  # the LLaVA-NeXT 7B: CDPruner runs there (the other families refuse it)
        clip_for_cdpruner(context.dry_run)
    argv = argv + (["--model", str(model_checkpoint(False))] if checkpoint and not context.dry_run else [])
    argv += ["--out", str(context.scratch / name)]
    print("python -m bench.phases", " ".join(argv), flush=True)
    if phases.main(argv) != 0:
        raise RuntimeError(f"bench.phases ({name}) exited with failure")
    (path,) = (context.scratch / name).glob("*.json")
    results = json.loads(path.read_text())
    results["meta"]["argv"] = argv
    fastv_rows(results)
    return results


def phases_markdown(results: dict[str, Any], targets: bool = True) -> str:
    """bench.phases' tables, issue 16's targets (set for LLaVA-NeXT) where `targets`, and FastV's work."""
    from bench import phases

    lines = [phases.report(results), *([targets_markdown(issue16_targets(results))] if targets else [])]
    fastv = [row for row in results["rows"] if "lm_tokens_by_layer" in row]
    lines += [
        f"FastV ({row['mode']}) keeps the prompt's {row['visual_tokens']} image placeholders; its LM runs "
        f"{row['lm_tokens_by_layer']} tokens, so its token ratio and FLOP bound count that work"
        for row in fastv
    ]
    return "\n\n".join(lines)


def step_phases(context: Context) -> dict[str, Any]:
    """The random 7B built and saved (once: every later step loads it); VisionZip at every budget beside
    full; saved; then one profiler capture per mode, every method's."""
    built = build_once(context)
    budgets = [min(context.budgets, key=int)] if context.dry_run else context.budgets
    argv = PHASES_ARGV[context.dry_run] + ["--budgets", *budgets]
    results = run_phases(context, "phases", argv)
    markdown = phases_markdown(results)
    data: dict[str, Any] = {"model": built, "results": results, "targets_issue16": issue16_targets(results)}
    context.save(data=data, markdown=markdown)  # the profile may run out of time: this stays
    free_memory()
    data["profile"] = profile_every_mode(context)
    backends = sorted({backend for row in data["profile"] for backend in row["backends"]})
    note = f"{built['note']}; SDPA: {', '.join(backends) or 'none seen'}"
    markdown = f"- {built['note']}\n\n{markdown}\n\n{profile_markdown(data['profile'])}"
    return {"data": data, "markdown": markdown, "note": note}


def step_others(context: Context) -> dict[str, Any]:
    """Every other registered method at 320 beside full and VisionZip 320, one decode token each."""
    methods = DRY_OTHERS if context.dry_run else OTHERS
    argv = OTHERS_ARGV[context.dry_run] + ["--budgets", "320", *(f"{name}:320" for name in methods)]
    results = run_phases(context, "others", argv)
    data = {"results": results, "targets_issue16": issue16_targets(results)}
    return {"data": data, "markdown": phases_markdown(results)}


def step_families(context: Context) -> dict[str, Any]:
    """Qwen2.5-VL and LLaVA-OneVision: bench.phases on a random model of each 7B's config built on the GPU
    (the tiny models in a dry run), full beside VisionZip's presets and every method that runs on the
    family; the methods that refuse it are recorded with the library's reason."""
    data: dict[str, Any] = {}
    markdown = []
    for family in FAMILY_SHAPES:
        runs, refused = methods_on(family)
        argv = FAMILY_ARGV[context.dry_run] + ["--family", family]
        argv += ["--budgets", *family_budgets(family, runs, "smallest" if context.dry_run else "middle")]
        results = run_phases(context, family, argv, checkpoint=False)
        data[family] = {"results": results, "refused": refused}
        refusals = [f"- {name} refuses {family}: {reason}" for name, reason in refused.items()]
        markdown.append("\n\n".join([f"### {family}", phases_markdown(results, targets=False), *refusals]))
        context.save(data=data, markdown="\n\n".join(markdown))  # the second family may run out of time
        free_memory()
    return {"data": data, "markdown": "\n\n".join(markdown)}


def methods_on(family: str) -> tuple[list[str], dict[str, str]]:
    """The registered methods other than VisionZip that run on `family` (in registry order), and each
    refusing one's reason, as the library gives it when asked on the family's tiny model."""
    import visionzip
    from bench import phases
    from visionzip.tiny import load_tiny

    model, processor = load_tiny(family)
    handle = visionzip.apply(model, processor)
    runs, refused = [], {}
    try:
        for name in visionzip.METHODS:
            if name == "visionzip":
                continue
            tokens = max(visionzip.get_method(name).presets(family).values())
            try:
                with handle.use(**phases.Reduction(name, tokens=tokens).use()):
                    runs.append(name)
            except ValueError as refusal:
                refused[name] = str(refusal)
    finally:
        handle.remove()
    return runs, refused


def family_budgets(family: str, methods: list[str], visionzip_presets: str) -> list[str]:
    """bench.phases --budgets: VisionZip's presets ("all", "smallest" or "middle"), then each method at its
    preset nearest VisionZip's middle one."""
    import visionzip
    from visionzip.budget import PRESETS

    names = sorted(PRESETS[family], reverse=True)
    middle = names[1]
    chosen = []
    for name in methods:
        presets = visionzip.get_method(name).presets(family)
        chosen.append(f"{name}:{min(presets, key=lambda preset: abs(preset - middle))}")
    ours = {"all": names, "smallest": names[-1:], "middle": [middle]}[visionzip_presets]
    return [str(name) for name in ours] + chosen


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


def targets_markdown(targets: list[dict[str, Any]]) -> str:
    lines = ["| issue 16 target | value | goal | met |", "|---|---|---|---|"]
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines)


# -- FastV's own work ------------------------------------------------------------------------------------------
def fastv_rows(results: dict[str, Any]) -> None:
    """FastV keeps every image placeholder in the prompt and prunes inside the LM: layers below K run on the
    whole context, layers K.. on the text and the kept image tokens. Its row's token ratio, prefill FLOPs
    and FLOP bound are set from that work (bench.phases counts the whole context in every layer: 1.00x)."""
    rows = [row for row in results["rows"] if row["mode"].startswith("fastv:")]
    if not rows:
        return
    from types import SimpleNamespace

    import visionzip
    from visionzip.settings import Settings

    text = SimpleNamespace(**results["text_config"])  # the run's LM shape, as bench.phases wrote it
    layer = Settings.__dataclass_fields__["fastv_layer"].default  # bench.phases leaves FastV's K at its default
    presets = visionzip.get_method("fastv").presets(results["meta"]["family"])
    for row in rows:
        kept = row["context_tokens"] - row["visual_tokens"] + presets[int(row["mode"].split(":")[1])]
        set_fastv_work(row, results["rows"][0], text, layer, kept)


def fastv_prefill_gflop(text_config: Any, layer: int, full: int, kept: int) -> float:
    """Prefill GFLOP when layers < `layer` run on `full` tokens and the rest on `kept` (one LM head)."""
    from bench.phases import prefill_flops

    def layers(count: int) -> Any:
        config = copy.copy(text_config)
        config.num_hidden_layers = count
        return config

    below, above = layers(layer), layers(text_config.num_hidden_layers - layer)
    return (prefill_flops(below, full) + prefill_flops(above, kept) - prefill_flops(layers(0), kept)) / 1e9


def set_fastv_work(row: dict[str, Any], full: dict[str, Any], text_config: Any, layer: int, kept: int) -> None:
    total, context = text_config.num_hidden_layers, row["context_tokens"]
    row["lm_tokens_by_layer"] = f"{layer} x {context} + {total - layer} x {kept}"
    row["prefill_gflop"] = fastv_prefill_gflop(text_config, layer, context, kept)
    row["token_ratio"] = full["context_tokens"] * total / (layer * context + (total - layer) * kept)
    row["prefill_speedup_vs_token_ratio"] = row["prefill_speedup"] / row["token_ratio"]
    row["decoder_speedup_vs_token_ratio"] = row["decoder_speedup"] / row["token_ratio"]

    def work(r: dict[str, Any]) -> float:
        return r["tower_gflop"] + r["visionzip_gflop"] + r["projector_gflop"] + r["prefill_gflop"]

    row["ttft_speedup_flop_bound"] = work(full) / work(row)
    row["ttft_speedup_vs_bound"] = row["ttft_speedup"] / row["ttft_speedup_flop_bound"]


# -- the profiler: which SDPA kernels ran, and kernel time against wall time -----------------------------------
def backend_of(op: str) -> str:
    return next((name for name in ("flash", "efficient", "cudnn", "math") if name in op), op)


def profile_every_mode(context: Context) -> list[dict[str, Any]]:
    """One prefill per mode (VisionZip at every budget, every other method at 320) under torch.profiler,
    after a warm-up: the SDPA ops that ran (so the backend), and on CUDA the kernels' summed device time
    against the wall time (a low share means the prefill waits on the host: launch-bound)."""
    import torch

    from bench import phases

    dtype = torch.float32 if context.dry_run else torch.bfloat16
    device = torch.device(context.device)
    clip_for_cdpruner(context.dry_run)
    with torch.inference_mode():
        preset, model = ("tiny", None) if context.dry_run else ("real", str(model_checkpoint(False)))
        subject = phases.load_subject(preset, dtype, device, 0, model)
        names = DRY_MODES[1:] if context.dry_run else [*context.budgets, *(f"{name}:320" for name in OTHERS)]
        modes = phases.prepare_modes(subject, names, device, dtype)
        rows = []
        for mode in modes:
            rows.append(profile_mode(subject, mode, device))
            context.save(data={**context.saved.get("data", {}), "profile": rows})
    return rows


def profile_mode(subject: Any, mode: Any, device: Any) -> dict[str, Any]:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench import phases

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with phases.mode_context(subject.model, subject.processor, mode.reduction) as call:
        subject.model(**mode.inputs, use_cache=True, logits_to_keep=1)  # warm-up: kernels chosen, caches filled
        sync()
        with profile(activities=activities) as captured:
            start = time.perf_counter()
            subject.model(**mode.inputs, use_cache=True, logits_to_keep=1)
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
        layer_tokens = None if call is None else call.layer_tokens
    averages = captured.key_averages()
    sdpa = {event.key: event.count for event in averages if SDPA_OPS.match(event.key)}
    kernels = [  # the device's own events, as torch's profiler table sums them (ops' rows would count twice)
        event.self_device_time_total
        for event in averages
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    ]
    kernel_ms = sum(kernels) / 1e3 if cuda else None
    return {
        "mode": mode.name,
        "sdpa_ops": sdpa,
        "backends": sorted({backend_of(op) for op in sdpa}),
        "wall_ms_profiled": round(wall_ms, 2),
        "kernel_ms": None if kernel_ms is None else round(kernel_ms, 2),
        "kernel_share": None if kernel_ms is None else round(kernel_ms / wall_ms, 3),
        "layer_tokens": layer_tokens,
    }


def profile_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | SDPA ops (count) | backend | wall ms (profiled) | kernel ms | kernels / wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{op.removeprefix('aten::')} ({n})" for op, n in r["sdpa_ops"].items()) or "-"
        kernel = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.1f}"
        share = "-" if r["kernel_share"] is None else f"{r['kernel_share']:.2f}"
        lines.append(
            f"| {r['mode']} | {ops} | {', '.join(r['backends'])} | {r['wall_ms_profiled']:.1f} | {kernel} | {share} |"
        )
    return "\n".join(lines)


# -- step: correct -------------------------------------------------------------------------------------------------
def step_correct(context: Context) -> dict[str, Any]:
    """The tiny model's selections on CUDA against the CPU's in fp32 for every method (asserted: equal), then
    at 7B width bf16 against fp32: selection overlap and the first token's KL (reported)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: no TF32 in matmuls or convolutions
    torch.backends.cudnn.allow_tf32 = False
    data: dict[str, Any] = {"devices": compare_devices(context)}  # the tiny model: its own tiny CLIP for CDPruner
    context.save(data=data)
    data["families"] = {}
    for family in FAMILY_SHAPES:
        data["families"][family] = compare_devices(context, family)
        context.save(data=data)
    free_memory()
    clip_for_cdpruner(context.dry_run)  # 7B width: the random CLIP-L (set only now: the tiny model cannot take it)
    data["precision"] = compare_precisions(context)
    record: dict[str, Any] = {"data": data, "markdown": correct_markdown(data)}
    compared = [data["devices"], *data["families"].values()]
    differ = [f"{c['family']} {row['mode']}" for c in compared for row in c["rows"] if not row["same_selection"]]
    if differ:
        record.update(
            status="failed", error=f"fp32 selections on {data['devices']['device']} differ from the CPU's: {differ}"
        )
    return record


def choices_and_logits(subject: Any, modes: list[Any], device: str, dtype: Any) -> list[tuple[list, Any]]:
    """Per mode: what each tile kept and merged into (kept, targets), and the first answer token's logits
    (float64, on the CPU). The modes' inputs are prepared once and cast here (processor calls are slow)."""
    import torch

    from bench import phases

    results = []
    with torch.inference_mode():
        for mode in modes:
            inputs = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in mode.inputs.items()}
            with phases.mode_context(subject.model, subject.processor, mode.reduction) as call:
                logits = subject.model(**inputs, logits_to_keep=1).logits[0, -1]
                tiles = [] if call is None else [tile for image in call.selection for tile in image.tiles]
            results.append(([(tile.kept.tolist(), tile.targets.tolist()) for tile in tiles], logits.double().cpu()))
    return results


def cpu_modes(subject: Any, names: list[str], family: str = "llava_next") -> list[Any]:
    """bench.phases' modes of these names, with their inputs on the CPU in fp32."""
    import torch

    from bench import phases

    with torch.inference_mode():
        return phases.prepare_modes(subject, names, torch.device("cpu"), torch.float32, family)


def compare_devices(context: Context, family: str = "llava_next") -> dict[str, Any]:
    """The family's tiny model in fp32 on the CPU and on the GPU (a dry run: the CPU twice, the path only),
    every method that runs on it (a dry run: the smallest VisionZip budget and FastV)."""
    import torch

    from bench.phases import Subject
    from visionzip.tiny import load_tiny

    model, processor = load_tiny(family, torch.float32)
    subject = Subject(model, processor, "tiny")
    if family == "llava_next":
        names = DRY_MODES if context.dry_run else EVERY_METHOD
    else:
        methods, _ = methods_on(family)
        names = family_budgets(
            family, ["fastv"] if context.dry_run else methods, "smallest" if context.dry_run else "middle"
        )
    modes = cpu_modes(subject, names, family)
    on_cpu = choices_and_logits(subject, modes, "cpu", torch.float32)
    device = context.device
    other = Subject(copy.deepcopy(model).to(device), processor, "tiny")
    on_device = choices_and_logits(other, modes, device, torch.float32)
    rows = []
    for mode, (chosen_cpu, logits_cpu), (chosen_dev, logits_dev) in zip(modes, on_cpu, on_device):
        rows.append(
            {
                "mode": mode.name,
                "same_selection": chosen_cpu == chosen_dev,
                "overlap": overlap(chosen_cpu, chosen_dev),
                "max_abs_logit_diff": float((logits_cpu - logits_dev).abs().max()),
                "same_first_token": int(logits_cpu.argmax()) == int(logits_dev.argmax()),
            }
        )
    return {"model": f"tiny {family}, float32", "family": family, "device": device, "rows": rows}


def compare_precisions(context: Context) -> dict[str, Any]:
    """The same weights in fp32 and in bf16 (rounded from them): at 7B width with 4 LM layers on the GPU,
    the tiny model in a dry run."""
    import torch

    from bench.phases import Subject, build_wide
    from visionzip.tiny import load_tiny

    if context.dry_run:
        model, processor = load_tiny("llava_next", torch.float32)
        shape = "tiny LLaVA-NeXT (dry run)"
    else:
        model, processor = build_wide(PRECISION_LM_LAYERS, torch.float32, torch.device("cuda"))
        shape = f"LLaVA-NeXT-7B width, random weights, {PRECISION_LM_LAYERS} LM layers"
    names = DRY_MODES if context.dry_run else EVERY_METHOD
    modes = cpu_modes(Subject(model, processor, shape), names)
    wide = choices_and_logits(Subject(model, processor, shape), modes, context.device, torch.float32)
    half = Subject(copy.deepcopy(model).to(torch.bfloat16), processor, shape)
    del model
    narrow = choices_and_logits(half, modes, context.device, torch.bfloat16)
    rows = []
    for mode, (chosen32, logits32), (chosen16, logits16) in zip(modes, wide, narrow):
        p32, p16 = logits32.log_softmax(-1), logits16.log_softmax(-1)
        rows.append(
            {
                "mode": mode.name,
                "overlap": overlap(chosen32, chosen16),
                "min_tile_overlap": overlap(chosen32, chosen16, worst=True),
                "kl_fp32_bf16": float((p32.exp() * (p32 - p16)).sum()),
                "same_first_token": int(logits32.argmax()) == int(logits16.argmax()),
            }
        )
    return {"model": shape, "device": context.device, "rows": rows}


def overlap(first: list, second: list, worst: bool = False) -> float | None:
    """Mean (or lowest) Jaccard overlap over tiles of the patches each selection covers (kept and targets)."""
    if not first:
        return None
    scores = []
    for (kept_a, targets_a), (kept_b, targets_b) in zip(first, second):
        a, b = set(kept_a) | set(targets_a), set(kept_b) | set(targets_b)
        scores.append(len(a & b) / len(a | b) if a | b else 1.0)
    return min(scores) if worst else sum(scores) / len(scores)


def correct_markdown(data: dict[str, Any]) -> str:
    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = []
    for devices in [data["devices"], *data.get("families", {}).values()]:
        lines += [
            f"{devices['model']}: {devices['device']} against the CPU",
            "",
            "| mode | same selection | overlap | max abs logit diff | same first token |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['mode']} | {'yes' if r['same_selection'] else 'NO'} | {cell(r['overlap'], '.3f')} "
            f"| {r['max_abs_logit_diff']:.2e} | {'yes' if r['same_first_token'] else 'no'} |"
            for r in devices["rows"]
        ]
        lines.append("")
    precision = data["precision"]
    lines += [
        f"{precision['model']} on {precision['device']}: bf16 against fp32 (the same weights)",
        "",
        "| mode | overlap | lowest tile overlap | first-token KL(fp32 \\| bf16) | same first token |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {cell(r['overlap'], '.3f')} | {cell(r['min_tile_overlap'], '.3f')} "
        f"| {r['kl_fp32_bf16']:.2e} | {'yes' if r['same_first_token'] else 'no'} |"
        for r in precision["rows"]
    ]
    return "\n".join(lines)
