"""The app's own timing path, measured: multi-turn conversations through `app.turn.run_turn` on a
model the app's registry loaded, every visual token on the left and VisionZip on the right, exactly
as the page runs and times them.

    python -m bench.conversation                                                   # the tiny model, on the CPU
    python -m bench.conversation --wide 2 --dtype bfloat16                         # LLaVA-NeXT-7B width, 2 LM layers
    python -m bench.conversation --wide 32 --dtype bfloat16 --device cuda --out benchmarks   # a random 7B on a GPU
    python -m bench.conversation --model llava-hf/llava-v1.6-vicuna-7b-hf --dtype bfloat16 --device cuda
    python -m bench.conversation --budgets 320 --turns 2 --repeats 1 --record talk.vzrec.json   # + a recording

`--wide N` builds LLaVA-NeXT-7B's shapes with random weights and N LM layers (bench.phases),
saves it as a checkpoint once (in the VISIONZIP_CACHE folder; 32 layers in bf16 take 14 GB of disk)
and loads it through the registry like any local checkpoint.  The figures are the page's: vision
encode, time to first token (vision + LLM prefill), decode speed, from the app's clock (synchronised
on CUDA) after its warm-up per model and mode; the first `--warmup` conversations per budget are
dropped, each figure is the median over the rest, and each speed-up is the median of the ratios of
the two sides of one turn (measured side by side, one after the other).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app import recording
from app.conversation import Conversation, SideConfig
from app.hosting import machine_description, timing_method
from app.media import detect_media_kind
from app.models import DTYPES, ModelRegistry, resolve_device
from app.modes import FULL, make_mode
from app.stats import TurnStats
from app.turn import load_side_models, run_turn
from bench.phases import bench_image, build_wide
from visionzip.tiny import cache_folder

QUESTIONS = ["What is in this picture?", "Which colours stand out?", "Describe it in one sentence.", "Anything else?"]
BUDGETS = ["640", "320", "160"]


def wide_checkpoint(layers: int, dtype: str, device: torch.device) -> Path:
    """A saved random-weight LLaVA-NeXT of 7B width with `layers` LM layers, built on first use."""
    folder = cache_folder() / f"wide-llava_next-{layers}L-{dtype}"
    if not (folder / "config.json").exists():
        model, processor = build_wide(layers, DTYPES[dtype], device)
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        del model
        partial.rename(folder)  # only a complete checkpoint gets the final name
    return folder


def run_conversations(
    registry: ModelRegistry,
    label: str,
    picture: Path,
    budgets: list[str],
    turns: int,
    repeats: int,
    warmup: int,
    max_new_tokens: int,
) -> dict[str, list[list[dict[str, TurnStats]]]]:
    """budget -> kept conversations -> turns -> {side: stats}; each conversation is new (full on the
    left, VisionZip at the budget on the right), as a visitor's would be."""
    family = registry.family(label)
    results: dict[str, list[list[dict[str, TurnStats]]]] = {}
    for budget in budgets:
        results[budget] = []
        for repeat in range(warmup + repeats):
            sides = {
                "left": SideConfig(label, make_mode(FULL, family)),
                "right": SideConfig(label, make_mode(f"VisionZip {budget}", family)),
            }
            conversation = Conversation(sides, media_path=str(picture))
            load_side_models(registry, conversation)
            for question in QUESTIONS[:turns]:
                for _ in run_turn(registry, conversation, question, max_new_tokens, threading.Event()):  # never stopped
                    pass
            measured = [turn.stats for turn in conversation.turns]
            for turn in measured:
                for stats in turn.values():
                    if not stats.ok:
                        raise SystemExit(f"turn {stats.turn}, {stats.side} side ({stats.mode}) failed: {stats.error}")
            if repeat >= warmup:
                results[budget].append(measured)
    return results


def record_conversation(
    registry: ModelRegistry,
    modes: dict[str, tuple[str, str]],
    media: Path,
    questions: list[str],
    max_new_tokens: int,
    path: Path,
    where: str,
    random_weights: bool = False,
) -> Path:
    """Hold one conversation (side -> (model label, mode name)) about `media` through the app's turn code
    and write it as a recording (app.recording) to `path`, measured on this machine; `random_weights`:
    the models' weights are random (a `--wide` model; the tiny model is known as such anyway)."""
    sides = {side: SideConfig(label, make_mode(name, registry.family(label))) for side, (label, name) in modes.items()}
    kind = detect_media_kind(media)
    conversation = Conversation(sides, media_path=str(media), media_kind=kind)
    load_side_models(registry, conversation)
    for question in questions:
        for _ in run_turn(registry, conversation, question, max_new_tokens, threading.Event()):
            pass
    failed = [stats for stats in conversation.all_stats() if not stats.ok]
    if failed:
        raise SystemExit(f"recording {path.name}: the {failed[0].side} side failed: {failed[0].error}")
    device = registry.get(modes["left"][0]).device
    tiny = {side: registry.is_tiny(label) for side, (label, _) in modes.items()}
    random = {side: random_weights for side in modes}
    measured = recording.measured_on(machine_description(device), timing_method(device), where, tiny, random)
    return recording.save(conversation, path, measured)


def table_rows(results: dict[str, list[list[dict[str, TurnStats]]]]) -> list[dict[str, Any]]:
    """One row per budget and turn: both sides' medians and the median per-turn speed-up."""
    rows = []
    for budget, conversations in results.items():
        for index in range(len(conversations[0])):
            pairs = [conversation[index] for conversation in conversations]
            row: dict[str, Any] = {"budget": budget, "turn": index + 1}
            for side, name in (("left", "full"), ("right", "visionzip")):
                stats = [pair[side] for pair in pairs]
                row[f"{name}_visual_tokens"] = stats[0].visual_tokens
                row[f"{name}_context_tokens"] = int(statistics.median(s.context_tokens for s in stats))
                row[f"{name}_vision_ms"] = statistics.median(s.vision_ms for s in stats)
                row[f"{name}_ttft_ms"] = statistics.median(s.ttft_ms for s in stats)
                row[f"{name}_decode_tok_s"] = statistics.median(s.decode_tokens_per_s for s in stats)
                row[f"{name}_kv_mib"] = statistics.median(s.kv_cache_bytes for s in stats) / 2**20
            row["ttft_speedup"] = statistics.median(pair["left"].ttft_ms / pair["right"].ttft_ms for pair in pairs)
            row["token_ratio"] = row["full_context_tokens"] / row["visionzip_context_tokens"]
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| budget | turn | visual full -> VZ | context full -> VZ | vision ms full / VZ | TTFT ms full / VZ "
        "| TTFT speed-up | context ratio | decode tok/s full / VZ | KV MiB full / VZ |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['turn']} | {r['full_visual_tokens']:,} -> {r['visionzip_visual_tokens']:,} "
            f"| {r['full_context_tokens']:,} -> {r['visionzip_context_tokens']:,} "
            f"| {r['full_vision_ms']:,.1f} / {r['visionzip_vision_ms']:,.1f} | {r['full_ttft_ms']:,.1f} / {r['visionzip_ttft_ms']:,.1f} "
            f"| {r['ttft_speedup']:.2f}x | {r['token_ratio']:.2f}x "
            f"| {r['full_decode_tok_s']:,.1f} / {r['visionzip_decode_tok_s']:,.1f} | {r['full_kv_mib']:,.1f} / {r['visionzip_kv_mib']:,.1f} |"
        )
    return "\n".join(lines)


def registry_for(model: str | None, wide: int | None, device: str, dtype: str) -> tuple[ModelRegistry, str]:
    """The app's registry serving `model` (a checkpoint), a `wide` random model of that many LM layers,
    or the tiny model; and the label it is served under."""
    source = str(wide_checkpoint(wide, dtype, resolve_device(device))) if wide else model
    registry = ModelRegistry(source, device=device, dtype=dtype)
    return registry, registry.default


def run(args: argparse.Namespace, served: tuple[ModelRegistry, str] | None = None) -> dict[str, Any]:
    """The benchmark's report; `served`: the registry and label to use (default: made from `args`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    subject = "wide" if args.wide else Path(args.model).name if args.model else "tiny"
    registry, label = served or registry_for(args.model, args.wide, args.device, args.dtype)
    loaded = registry.get(label)
    with tempfile.TemporaryDirectory() as folder:
        picture = Path(folder) / "picture.png"
        bench_image().save(picture)
        results = run_conversations(
            registry, label, picture, args.budgets, args.turns, args.repeats, args.warmup, args.max_new_tokens
        )
    meta = {
        "subject": subject,
        "model": f"{label} ({'tiny' if registry.is_tiny(label) else registry.choices[label]})",
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "llm_layers": loaded.model.config.text_config.num_hidden_layers,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": machine_description(loaded.device),
        "gpu": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None,
        "timing": timing_method(loaded.device),
        "image": "672x672 noise (2x2 anyres grid, 5 tiles)",
        "turns": args.turns,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    conversations = {
        budget: [[{side: asdict(stats) for side, stats in turn.items()} for turn in measured] for measured in kept]
        for budget, kept in results.items()
    }  # every measurement, so each median and ratio can be checked
    return {"meta": meta, "rows": table_rows(results), "conversations": conversations}


def write(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    meta = report["meta"]
    device = meta["device"].split(":")[0]
    threads = f"-{meta['threads']}t" if device == "cpu" else ""
    name = f"app-{meta['subject']}-{meta['llm_layers']}L-{meta['dtype']}-{device}{threads}"
    paths = [out / f"{name}.json", out / f"{name}.csv"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    with paths[1].open("w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subject = parser.add_mutually_exclusive_group()
    subject.add_argument(
        "--model", help="hub id or local folder of a LLaVA-NeXT / LLaVA-1.5 checkpoint (default: the tiny model)"
    )
    subject.add_argument(
        "--wide", type=int, metavar="LAYERS", help="a random LLaVA-NeXT of 7B width with this many LM layers"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--budgets", nargs="+", default=BUDGETS, choices=BUDGETS)
    parser.add_argument("--turns", type=int, default=3, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--repeats", type=int, default=3, help="conversations measured per budget")
    parser.add_argument("--warmup", type=int, default=1, help="conversations run first and dropped, per budget")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="folder for the JSON and CSV results")
    parser.add_argument(
        "--record",
        type=Path,
        metavar="PATH",
        help="also write one conversation (full vs VisionZip at the first budget, --turns questions) as a recording "
        "a speaker can replay with no model (app/recording.py); on the bench image unless --record-media names one",
    )
    parser.add_argument("--record-media", type=Path, metavar="FILE", help="the image or video the recording is about")
    parser.add_argument("--record-where", default="python -m bench.conversation", help="where the recording was made")
    args = parser.parse_args(argv)
    if args.wide and args.dtype == "auto":
        args.dtype = "bfloat16"  # a 7B-wide model is built and saved in one precision
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    served = registry_for(args.model, args.wide, args.device, args.dtype)
    report = run(args, served)
    print("\n".join(f"{key}: {value}" for key, value in report["meta"].items()))
    print()
    print(markdown(report["rows"]))
    if args.out:
        for path in write(report, args.out):
            print(f"wrote {path}")
    if args.record:
        print(f"wrote {write_recording(args, *served)}")


def write_recording(args: argparse.Namespace, registry: ModelRegistry, label: str) -> Path:
    """The --record conversation: full on the left, VisionZip at the first budget on the right, on the
    model the benchmark ran (already warm)."""
    modes = {"left": (label, FULL), "right": (label, f"VisionZip {args.budgets[0]}")}
    with tempfile.TemporaryDirectory() as folder:
        media = args.record_media
        if media is None:
            media = Path(folder) / "picture.png"
            bench_image().save(media)
        questions = QUESTIONS[: args.turns]
        return record_conversation(
            registry, modes, media, questions, args.max_new_tokens, args.record, args.record_where, bool(args.wide)
        )


if __name__ == "__main__":
    main()
