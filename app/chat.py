"""One conversation about one image or video clip, asked of two sides, and one turn run on one side.

Every turn re-prefills the whole conversation (built with the model's chat template), so the
saving VisionZip makes on the visual tokens shows on every turn, not only the first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

import visionzip
from app.media import load_image
from app.models import LoadedModel, ModelLoadError, ModelRegistry, clock
from app.stats import TurnStats
from app.video import DEFAULT_FRAMES, Clip, load_clip, same_budget_frames
from visionzip.projector import use_projector
from visionzip.video import (
    frame_features,
    frame_pixel_values,
    tokens_per_frame,
    video_input_ids,
    video_inputs,
    video_prompt,
)

SIDES = ("left", "right")
FULL = "Full"  # every visual token: no VisionZip
CUSTOM = "Custom D/C"
PRESET_PREFIX = "VisionZip "


# -- modes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    name: str  # as chosen in the UI: FULL, "VisionZip 320", CUSTOM
    enabled: bool
    dominant: int = 0
    contextual: int = 0
    tuned: str | None = None  # the tuned projector's description ("trained at 54+10, 200 steps"); None: the model's own

    @property
    def label(self) -> str:
        budget = f"VisionZip {self.dominant}+{self.contextual}/tile" if self.enabled else "full"
        return budget + (f" + tuned projector ({self.tuned})" if self.tuned else "")

    @property
    def key(self) -> tuple[bool, int, int, bool]:
        return (self.enabled, self.dominant, self.contextual, self.tuned is not None)


def mode_choices(family: str) -> list[str]:
    """FULL, the paper's presets for this model family (largest first), CUSTOM."""
    return [FULL] + [f"{PRESET_PREFIX}{n}" for n in sorted(visionzip.PRESETS[family], reverse=True)] + [CUSTOM]


def make_mode(
    name: str, family: str, dominant: float | None = None, contextual: float | None = None, tokens_per_tile: int = 577
) -> Mode:
    """The Mode a UI choice names; raises ValueError (with the limits) for a budget that a tile of
    `tokens_per_tile` tokens (CLS + patches; 577 for CLIP-L/14-336) cannot meet."""
    if name == FULL:
        return Mode(FULL, False)
    if name == CUSTOM:
        budget = visionzip.Budget(_whole(dominant, "dominant"), _whole(contextual, "contextual"))
    elif name.startswith(PRESET_PREFIX):
        budget = visionzip.preset_budget(family, name.removeprefix(PRESET_PREFIX))
    else:
        raise ValueError(f"unknown mode {name!r}; choose one of {mode_choices(family)}")
    budget.check(tokens_per_tile)
    return Mode(name, True, budget.dominant, budget.contextual)


def translate_mode(mode: Mode, family: str) -> Mode:
    """The same mode for another model family: presets map by rank (640 <-> 192, 320 <-> 128,
    160 <-> 64), as the paper pairs them; full and custom budgets carry over."""
    if not mode.name.startswith(PRESET_PREFIX) or mode.name in mode_choices(family):
        return mode
    for presets in visionzip.PRESETS.values():
        ranked = sorted(presets, reverse=True)
        name = int(mode.name.removeprefix(PRESET_PREFIX))
        if name in ranked:
            target = sorted(visionzip.PRESETS[family], reverse=True)[ranked.index(name)]
            return make_mode(f"{PRESET_PREFIX}{target}", family)
    raise ValueError(f"unknown preset {mode.name!r}")


def tuned_mode(mode: Mode, loaded: LoadedModel, tuned: bool) -> Mode:
    """`mode` with `loaded`'s tuned projector, or with the model's own.  The projector's weights
    load here, so one that does not fit fails when chosen (ModelLoadError), not mid-turn."""
    if not tuned:
        return replace(mode, tuned=None)
    loaded.tuned_projector()
    return replace(mode, tuned=loaded.projector.describe())


def _whole(value: float | None, name: str) -> int:
    if value is None or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


# -- conversation state (plain data, one per browser session) -------------------------------------
@dataclass
class SideConfig:
    model: str  # registry label
    mode: Mode


@dataclass
class Turn:
    question: str
    answers: dict[str, str] = field(default_factory=lambda: {side: "" for side in SIDES})
    stats: dict[str, TurnStats] = field(default_factory=dict)  # filled when a side finishes
    running: str | None = None  # the side generating now
    frames: dict[str, int] = field(default_factory=dict)  # video: the frames each side saw


@dataclass
class Conversation:
    sides: dict[str, SideConfig]
    media_path: str | None = None
    media_kind: str = "image"  # "image" or "video": the kind of the conversation's upload
    turns: list[Turn] = field(default_factory=list)
    num_frames: int = DEFAULT_FRAMES  # video: frames sampled for a full side
    same_budget: bool = False  # video: a VisionZip side gets as many frames as fit in a full side's tokens

    def all_stats(self) -> list[TurnStats]:
        return [turn.stats[side] for turn in self.turns for side in SIDES if side in turn.stats]


def media_block(conversation: Conversation) -> dict:
    return {"type": conversation.media_kind}


def load_media(conversation: Conversation) -> Image.Image:
    if conversation.media_path is None:
        raise ValueError("Upload an image first: every question is about the conversation's image.")
    image, _ = load_image(conversation.media_path)
    return image


def messages_for(conversation: Conversation, side: str, question: str) -> list[dict]:
    """The chat so far as this side saw it (its own answers), then `question`; the image goes
    with the first user message."""
    questions = [turn.question for turn in conversation.turns] + [question]
    answers = [turn.answers[side] for turn in conversation.turns]
    messages = []
    for index, text in enumerate(questions):
        content = [media_block(conversation)] if index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        if index < len(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[index]}]})
    return messages


# -- one side, one turn ---------------------------------------------------------------------------
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

    @property
    def context_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def warm_key(self) -> tuple:
        return self.mode.key

    def encode(self):
        """The vision tower (+ VisionZip) on this turn's image, in the caller's `use()` block."""
        inputs = self.inputs
        return self.loaded.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes")
        )

    def generate_inputs(self, features) -> dict:
        """The keyword arguments `generate` takes for this turn, the image's features already computed."""
        text_inputs = {key: value for key, value in self.inputs.items() if key not in ("pixel_values", "image_sizes")}
        return dict(**text_inputs, mm_encoder_outputs={"image": features})


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

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.token_times.append(clock(self.device))
        super().put(value)


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


@contextmanager
def use_mode(loaded: LoadedModel, mode: Mode) -> Iterator[visionzip.Call]:
    """The handle's `use()` block for `mode`, with the mode's projector (tuned or the model's own),
    for this thread only: the other side, on the same weights, keeps its own."""
    budget = dict(dominant=mode.dominant, contextual=mode.contextual) if mode.enabled else {}
    projector = loaded.tuned_projector() if mode.tuned else None
    if projector is not None and mode.enabled:
        budget["merge"] = projector.info.merge  # a projector runs under the merge it was trained with
    with loaded.handle.use(enabled=mode.enabled, **budget) as call, use_projector(loaded.model, projector):
        yield call


def _generate_kwargs(prepared: Prepared, features, max_new_tokens: int) -> dict:
    return dict(**prepared.generate_inputs(features), max_new_tokens=max_new_tokens, do_sample=False)


def warm_up(prepared: Prepared) -> None:
    """One untimed pass per model and mode, so the timed turns skip one-off costs (kernel
    selection, allocator growth, lazy initialisation)."""
    loaded = prepared.loaded
    if prepared.warm_key in loaded.warmed:
        return
    with torch.inference_mode(), use_mode(prepared.loaded, prepared.mode):
        loaded.model.generate(**_generate_kwargs(prepared, prepared.encode(), 1))
    loaded.warmed.add(prepared.warm_key)


def stream_side(
    prepared: Prepared, turn: int, side: str, max_new_tokens: int, stop: threading.Event | StopFlag
) -> Iterator[tuple[str, TurnStats | None]]:
    """Run one side: yields (answer so far, None) per streamed piece, then (answer, stats)."""
    loaded = prepared.loaded
    warm_up(prepared)
    with torch.inference_mode(), use_mode(prepared.loaded, prepared.mode):
        start = clock(loaded.device)
        features = prepared.encode()
        vision_end = clock(loaded.device)

    streamer = TimedStreamer(loaded.processor.tokenizer, loaded.device)
    failure: list[BaseException] = []

    def generate() -> None:
        try:  # contextvars do not follow a new thread: enter the mode here
            with torch.inference_mode(), use_mode(prepared.loaded, prepared.mode):
                loaded.model.generate(
                    **_generate_kwargs(prepared, features, max_new_tokens),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                )
        except BaseException as error:
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=generate, name=f"generate-{side}", daemon=True)
    worker.start()
    answer, finished = "", False
    try:
        for piece in streamer:
            answer += piece
            yield answer, None
        finished = True
    finally:
        if not finished:  # the caller went away (stop button, closed tab): end generation too
            stop.set()
        worker.join()
    if failure:
        raise failure[0]

    times = streamer.token_times
    new_tokens = len(times)
    decode_s = times[-1] - times[0] if new_tokens > 1 else 0.0
    yield (
        answer,
        TurnStats(
            turn=turn,
            side=side,
            model=loaded.label,
            mode=prepared.mode.label,
            visual_tokens=prepared.visual_tokens,
            text_tokens=prepared.text_tokens,
            context_tokens=prepared.context_tokens,
            vision_ms=(vision_end - start) * 1000,
            prefill_ms=(times[0] - start) * 1000 if times else 0.0,
            decode_tokens_per_s=(new_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            new_tokens=new_tokens,
            kv_cache_bytes=kv_cache_bytes(loaded.model.config, prepared.context_tokens + new_tokens, loaded.dtype),
            device=str(loaded.device),
        ),
    )


def failed_stats(turn: int, side: str, config: SideConfig, error: str, prepared: Prepared | None = None) -> TurnStats:
    visual, text = (prepared.visual_tokens, prepared.text_tokens) if prepared else (0, 0)
    return TurnStats(
        turn, side, config.model, config.mode.label, visual, text, visual + text, 0.0, 0.0, 0.0, 0, 0, error=error
    )


def describe_error(error: BaseException) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "Out of GPU memory on this side. Try a smaller model, VisionZip, or clear the conversation."
    if isinstance(error, (ValueError, ModelLoadError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


# -- video: every frame one 336x336 tile, packed in time order (visionzip.video) ------------------
@dataclass
class VideoPrepared(Prepared):
    """One side's turn over a clip: `inputs` holds the prompt's `input_ids` (frame placeholders
    expanded) and the frames' `pixel_values`."""

    frames: int

    @property
    def warm_key(self) -> tuple:
        return ("video", *self.mode.key)

    def encode(self):
        """(frames, tokens a frame, E) features, one ImageSelection per frame on the handle."""
        return frame_features(self.loaded.handle, self.inputs["pixel_values"])

    def generate_inputs(self, features) -> dict:
        return video_inputs(self.loaded.model, self.inputs["input_ids"], features)


def side_frame_count(loaded: LoadedModel, mode: Mode, conversation: Conversation) -> int:
    """Frames this side sees: the slider's count or, in "same budget" mode on a VisionZip side, as
    many as fit in the tokens that many full frames take (at most the clip's frames)."""
    clip = load_clip(conversation.media_path, conversation.num_frames)
    if not (conversation.same_budget and mode.enabled):
        return len(clip.frames)
    with loaded.handle.use(enabled=False):
        full = tokens_per_frame(loaded.handle)
    with use_mode(loaded, mode):
        reduced = tokens_per_frame(loaded.handle)
    return same_budget_frames(len(clip.frames), full, reduced, clip.info["total_frames"])


def video_tokens(
    loaded: LoadedModel, mode: Mode, conversation: Conversation, messages: list[dict], max_new_tokens: int
) -> tuple[Clip, torch.Tensor, int]:
    """This side's clip, the prompt's (1, L) token ids and the tokens a frame takes; raises
    ContextTooLong when the turn would not fit, before decoding frames that never could."""
    frames = side_frame_count(loaded, mode, conversation)
    with use_mode(loaded, mode):
        per_frame = tokens_per_frame(loaded.handle)

    def refuse_if_too_long(needed: int, what: str) -> None:
        if needed + max_new_tokens > loaded.context_window:
            advice = (
                "Use fewer frames, or a smaller VisionZip budget."
                if mode.enabled
                else "Use fewer frames, or VisionZip."
            )
            raise ContextTooLong(
                f"{loaded.label} ({mode.label}): {frames} frames x {per_frame} = {frames * per_frame:,} visual tokens"
                f"{what} + {max_new_tokens} new tokens do not fit its {loaded.context_window:,}-token context "
                f"window, so this side does not run. {advice}"
            )

    refuse_if_too_long(frames * per_frame, "")
    clip = load_clip(conversation.media_path, frames)
    input_ids = video_input_ids(
        loaded.processor, video_prompt(loaded.processor, messages, clip.timestamps_s), per_frame
    )
    text_tokens = input_ids.shape[1] - len(clip.frames) * per_frame
    refuse_if_too_long(len(clip.frames) * per_frame + text_tokens, f" + {text_tokens} text")
    return clip, input_ids, per_frame


def prepare_video(
    loaded: LoadedModel, mode: Mode, conversation: Conversation, messages: list[dict], max_new_tokens: int
) -> VideoPrepared:
    """Tokenise the conversation over this side's frames; raise ContextTooLong before anything runs."""
    clip, input_ids, per_frame = video_tokens(loaded, mode, conversation, messages, max_new_tokens)
    pixel_values = frame_pixel_values(loaded.processor, clip.frames).to(loaded.device, loaded.dtype)
    visual = len(clip.frames) * per_frame
    inputs = {"input_ids": input_ids.to(loaded.device), "pixel_values": pixel_values}
    return VideoPrepared(loaded, mode, inputs, visual, input_ids.shape[1] - visual, frames=len(clip.frames))


def frame_selections(
    loaded: LoadedModel, frames: tuple[Image.Image, ...], mode: Mode
) -> list[visionzip.ImageSelection]:
    """What VisionZip keeps and merges on each frame under `mode`'s budget: the vision tower alone."""
    pixel_values = frame_pixel_values(loaded.processor, frames).to(loaded.device, loaded.dtype)
    with torch.inference_mode(), use_mode(loaded, mode) as call:
        frame_features(loaded.handle, pixel_values)
    return call.selection


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


def run_turn(
    registry: ModelRegistry,
    conversation: Conversation,
    question: str,
    max_new_tokens: int,
    stop: threading.Event | StopFlag,
) -> Iterator[Conversation]:
    """Ask `question` of both sides, one after the other (never at once, so their timings are
    comparable), the first side alternating per turn.  Yields the conversation as it fills in.
    The models must be loaded already (load_side_models).  A side that fails gets its error in its
    stats; raises TurnRefused (conversation untouched) only when no side can run."""
    question = question.strip()
    if not question:
        raise ValueError("Type a question first.")
    image = load_media(conversation) if conversation.media_kind == "image" else None
    number = len(conversation.turns) + 1
    prepared: dict[str, Prepared] = {}
    errors: dict[str, str] = {}
    for side in SIDES:
        config = conversation.sides[side]
        try:
            loaded = registry.ready(config.model)
            messages = messages_for(conversation, side, question)
            if image is None:
                prepared[side] = prepare_video(loaded, config.mode, conversation, messages, max_new_tokens)
            else:
                prepared[side] = prepare(loaded, config.mode, messages, image, max_new_tokens)
        except Exception as error:
            errors[side] = describe_error(error)
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
        stream = stream_side(prepared[side], number, side, max_new_tokens, stop)
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
    yield conversation


def image_selection(loaded: LoadedModel, image: Image.Image, mode: Mode) -> visionzip.ImageSelection:
    """What VisionZip keeps and merges on `image` under `mode`'s budget: the vision tower alone,
    no language model, so the overlay follows the budget without re-running the chat."""
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")
    sizes = torch.tensor([[image.height, image.width]])
    with torch.inference_mode(), use_mode(loaded, mode) as call:
        loaded.model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(loaded.device, loaded.dtype), image_sizes=sizes
        )
    return call.selection[0]
