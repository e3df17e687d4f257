"""Per-turn measurements of one side of the comparison, and what is derived from them."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields


@dataclass
class TurnStats:
    turn: int  # 1-based turn of the conversation
    side: str  # "left" or "right"
    model: str  # model label as shown in the UI
    mode: str  # "full" or e.g. "VisionZip 54+10/tile"
    visual_tokens: int
    text_tokens: int
    context_tokens: int  # visual + text tokens prefilled this turn
    vision_ms: float  # vision tower (+ the method's own work) time
    ttft_ms: float  # time to first token: vision encode + LLM prefill
    decode_tokens_per_s: float
    new_tokens: int
    kv_cache_bytes: int
    device: str = "cpu"
    error: str | None = None
    llm_prefill_ms: float | None = None  # the LLM's part of the time to first token; derived when not given
    kl_to_full: float | None = None  # KL(full || this side) of the first answer token, nats (app.quality)
    quality_reference: str | None = None  # where the full distribution came from, or why there is none
    full_answer_logprob: float | None = None  # the full side's answer scored under this side: mean log-prob
    full_answer_ppl: float | None = None  # ... and its perplexity
    prefilled_tokens: int | None = None  # tokens the LLM ran this turn (less than context when the cache is reused)
    cached_tokens: int = 0  # tokens taken from the side's KV cache of earlier turns
    layer_tokens: list[int] | None = None  # a method inside the LLM (FastV): the image tokens at each layer
    chosen_for: str | None = None  # a text-dependent method: "this question" or the earlier turn it kept
    cache_note: str | None = None  # with the cache kept: why this turn re-prefilled everything
    text_tower: str | None = None  # CDPruner: the CLIP text tower that scored the question
    engine: str | None = None  # a side on a vLLM server (app.engine): its address; no vision / prefill split

    def __post_init__(self) -> None:
        if self.llm_prefill_ms is None:
            self.llm_prefill_ms = max(0.0, self.ttft_ms - self.vision_ms) if self.ttft_ms else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def summary_line(full: TurnStats, reduced: TurnStats) -> str:
    """E.g. '2928 -> 320 visual tokens, time to first token 7.1x faster' for one turn (or 'slower', which
    happens when the VisionZip side was given more frames, or on a model too small to notice)."""
    if not (full.ok and reduced.ok) or reduced.ttft_ms <= 0 or full.ttft_ms <= 0:
        return ""
    speedup = full.ttft_ms / reduced.ttft_ms
    change = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
    return f"{full.visual_tokens} -> {reduced.visual_tokens} visual tokens, time to first token {change}"


def cached_turn_line(full: TurnStats, reduced: TurnStats) -> str:
    """A turn on which a side built on its KV cache, e.g. '2928 -> 320 visual tokens, both in the KV cache;
    new text only: 155 vs 156 tokens prefilled'.  Its visual tokens were not prefilled this turn, so a time
    ratio would compare text prefills (or a cache against none), not the methods: none is given."""
    if not (full.ok and reduced.ok):
        return ""
    counts = f"{full.visual_tokens} -> {reduced.visual_tokens} visual tokens"
    if full.cached_tokens and reduced.cached_tokens:
        return (
            f"{counts}, both in the KV cache; new text only: {full.prefilled_tokens:,} vs "
            f"{reduced.prefilled_tokens:,} tokens prefilled (no speed-up: neither side prefilled its visual tokens)"
        )

    def prefilled(stats: TurnStats) -> str:
        return "new text only" if stats.cached_tokens else "everything"

    return (
        f"{counts}; prefilled {full.prefilled_tokens:,} ({prefilled(full)}) vs {reduced.prefilled_tokens:,} "
        f"({prefilled(reduced)}) tokens (no speed-up: only one side prefilled its visual tokens)"
    )


def comparison_line(left: TurnStats, right: TurnStats) -> str:
    """Two reducing sides of one turn, e.g. 'DivPrune 320/image vs VisionZip 54+10/tile: 320 vs 320
    visual tokens (equal counts), time to first token 1.2x faster on the right'."""
    if not (left.ok and right.ok) or left.ttft_ms <= 0 or right.ttft_ms <= 0:
        return ""
    counts = "equal counts" if left.visual_tokens == right.visual_tokens else "counts differ"
    speedup = left.ttft_ms / right.ttft_ms
    change = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
    return (
        f"{left.mode} vs {right.mode}: {left.visual_tokens:,} vs {right.visual_tokens:,} visual tokens ({counts}), "
        f"time to first token {change} on the right"
    )


def export_json(turns: list[TurnStats]) -> str:
    return json.dumps([asdict(turn) for turn in turns], indent=2)


def export_csv(turns: list[TurnStats]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(TurnStats)])
    writer.writeheader()
    for turn in turns:
        writer.writerow(asdict(turn))
    return buffer.getvalue()
