"""Multi-turn chat both ways, per method: every turn re-prefilled (the method re-selects for every
question) against each side's KV cache kept between turns (later turns prefill only their new text; a
text-dependent method keeps its turn-1 choice), through the app's own turn code and clock.

    python -m bench.multiturn                                   # the tiny model, on the CPU
    python -m bench.multiturn --wide 2 --dtype bfloat16         # LLaVA-NeXT-7B width, 2 LM layers
    python -m bench.multiturn --wide 32 --dtype bfloat16 --device cuda --out benchmarks

Both sides of each conversation run the same mode, so every turn is measured twice; each figure is
the median over both sides and the kept repeats (the first `--warmup` conversations are dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.conversation import Conversation, SideConfig
from app.hosting import timing_method
from app.models import ModelRegistry, resolve_device
from app.modes import make_mode
from app.turn import load_side_models, run_turn
from bench.conversation import QUESTIONS, registry_for
from bench.phases import bench_image, machine_description, random_clip_l

MODES = ["Full", "VisionZip 320", "FastV 320", "CDPruner 320"]
COLUMNS = [
    "mode",
    "cache",
    "turn",
    "context_tokens",
    "prefilled_tokens",
    "cached_tokens",
    "vision_ms",
    "ttft_ms",
    "kv_mib",
]


def run(
    registry: ModelRegistry,
    label: str,
    picture: Path,
    modes: list[str],
    turns: int,
    repeats: int,
    warmup: int,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    family = registry.family(label)
    rows = []
    for name in modes:
        for keep_cache in (False, True):
            measured: list[list] = [[] for _ in range(turns)]
            for repeat in range(warmup + repeats):
                mode = make_mode(name, family)
                sides = {side: SideConfig(label, mode) for side in ("left", "right")}
                conversation = Conversation(sides, media_path=str(picture), keep_cache=keep_cache)
                load_side_models(registry, conversation)
                for question in QUESTIONS[:turns]:
                    for _ in run_turn(registry, conversation, question, max_new_tokens, threading.Event()):
                        pass
                for index, turn in enumerate(conversation.turns):
                    for stats in turn.stats.values():
                        if not stats.ok:
                            raise SystemExit(f"{name}, turn {stats.turn}: {stats.error}")
                        if repeat >= warmup:
                            measured[index].append(stats)
            rows += [row(name, keep_cache, number, stats) for number, stats in enumerate(measured, start=1)]
    return rows


def row(name: str, keep_cache: bool, turn: int, stats: list) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(getattr(s, key) for s in stats)

    return {
        "mode": name,
        "cache": "kept" if keep_cache else "re-prefill",
        "turn": turn,
        "context_tokens": int(median("context_tokens")),
        "prefilled_tokens": int(median("prefilled_tokens")),
        "cached_tokens": int(median("cached_tokens")),
        "vision_ms": median("vision_ms"),
        "ttft_ms": median("ttft_ms"),
        "kv_mib": median("kv_cache_bytes") / 2**20,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            f"{r[c]:,.1f}" if isinstance(r[c], float) else f"{r[c]:,}" if isinstance(r[c], int) else r[c]
            for c in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.multiturn", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a registry label or checkpoint (default: the tiny model)")
    parser.add_argument(
        "--wide", type=int, metavar="LAYERS", help="a random LLaVA-NeXT of 7B width with LAYERS LM layers"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="folder for multiturn-*.json and .md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wide and "VISIONZIP_CLIP" not in os.environ:  # CDPruner's text side at real width, random (no hub)
        os.environ["VISIONZIP_CLIP"] = str(random_clip_l())
    registry, label = registry_for(args.model, args.wide, args.device, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        picture = Path(folder) / "picture.png"
        bench_image().save(picture)
        rows = run(registry, label, picture, args.modes, args.turns, args.repeats, args.warmup, args.max_new_tokens)
    device = resolve_device(args.device)
    meta = {
        "model": label,
        "machine": machine_description(device),
        "timing": timing_method(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    table = markdown(rows)
    print("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"multiturn-{'wide' + str(args.wide) if args.wide else 'tiny'}-{device.type}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        stem.with_suffix(".md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
