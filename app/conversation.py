"""One conversation about one image or video clip, asked of two sides: plain data, one per browser
session, and the chat messages each side sees (its own answers, through the model's chat template)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from app.media import load_image
from app.modes import Mode
from app.stats import TurnStats
from app.video import DEFAULT_FRAMES

SIDES = ("left", "right")


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
    selections: dict[str, list] = field(default_factory=dict)  # what each side's method chose (ImageSelections)
    chosen_for: dict[str, str] = field(default_factory=dict)  # "this question", or the earlier turn it froze
    tokens: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # per side: (ms since its start, text)
    measured_on: dict | None = (
        None  # a recorded turn: where, on what and with which models it was measured (app.recording)
    )
    chosen_by: dict[str, SideConfig] = field(default_factory=dict)  # the model and mode that made `selections`


@dataclass
class Conversation:
    sides: dict[str, SideConfig]
    media_path: str | None = None
    media_kind: str = "image"  # "image" or "video": the kind of the conversation's upload
    turns: list[Turn] = field(default_factory=list)
    num_frames: int = DEFAULT_FRAMES  # video: frames sampled for a full side
    same_budget: bool = False  # video: a VisionZip side gets as many frames as fit in a full side's tokens
    quality_check: bool = False  # one more forward per reducing side: reference KL and the full answer scored
    keep_cache: bool = False  # later turns prefill only their new text on top of each side's KV cache
    caches: dict = field(default_factory=dict, repr=False, compare=False)  # side -> app.turn.SideCache

    def __getstate__(self) -> dict:
        # A KV cache stays in the process that made it: on ZeroGPU it would not survive the worker anyway,
        # and the page's state is pickled there on every streamed update.
        return {**self.__dict__, "caches": {}}

    def latest_choice(self, side: str) -> Turn | None:
        """The latest turn that recorded what `side`'s method chose (a text-dependent method's choice)."""
        return next((turn for turn in reversed(self.turns) if side in turn.selections), None)

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
