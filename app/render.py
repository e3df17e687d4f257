"""What the page shows, as plain functions of the conversation and the registry: chat columns with a
stats line under each answer, the summary, side headers, the loaded models, and the export files."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from app.conversation import SIDES, Conversation, SideConfig, messages_for
from app.engine import EngineServer, is_engine_label, limits
from app.hosting import timing_method
from app.media import MediaError, load_image
from app.models import LoadedModel, ModelRegistry, resolve_device
from app.modes import use_mode
from app.stats import TurnStats, cached_turn_line, comparison_line, export_csv, export_json, summary_line
from app.turn import ContextTooLong, video_tokens

SIDE_NAMES = {"left": "Left", "right": "Right"}  # as messages name the sides: each side may run any method
TINY_BANNER = (
    "⚠️ **Tiny offline model.** Its weights are random, so its *answers are meaningless noise*; "
    "its *token counts and timings are real*: it has LLaVA-NeXT's exact image geometry (336x336 tiles of "
    "24x24 patches, the same grids; the tiny LLaVA-OneVision has OneVision's: 384x384 tiles of 27x27). "
    "Start with `--model llava-hf/llava-v1.6-vicuna-7b-hf` on a GPU for real answers."
)
EXPORTS = Path(tempfile.gettempdir()) / "visionzip-live-exports"
MAX_EXPORT_SESSIONS = 64  # export folders kept, one per browser session; the least recently written go first


def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def stats_line(stats: TurnStats, frames: int | None = None) -> str:
    clip = f"{frames} frames · " if frames is not None else ""
    if stats.engine:  # a vLLM server reports neither the split nor its paged cache's size
        times = f"TTFT {_ms(stats.ttft_ms)} over HTTP (the server does not split vision and prefill) · "
        times += f"decode {stats.decode_tokens_per_s:,.0f} tok/s · on the {stats.device}"
    else:
        times = (
            f"vision {_ms(stats.vision_ms)} + LLM prefill {_ms(stats.llm_prefill_ms)} = TTFT {_ms(stats.ttft_ms)} · "
            f"decode {stats.decode_tokens_per_s:,.0f} tok/s · KV cache {stats.kv_cache_bytes / 2**20:,.1f} MiB"
        )
    return (
        f"{stats.mode} · {clip}**{stats.visual_tokens:,}** visual + {stats.text_tokens:,} text = {stats.context_tokens:,} tokens · "
        + times
        + cache_line(stats)
        + quality_line(stats)
    )


def cache_line(stats: TurnStats) -> str:
    """What the language model ran this turn: the tokens prefilled, those reused, FastV's layer lengths."""
    parts = [f"visual tokens chosen for {stats.chosen_for}"] if stats.chosen_for else []
    if stats.text_tower:
        parts.append(f"question scored by {stats.text_tower}")
    if stats.cache_note:
        parts.append(f"KV cache not reused: {stats.cache_note}")
    if stats.prefilled_tokens is not None and stats.cached_tokens:
        parts.append(
            f"prefilled **{stats.prefilled_tokens:,}** tokens, {stats.cached_tokens:,} reused from the KV cache"
        )
    if stats.layer_tokens:
        first, last = stats.layer_tokens[0], stats.layer_tokens[-1]
        drop = next((layer for layer, count in enumerate(stats.layer_tokens) if count != first), None)
        kept = f", {last:,} from layer {drop} on" if drop is not None else ""
        parts.append(f"visual tokens in the LLM: {first:,} in the first layers{kept}")
    return "<br>" + " · ".join(parts) if parts else ""


def quality_line(stats: TurnStats) -> str:
    """The quality signal under a reducing side's answer (see app.quality), or why it is missing."""
    if stats.kl_to_full is not None:
        line = f"<br>KL to the full model's first token: **{stats.kl_to_full:.3f} nats** (vs {stats.quality_reference})"
        if stats.full_answer_logprob is not None:
            line += (
                f" · full answer scored here: {stats.full_answer_logprob:.2f} log-prob/token, "
                f"perplexity {stats.full_answer_ppl:,.1f}"
            )
        return line
    return f"<br>KL to the full model: {stats.quality_reference}" if stats.quality_reference else ""


def chat_messages(conversation: Conversation, side: str) -> list[dict]:
    messages = []
    for turn in conversation.turns:
        messages.append({"role": "user", "content": turn.question})
        answer, stats = turn.answers[side], turn.stats.get(side)
        if turn.running == side:
            text = answer + " ▌"
        elif stats is None:
            text = "… waiting: the other side runs first this turn" if turn.running else f"{answer} ■ stopped".lstrip()
        elif stats.error:
            text = (answer + "\n\n" if answer else "") + f"⚠️ {stats.error}"
        else:
            text = f"{answer.strip() or '(empty answer)'}\n\n<small>{stats_line(stats, turn.frames.get(side))}</small>"
        messages.append({"role": "assistant", "content": text})
    return messages


def summary_markdown(conversation: Conversation) -> str:
    """The latest turn's ratio large, earlier turns below; full (more visual tokens) -> reduced.  The speed-up
    is given only for turns on which both sides prefilled their visual tokens."""
    lines = []
    for number, turn in reversed(list(enumerate(conversation.turns, start=1))):
        pair = [turn.stats.get(side) for side in SIDES]
        if None in pair:
            continue
        left, right = pair
        full, reduced = sorted(pair, key=lambda stats: -stats.visual_tokens)
        line = summary_line(full, reduced)
        same_input = full.visual_tokens == reduced.visual_tokens and len(set(turn.frames.values())) <= 1
        same_method = left.mode.split(" + tuned")[0] == right.mode.split(" + tuned")[0]
        if left.cached_tokens or right.cached_tokens:  # the image was in a KV cache: the time is not the method's
            line = cached_turn_line(full, reduced)
        elif line and same_input and same_method:  # e.g. with and without the tuned projector: a speed ratio is noise
            line = f"{left.visual_tokens:,} visual tokens on both sides (left: {left.mode}; right: {right.mode})"
        elif line and "full" not in (left.mode, right.mode):  # two methods: the counts are said, matched or not
            line = comparison_line(left, right)
        elif line and turn.frames:
            line += f" ({turn.frames[full.side]} -> {turn.frames[reduced.side]} frames)"
        if line and (left.engine or right.engine) and not (left.cached_tokens or right.cached_tokens):
            line += " (a side on a vLLM server: its TTFT is over HTTP on the server's engine, so the ratio compares engines too)"
        if line:
            lines.append(f"Turn {number}: {line}")
    if not lines:
        return ""
    return f"**{lines[0]}**" + "".join(f"<br><small>{line}</small>" for line in lines[1:])


def stats_records(conversation: Conversation) -> list[dict]:
    return [asdict(stats) for stats in conversation.all_stats()]


def side_header(registry: ModelRegistry, conversation: Conversation, side: str, max_new_tokens: int) -> str:
    config = conversation.sides[side]
    if registry.is_engine(config.model):
        return engine_header(registry.engines[config.model], config)
    title = f"With {config.mode.method_title}" if config.mode.enabled else "Without reduction"
    title += " + tuned projector" if config.mode.tuned else ""
    detail = f"{config.model} · {config.mode.label}"
    loaded = next((m for m in registry.loaded() if m.label == config.model), None)
    if loaded is not None and conversation.media_path is not None and conversation.media_kind == "video":
        detail += " · " + video_budget(loaded, conversation, side, max_new_tokens)
    elif loaded is not None and conversation.media_path is not None:
        image, _ = load_image(conversation.media_path)
        with use_mode(loaded, config.mode):
            detail += (
                f" · **{loaded.handle.num_image_tokens((image.height, image.width)):,} visual tokens** for this image"
            )
            if config.mode.enabled and loaded.handle.method.stage == "language model":  # FastV prunes inside
                detail += f", {config.mode.tokens:,} of them kept from layer {loaded.handle.settings.fastv_layer} on"
    return f"### {title}\n{detail}"


def engine_header(server: EngineServer, config: SideConfig) -> str:
    """A side on a vLLM server: what the server last reported, or why it could not be read, and what this mode
    cannot show."""
    if server.report is None:  # never reached: its method is unknown, not "full"
        title, detail = "On a vLLM server (not reached yet)", config.model
    else:
        title = f"With {config.mode.method_title} on vLLM" if config.mode.enabled else "Without reduction, on vLLM"
        detail = f"{config.model} · {config.mode.label}"
    if server.problem:
        detail += f" · ⚠️ {server.problem}"
    return f"### {title}\n{detail}<br><small>This side {limits(server.report)}.</small>"


def video_budget(loaded: LoadedModel, conversation: Conversation, side: str, max_new_tokens: int) -> str:
    """This side's visual tokens for the clip and whether the next turn fits its context window,
    known before anything runs (the same check that refuses the turn)."""
    messages = messages_for(conversation, side, "")
    try:
        tokens = video_tokens(loaded, conversation.sides[side].mode, conversation, messages, max_new_tokens)
    except ContextTooLong as error:
        return f"**refused:** {error}"
    except (MediaError, ValueError) as error:  # a method that does not run on this model's video says why
        return f"⚠️ {error}"
    return (
        f"**{tokens.units} {tokens.unit} × {tokens.per_unit} = {tokens.visual:,} visual tokens** for this clip · "
        f"**fits** its {loaded.context_window:,}-token context window ({tokens.prompt_tokens:,} before the question "
        f"+ {max_new_tokens} to answer)"
    )


def banner_update(registry: ModelRegistry, conversation: Conversation) -> dict:
    tiny = any(registry.is_tiny(conversation.sides[side].model) for side in SIDES)
    return gr.Markdown(TINY_BANNER, visible=tiny)


def models_markdown(registry: ModelRegistry) -> str:
    loaded = registry.loaded()
    device = resolve_device(registry.device_name)
    lines = [f"- {model.describe()}" for model in loaded] or ["- none yet: a model loads on first use"]
    return (
        "**Loaded models** (both sides share one copy of each; the least recently used is unloaded when "
        "a new one does not fit in GPU memory):\n" + "\n".join(lines) + f"\n\n**Timing:** {timing_method(device)}. "
        "TTFT (time to first token) = vision encode + LLM prefill, up to the first new token."
    )


def tuned_box(registry: ModelRegistry, conversation: Conversation, side: str) -> dict:
    """The side's "tuned projector" checkbox settings: shown only when its model has one, ticked when in use."""
    config = conversation.sides[side]
    projector = registry.projector_for(config.model)
    label = f"+ tuned projector ({projector.describe()})" if projector else "+ tuned projector"
    return dict(value=config.mode.tuned is not None, label=label, visible=projector is not None)


def vision_side(conversation: Conversation) -> str | None:
    """The side whose budget the overlay shows: the right one if it reduces here, else the left (a side on a
    vLLM server does not say what its method kept)."""
    return next(
        (
            side
            for side in ("right", "left")
            if conversation.sides[side].mode.enabled and not is_engine_label(conversation.sides[side].model)
        ),
        None,
    )


def export_files(conversation: Conversation, session: str) -> tuple[str, str]:
    """The conversation's measurements as JSON and CSV files, one folder per browser session; only the
    MAX_EXPORT_SESSIONS most recently written folders are kept, so a long-running Space's disk does
    not fill up with them."""
    folder = export_folder(session)
    stats = conversation.all_stats()
    (folder / "visionzip_turns.json").write_text(export_json(stats))
    (folder / "visionzip_turns.csv").write_text(export_csv(stats))
    return str(folder / "visionzip_turns.json"), str(folder / "visionzip_turns.csv")


def export_folder(session: str) -> Path:
    """This browser session's folder for files to download, made the newest (older ones are pruned)."""
    folder = EXPORTS / hashlib.sha256(session.encode()).hexdigest()[:16]  # the client picks session ids: no raw paths
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # this session's folder is the newest
    _prune_exports(keep=folder)
    return folder


def _prune_exports(keep: Path) -> None:
    folders = sorted((f for f in EXPORTS.iterdir() if f.is_dir() and f != keep), key=lambda f: f.stat().st_mtime)
    for stale in folders[: max(0, len(folders) + 1 - MAX_EXPORT_SESSIONS)]:
        shutil.rmtree(stale, ignore_errors=True)
