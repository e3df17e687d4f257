"""One turn: each side prepared (tokenised, checked against its context window), streamed with a
clock on every new token, stoppable from another process, and both sides run one after the other.

Every turn re-prefills the whole conversation (built with the model's chat template), so the
saving a method makes on the visual tokens shows on every turn, not only the first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from app.conversation import SIDES, Conversation, SideConfig, Turn, load_media, messages_for
from app.engine import EngineError, EngineTurn, prepare_engine_turn
from app.hosting import clock
from app.media import Clip, load_clip
from app.models import LoadedModel, ModelLoadError, ModelRegistry
from app.modes import FULL_MODE, Mode, use_mode
from app.quality import SideOutput, first_token_logprobs, kl_divergence, prompt_logits, score_answer
from app.stats import TurnStats
from app.video import clip_metadata, frame_pairs, same_budget_frames
from visionzip.video import (
    frame_features,
    frame_pixel_values,
    tokens_per_frame,
    video_input_ids,
    video_inputs,
    video_prompt,
)

FRAME_TILE_FAMILIES = ("llava_next", "llava", "llava_onevision")  # video as frames of one tile each (visionzip.video)


def image_geometry(inputs) -> dict:
    """What `get_image_features` takes besides the pixels: LLaVA's image sizes, or Qwen2.5-VL's grids."""
    if "image_grid_thw" in inputs:
        return {"image_grid_thw": inputs["image_grid_thw"]}
    return {"image_sizes": inputs.get("image_sizes")}


class ContextTooLong(ValueError):
    """The conversation would not fit the model's context window; nothing was run."""


class TurnRefused(ValueError):
    """No side could run this turn (each side's reason joined); the conversation is unchanged."""


@dataclass
class Prepared:
    loaded: LoadedModel
    mode: Mode
    inputs: dict
    visual_tokens: int
    text_tokens: int
    messages: list[dict] = field(default_factory=list)  # the conversation this side sees, this turn's question last
    output: SideOutput | None = None  # once the side has answered: what the quality signal reads
    text: str | None = None  # the question a text-dependent method chooses by (frozen when the cache is reused)
    reuse: Reuse | None = None  # the KV cache of earlier turns this turn builds on, if any
    selection: list | None = None  # what the method chose for this turn (ImageSelection per image)
    cache: SideCache | None = None  # after the turn, when the conversation keeps caches: what the next turn reuses
    cache_note: str = ""  # with the cache kept: why this turn could not build on it
    tokens: list[tuple[float, str]] | None = None  # after the turn: each new token's (ms since the side's start, text)

    def use(self):
        """The library's `use()` block for this side's mode and question."""
        return use_mode(self.loaded, self.mode, text=self.text)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1]) if "input_ids" in self.inputs else self.context_tokens

    @property
    def prefilled_tokens(self) -> int:
        """Tokens the language model runs this turn: the whole prompt, or what follows the reused prefix."""
        return self.prompt_tokens - (self.reuse.length if self.reuse else 0)

    @property
    def context_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def warm_key(self) -> tuple:
        return self.mode.key

    def encode(self):
        """The vision tower (+ the method) on this turn's image, in the caller's `use()` block; nothing
        when the image is in the reused cache."""
        if self.reuse is not None:
            return None
        inputs = self.inputs
        return self.loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"], **image_geometry(inputs))

    def generate_inputs(self, features) -> dict:
        """The keyword arguments `generate` takes for this turn: the image's features already computed,
        or the reused cache (cut to the prefix this prompt shares with it), which holds them."""
        text_inputs = {key: value for key, value in self.inputs.items() if key not in ("pixel_values", "image_sizes")}
        if self.reuse is not None:
            return dict(**text_inputs, cache=self.reuse.cut())
        return dict(**text_inputs, mm_encoder_outputs={"image": features})


@dataclass
class SideCache:
    """One side's KV cache after a turn, as a chat server keeps it: the tokens it holds and the
    question its visual tokens were chosen for (text-dependent methods keep that choice)."""

    model: str
    mode_key: tuple
    ids: torch.Tensor  # (L,) the token ids the cache holds, on the CPU
    kv: object  # the transformers Cache
    question: str
    turn: int  # the turn that chose the visual tokens


@dataclass
class Reuse:
    cache: SideCache
    length: int  # prompt tokens taken from the cache

    def cut(self):
        extra = self.cache.kv.get_seq_length() - self.length
        if extra > 0:
            self.cache.kv.crop(-extra)  # a regenerated or re-tokenised turn: back to the shared prefix
        return self.cache.kv


def reusable_prefix(cache: SideCache | None, prepared: Prepared, image_token_id: int) -> tuple[int, str]:
    """How many of this prompt's tokens a side's cache can serve, and if none, why: the shared prefix
    must hold the image and leave at least one token to prefill."""
    if cache is None:
        return 0, "no cache from an earlier turn (on ZeroGPU a cache does not outlive its GPU call)"
    if cache.model != prepared.loaded.label or cache.mode_key != prepared.mode.key:
        return 0, "the model or method changed since the cache was filled"
    ids = prepared.inputs["input_ids"][0].cpu()
    shared = min(len(ids), len(cache.ids))
    mismatch = (ids[:shared] != cache.ids[:shared]).nonzero()
    shared = int(mismatch[0]) if len(mismatch) else shared
    images = (ids == image_token_id).nonzero()
    if len(images) and shared <= int(images[-1]):
        return 0, "the prompt differs from the cache before the image ends"
    # Cutting the cache back to the shared prefix removes the same number of trailing (text) positions from
    # every layer, which is right for FastV too: the cut lies after the image, and its pruned layers differ
    # from the others only in the image tokens they hold.
    return min(shared, len(ids) - 1), ""


def prepare(loaded: LoadedModel, mode: Mode, messages: list[dict], image: Image.Image, max_new_tokens: int) -> Prepared:
    """Tokenise the conversation for one side; raise ContextTooLong before anything runs."""
    processor = loaded.processor
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with use_mode(loaded, mode):
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
    input_ids = inputs["input_ids"]
    visual = int((input_ids == loaded.model.config.image_token_id).sum())
    total = input_ids.shape[1]
    if total + max_new_tokens > loaded.context_window:
        raise ContextTooLong(
            f"{loaded.label} ({mode.label}): this turn needs {total} context + {max_new_tokens} new tokens, "
            f"more than its {loaded.context_window}-token context window. Clear the conversation, or use VisionZip."
        )
    inputs = {key: value.to(loaded.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return Prepared(loaded, mode, inputs, visual, total - visual)


class TimedStreamer(TextIteratorStreamer):
    """Streams text and records when each new token reached the host (the first `put` is the prompt)."""

    def __init__(self, tokenizer, device: torch.device) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.device = device
        self.token_times: list[float] = []
        self.token_texts: list[str] = []  # per token, the text the stream released with it ("" while a word is held)

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.token_times.append(clock(self.device))
            self.token_texts.append("")
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.token_texts:  # the final flush goes with the last token: the texts join to the answer
            self.token_texts[-1] += text
        super().on_finalized_text(text, stream_end)

    def timeline(self, start: float) -> list[tuple[float, str]]:
        """Every new token as (ms since `start`, its text): what a replay of this side's pace needs."""
        return [((at - start) * 1000, text) for at, text in zip(self.token_times, self.token_texts)]


class StopFlag:
    """The Stop button's request to a running turn, kept in a file: on ZeroGPU the turn runs in a
    worker process that a threading.Event in the server would never reach.  It has the methods of
    threading.Event that a turn uses, and pickles as its path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def set(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event | StopFlag) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for `tokens` positions."""
    text = config.text_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * tokens * dtype.itemsize


def _generate_kwargs(prepared: Prepared, features, max_new_tokens: int) -> dict:
    return dict(**prepared.generate_inputs(features), max_new_tokens=max_new_tokens, do_sample=False)


def warm_up(prepared: Prepared) -> None:
    """One untimed pass per model and mode, so the timed turns skip one-off costs (kernel
    selection, allocator growth, lazy initialisation)."""
    loaded = prepared.loaded
    if prepared.warm_key in loaded.warmed:
        return
    if prepared.reuse is not None:  # the cache came from a turn that warmed this mode up
        return
    with torch.inference_mode(), prepared.use():
        loaded.model.generate(**_generate_kwargs(prepared, prepared.encode(), 1))
    loaded.warmed.add(prepared.warm_key)


@dataclass
class Generation:
    """One side's generation, run in its own thread: what it returned and when its phases ended."""

    prepared: Prepared
    streamer: TimedStreamer
    max_new_tokens: int
    stop: threading.Event | StopFlag
    result: object = None
    call: object = None  # the use() block's record: what the method chose, FastV's layer counts
    start: float = 0.0
    vision_end: float = 0.0
    failure: BaseException | None = None

    def __call__(self) -> None:
        # One use() block for the encode and the generation (FastV pairs the image it encoded with the
        # prefill that prunes it), entered in this thread: contextvars do not follow a new thread.
        prepared, device = self.prepared, self.prepared.loaded.device
        try:
            with torch.inference_mode(), prepared.use() as self.call:
                self.start = clock(device)
                features = prepared.encode()
                self.vision_end = clock(device)
                self.result = prepared.loaded.model.generate(
                    **_generate_kwargs(prepared, features, self.max_new_tokens),
                    streamer=self.streamer,
                    stopping_criteria=StoppingCriteriaList([StopOnEvent(self.stop)]),
                    return_dict_in_generate=True,
                    output_logits=True,  # the first token's distribution: the quality signal
                )
        except BaseException as error:
            self.failure = error
            self.streamer.end()


def stream_side(
    prepared: Prepared,
    turn: int,
    side: str,
    max_new_tokens: int,
    stop: threading.Event | StopFlag,
    keep_cache: bool = False,
) -> Iterator[tuple[str, TurnStats | None]]:
    """Run one side: yields (answer so far, None) per streamed piece, then (answer, stats)."""
    loaded = prepared.loaded
    warm_up(prepared)
    generation = Generation(prepared, TimedStreamer(loaded.processor.tokenizer, loaded.device), max_new_tokens, stop)
    worker = threading.Thread(target=generation, name=f"generate-{side}", daemon=True)
    worker.start()
    answer, finished = "", False
    try:
        for piece in generation.streamer:
            answer += piece
            yield answer, None
        finished = True
    finally:
        if not finished:  # the caller went away (stop button, closed tab): end generation too
            stop.set()
        worker.join()
    if generation.failure is not None:
        raise generation.failure
    result = generation.result
    if getattr(result, "logits", None):  # (a stand-in model in the tests returns no generate output)
        generated = result.sequences[0, -len(result.logits) :].cpu()  # prompt ids, if any, come first
        prepared.output = SideOutput(first_token_logprobs(result.logits[0]), generated)
    # per-tile methods choose while encoding, FastV inside the language model's prefill
    prepared.selection = generation.call.selection if generation.call is not None else None
    prepared.tokens = generation.streamer.timeline(generation.start)
    if keep_cache:
        prepared.cache = kept_cache(prepared, result, turn)
    yield answer, side_stats(generation, turn, side)


def side_stats(generation: Generation, turn: int, side: str) -> TurnStats:
    """The measurements of one finished side, from the generation's clocks and the streamer's."""
    prepared, loaded = generation.prepared, generation.prepared.loaded
    times, start = generation.streamer.token_times, generation.start
    new_tokens = len(times)
    decode_s = times[-1] - times[0] if new_tokens > 1 else 0.0
    layer_tokens = getattr(generation.call, "layer_tokens", None)
    return TurnStats(
        turn=turn,
        side=side,
        model=loaded.label,
        mode=prepared.mode.label,
        visual_tokens=prepared.visual_tokens,
        text_tokens=prepared.text_tokens,
        context_tokens=prepared.context_tokens,
        vision_ms=(generation.vision_end - start) * 1000,
        ttft_ms=(times[0] - start) * 1000 if times else 0.0,
        decode_tokens_per_s=(new_tokens - 1) / decode_s if decode_s > 0 else 0.0,
        new_tokens=new_tokens,
        kv_cache_bytes=kv_cache_bytes(loaded.model.config, prepared.context_tokens + new_tokens, loaded.dtype),
        device=str(loaded.device),
        prefilled_tokens=prepared.prefilled_tokens,
        layer_tokens=layer_tokens or None,
        cached_tokens=prepared.reuse.length if prepared.reuse else 0,
        cache_note=(prepared.cache_note or None) if turn > 1 else None,
        text_tower=getattr(generation.call, "text_tower", None),
    )


def kept_cache(prepared: Prepared, result, turn: int) -> SideCache | None:
    """What the next turn of this side can reuse: the cache generate filled, the ids it holds."""
    if result is None or getattr(result, "cache", None) is None or isinstance(prepared, VideoPrepared):
        return None
    kv = result.cache
    ids = result.sequences[0, : kv.get_seq_length()].cpu()  # prompt + answer, less the last token (never fed)
    earlier = prepared.reuse.cache if prepared.reuse else None
    question = earlier.question if earlier else prepared.messages[-1]["content"][-1]["text"]
    return SideCache(prepared.loaded.label, prepared.mode.key, ids, kv, question, earlier.turn if earlier else turn)


def failed_stats(turn: int, side: str, config: SideConfig, error: str, prepared: Prepared | None = None) -> TurnStats:
    visual, text = (prepared.visual_tokens, prepared.text_tokens) if prepared else (0, 0)
    return TurnStats(
        turn, side, config.model, config.mode.label, visual, text, visual + text, 0.0, 0.0, 0.0, 0, 0, error=error
    )


def describe_error(error: BaseException) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "Out of GPU memory on this side. Try a smaller model, VisionZip, or clear the conversation."
    if isinstance(error, (ValueError, ModelLoadError, EngineError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


# -- video: every frame one 336x336 tile, packed in time order (visionzip.video), or Qwen2.5-VL's own --
@dataclass
class VideoPrepared(Prepared):
    """One side's turn over a clip: `inputs` holds the prompt's `input_ids` (frame placeholders
    expanded) and the frames' `pixel_values`."""

    frames: int = 0

    @property
    def warm_key(self) -> tuple:
        return ("video", *self.mode.key)

    def encode(self):
        """(frames, tokens a frame, E) features, one ImageSelection per frame on the handle."""
        return frame_features(self.loaded.handle, self.inputs["pixel_values"])

    def generate_inputs(self, features) -> dict:
        return video_inputs(self.loaded.model, self.inputs["input_ids"], features)


@dataclass
class PairedVideoPrepared(VideoPrepared):
    """A Qwen2.5-VL side's turn over a clip: the processor's own inputs (frames paired in time, its
    `<|video_pad|>` expanded to the method's count), the model's own video path."""

    def encode(self):
        """The tower and the method per frame pair, one ImageSelection per pair on the handle."""
        inputs = self.inputs
        return self.loaded.model.model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
        )

    def generate_inputs(self, features) -> dict:
        text_inputs = {key: value for key, value in self.inputs.items() if key != "pixel_values_videos"}
        return dict(**text_inputs, mm_encoder_outputs={"video": features})


@dataclass
class ClipTokens:
    """A side's clip and its prompt, counted before any frame is encoded: `units` frames (one tile each)
    or frame pairs (Qwen2.5-VL) of `per_unit` visual tokens each; `inputs` the processor's (or, for
    frames of one tile, just the prompt's `input_ids`)."""

    clip: Clip
    inputs: dict
    units: int
    per_unit: int
    unit: str = "frames"

    @property
    def visual(self) -> int:
        return self.units * self.per_unit

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def unit_tokens(loaded: LoadedModel, frame_size: tuple[int, int]) -> int:
    """Visual tokens one frame (one tile each) or one frame pair of (height, width) takes under the
    handle's current settings."""
    handle = loaded.handle
    if loaded.pairs_frames:
        return handle.family.num_video_tokens(handle, (2, *frame_size), handle.settings)
    return tokens_per_frame(handle)


def side_frame_count(loaded: LoadedModel, mode: Mode, conversation: Conversation) -> int:
    """Frames this side sees: the slider's count or, in "same budget" mode on a VisionZip side, as
    many as fit in the tokens that many full frames take (at most the clip's frames)."""
    clip = load_clip(conversation.media_path, conversation.num_frames)
    if not (conversation.same_budget and mode.enabled):
        return len(clip.frames)
    size = (clip.frames[0].height, clip.frames[0].width)
    with loaded.handle.use(enabled=False):
        full = unit_tokens(loaded, size)
    with use_mode(loaded, mode):
        reduced = unit_tokens(loaded, size)
    return same_budget_frames(len(clip.frames), full, reduced, clip.info["total_frames"])


def video_tokens(
    loaded: LoadedModel, mode: Mode, conversation: Conversation, messages: list[dict], max_new_tokens: int
) -> ClipTokens:
    """This side's clip, its prompt and its visual tokens; raises ContextTooLong when the turn would
    not fit, before encoding frames that never could."""
    frames = side_frame_count(loaded, mode, conversation)
    first = load_clip(conversation.media_path, conversation.num_frames).frames[0]  # cached: the frames' size
    with use_mode(loaded, mode):
        per_unit = unit_tokens(loaded, (first.height, first.width))
    pairs = loaded.pairs_frames
    units = -(-frames // 2) if pairs else frames  # an odd last frame makes a pair of its own

    def refuse_if_too_long(needed: int, what: str) -> None:
        counted = f"{units} {'frame pairs' if pairs else 'frames'} x {per_unit} = {units * per_unit:,} visual tokens"
        if needed + max_new_tokens > loaded.context_window:
            advice = (
                "Use fewer frames, or a smaller VisionZip budget."
                if mode.enabled
                else "Use fewer frames, or VisionZip."
            )
            raise ContextTooLong(
                f"{loaded.label} ({mode.label}): {counted}{what} + {max_new_tokens} new tokens do not fit its "
                f"{loaded.context_window:,}-token context window, so this side does not run. {advice}"
            )

    refuse_if_too_long(units * per_unit, "")
    clip = load_clip(conversation.media_path, frames)
    units = len(frame_pairs(clip)) if pairs else len(clip.frames)  # a clip may hold fewer frames than asked
    if pairs:
        with use_mode(loaded, mode):
            prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = loaded.processor(
                text=prompt, videos=[list(clip.frames)], video_metadata=clip_metadata(clip), return_tensors="pt"
            )
    else:
        prompt = video_prompt(loaded.processor, messages, clip.timestamps_s)
        inputs = {"input_ids": video_input_ids(loaded.processor, prompt, per_unit)}
    tokens = ClipTokens(clip, dict(inputs), units, per_unit, "frame pairs" if pairs else "frames")
    text_tokens = tokens.prompt_tokens - tokens.visual
    refuse_if_too_long(tokens.visual + text_tokens, f" + {text_tokens} text")
    return tokens


def prepare_video(
    loaded: LoadedModel, mode: Mode, conversation: Conversation, messages: list[dict], max_new_tokens: int
) -> VideoPrepared:
    """Tokenise the conversation over this side's frames; raise ContextTooLong before anything runs."""
    if loaded.family not in FRAME_TILE_FAMILIES and not loaded.pairs_frames:
        raise ValueError(
            f"{loaded.label} takes video its own way, which this demo does not reduce. Send an image, or pick a "
            "LLaVA or Qwen2.5-VL model for video."
        )
    if mode.inside_llm:
        raise ValueError(
            f"{mode.method_title} prunes inside the language model by the prompt's image placeholders, and a video "
            "here has none (its frames come as embeddings on LLaVA, as video placeholders on Qwen2.5-VL), so it does "
            "not run on video. Pick a method that acts before the LLM."
        )
    tokens = video_tokens(loaded, mode, conversation, messages, max_new_tokens)
    inputs = {key: value.to(loaded.device) for key, value in tokens.inputs.items()}
    text = tokens.prompt_tokens - tokens.visual
    if loaded.pairs_frames:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(loaded.dtype)
        return PairedVideoPrepared(loaded, mode, inputs, tokens.visual, text, frames=len(tokens.clip.frames))
    inputs["pixel_values"] = frame_pixel_values(loaded.processor, tokens.clip.frames).to(loaded.device, loaded.dtype)
    return VideoPrepared(loaded, mode, inputs, tokens.visual, text, frames=len(tokens.clip.frames))


# -- one turn, both sides ------------------------------------------------------------------------
def load_side_models(registry: ModelRegistry, conversation: Conversation) -> None:
    """Load both sides' models before a turn, in this process: on ZeroGPU the turn runs in a worker
    whose loads would be lost.  A model that fails to load is not an error here: the registry keeps
    the reason and the turn shows it on that side (the other side still runs)."""
    for side in SIDES:
        try:
            registry.get(conversation.sides[side].model)
        except ModelLoadError:
            pass


def prepare_sides(
    registry: ModelRegistry, conversation: Conversation, question: str, max_new_tokens: int
) -> tuple[dict[str, Prepared | EngineTurn], dict[str, str]]:
    """Each side's prepared turn, or the reason it cannot run (its model, its context window)."""
    image = load_media(conversation) if conversation.media_kind == "image" else None
    prepared: dict[str, Prepared | EngineTurn] = {}
    errors: dict[str, str] = {}
    for side in SIDES:
        config = conversation.sides[side]
        try:
            messages = messages_for(conversation, side, question)
            if registry.is_engine(config.model):
                server, keep = registry.engines[config.model], conversation.keep_cache
                prepared[side] = prepare_engine_turn(server, messages, image, max_new_tokens, keep, config.mode)
                prepared[side].text = question
                if prepared[side].mode != config.mode:  # the server's settings now: the page shows them from here on
                    conversation.sides = {**conversation.sides, side: replace(config, mode=prepared[side].mode)}
                continue
            loaded = registry.ready(config.model)
            if image is None:
                prepared[side] = prepare_video(loaded, config.mode, conversation, messages, max_new_tokens)
            else:
                prepared[side] = prepare(loaded, config.mode, messages, image, max_new_tokens)
            prepared[side].messages, prepared[side].text = messages, question
            if image is not None and conversation.keep_cache:
                reuse_cache(prepared[side], conversation.caches.get(side))
        except Exception as error:
            errors[side] = describe_error(error)
    return prepared, errors


def reuse_cache(prepared: Prepared, cache: SideCache | None) -> None:
    """Build this turn on the side's cache when it serves the prompt; a text-dependent method then
    keeps the tokens it chose for the question of the turn that filled the cache."""
    length, prepared.cache_note = reusable_prefix(cache, prepared, prepared.loaded.model.config.image_token_id)
    if length:
        prepared.reuse, prepared.text = Reuse(cache, length), cache.question


def run_turn(
    registry: ModelRegistry,
    conversation: Conversation,
    question: str,
    max_new_tokens: int,
    stop: threading.Event | StopFlag,
) -> Iterator[Conversation]:
    """Ask `question` of both sides, one after the other (never at once, so their timings are
    comparable), the first side alternating per turn, then measure the quality signal.  Yields the
    conversation as it fills in.  The models must be loaded already (load_side_models).  A side that
    fails gets its error in its stats; raises TurnRefused (conversation untouched) only when no side can run."""
    question = question.strip()
    if not question:
        raise ValueError("Type a question first.")
    number = len(conversation.turns) + 1
    prepared, errors = prepare_sides(registry, conversation, question, max_new_tokens)
    if not prepared:
        raise TurnRefused(" / ".join(errors[side] for side in SIDES))

    turn = Turn(question, frames={side: p.frames for side, p in prepared.items() if isinstance(p, VideoPrepared)})
    for side, error in errors.items():
        turn.stats[side] = failed_stats(number, side, conversation.sides[side], error)
    conversation.turns.append(turn)
    order = SIDES if number % 2 == 1 else SIDES[::-1]
    for side in order:
        if side not in prepared or stop.is_set():
            continue
        turn.running = side
        keep = conversation.keep_cache and conversation.media_kind == "image"
        if isinstance(prepared[side], EngineTurn):
            stream = prepared[side].stream(number, side, max_new_tokens, stop, conversation.sides[side].model)
        else:
            stream = stream_side(prepared[side], number, side, max_new_tokens, stop, keep_cache=keep)
        try:
            yield conversation
            for answer, stats in stream:
                turn.answers[side] = answer
                if stats is not None:
                    turn.stats[side] = stats
                yield conversation
        except Exception as error:
            turn.stats[side] = failed_stats(
                number, side, conversation.sides[side], describe_error(error), prepared[side]
            )
        finally:  # also when the caller goes away mid-turn (cancelled, tab closed): stop generating now
            stream.close()
            turn.running = None
        if prepared[side].tokens is not None:
            turn.tokens[side] = prepared[side].tokens
    record_choices(conversation, turn, prepared)
    if not stop.is_set():
        assess_quality(conversation, turn, prepared, max_new_tokens)
    yield conversation


def record_choices(conversation: Conversation, turn: Turn, prepared: dict[str, Prepared]) -> None:
    """Per side: what its method chose this turn and for which question, and the cache the next turn reuses."""
    earlier = conversation.turns[-2] if len(conversation.turns) > 1 else None
    for side, this in prepared.items():
        if this.selection is not None:  # chosen this turn: for this question (text-dependent methods)
            turn.selections[side], turn.chosen_for[side] = this.selection, "this question"
            turn.chosen_by[side] = SideConfig(this.loaded.label, this.mode)
        elif this.reuse is not None and earlier is not None and side in earlier.selections:
            turn.selections[side] = earlier.selections[side]  # the visual tokens are the cached ones
            turn.chosen_for[side] = f"turn {this.reuse.cache.turn}'s question (frozen in the KV cache)"
            turn.chosen_by[side] = earlier.chosen_by.get(side, SideConfig(this.loaded.label, this.mode))
        if this.mode.reads_text and side in turn.chosen_for and side in turn.stats:
            turn.stats[side].chosen_for = turn.chosen_for[side]
        if this.cache is not None:
            conversation.caches[side] = this.cache
        elif side in conversation.caches and (not conversation.keep_cache or this.reuse is None):
            del conversation.caches[side]  # stale: the next turn must not build on it


def assess_quality(conversation: Conversation, turn: Turn, prepared: dict[str, Prepared], max_new_tokens: int) -> None:
    """Each reducing side's KL to the full model's first-token distribution on its own prompt, and,
    with the quality check on, the full side's answer scored under it (see app.quality)."""
    for side, this in prepared.items():
        stats = turn.stats.get(side)
        if not this.mode.enabled or this.output is None or stats is None or not stats.ok:
            continue
        other = prepared.get("left" if side == "right" else "right")
        full_side = other if other is not None and not other.mode.enabled and other.output is not None else None
        try:
            if full_side is not None and full_side.loaded is this.loaded and full_side.messages == this.messages:
                reference, stats.quality_reference = full_side.output.first_logprobs, "the full side, same prompt"
            elif conversation.quality_check:
                reference_prepared = reference_prefill(conversation, this, max_new_tokens)
                reference = first_token_logprobs(prompt_logits(reference_prepared)[-1])
                stats.quality_reference = "a reference prefill with every visual token"
            else:
                stats.quality_reference = "turn on the quality check (one reference prefill)"
                continue
            stats.kl_to_full = kl_divergence(reference, this.output.first_logprobs)
            if conversation.quality_check and full_side is not None and full_side.loaded is this.loaded:
                stats.full_answer_logprob, stats.full_answer_ppl = score_answer(this, full_side.output.answer_ids)
        except Exception as error:  # the answers stand; the measure says why it is missing
            stats.quality_reference = f"quality signal failed: {describe_error(error)}"


def reference_prefill(conversation: Conversation, this: Prepared, max_new_tokens: int) -> Prepared:
    """This side's prompt with every visual token, for the reference distribution."""
    if isinstance(this, VideoPrepared):
        return prepare_video(this.loaded, FULL_MODE, conversation, this.messages, max_new_tokens)
    return prepare(this.loaded, FULL_MODE, this.messages, load_media(conversation), max_new_tokens)
