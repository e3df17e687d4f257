"""What a side's method chose, with who chose it: the one record every drawn view of a choice (the
overlay, the difference view, the filmstrip) takes its labels from, so a picture is never named after
settings that did not make it (issue 23: a side switched from CDPruner to FastV showed CDPruner's choice
under FastV's name)."""

from __future__ import annotations

from dataclasses import dataclass

import visionzip
from app.conversation import Conversation, SideConfig, Turn
from app.modes import Mode
from app.render import SIDE_NAMES


@dataclass(frozen=True)
class ShownChoice:
    """Selections (one per image or frame) and the side, model, mode and turn that produced them."""

    selections: list[visionzip.ImageSelection]
    side: str
    model: str  # registry label of the model whose tower chose
    mode: Mode  # the mode in force when it chose
    turn: int | None = None  # 1-based turn whose prompt chose it; None: chosen now, from the picture alone
    question: str | None = None  # the question it was chosen for (text-dependent methods)
    chosen_for: str = ""  # the turn's words: "this question", or "turn 1's question (frozen in the KV cache)"
    on_demand: bool = False  # chosen now for `turn`'s question, which itself ran other settings
    note: str = ""  # why this is not what the side's last turn used, when that differs

    @property
    def selection(self) -> visionzip.ImageSelection:
        return self.selections[0]

    @property
    def label(self) -> str:
        """The method and budget that chose, e.g. "CDPruner 64/tile"."""
        return self.mode.label

    def title(self) -> str:
        """The header line of every view of this choice: side, model, method and budget."""
        return f"**{SIDE_NAMES[self.side]} side**: {self.model}, {self.label}."

    def provenance(self) -> str:
        """When and for what it was chosen, in one sentence ("" for a text-agnostic choice with no note)."""
        if self.on_demand:
            said = f"Chosen now by {self.label} for turn {self.turn}'s question: “{self.question}”."
        elif self.turn is not None:
            said = f"Chosen on turn {self.turn} for **{self.chosen_for}**: “{self.question}”."
        else:
            said = ""
        return " ".join(part for part in (self.note, said) if part)

    def header(self) -> str:
        """Provenance and title, as Markdown paragraphs."""
        return "\n\n".join(part for part in (self.provenance(), self.title()) if part)


def same_settings(made_by: SideConfig | None, config: SideConfig) -> bool:
    """Whether a choice made under `made_by` is what `config` would run (model and every budget setting)."""
    return made_by is not None and made_by.model == config.model and made_by.mode.key == config.mode.key


def recorded_choice(conversation: Conversation, side: str) -> ShownChoice | None:
    """The latest turn's record of what `side`'s method chose, if the side still runs the settings
    that chose it; None when there is none or the settings changed since."""
    latest = conversation.latest_choice(side)
    if latest is None:
        return None
    config = conversation.sides[side]
    made_by = latest.chosen_by.get(side)
    stats = latest.stats.get(side)
    if made_by is None and stats is not None and (stats.model, stats.mode) == (config.model, config.mode.label):
        made_by = config  # a turn recorded without it (a saved conversation): its stats name what ran
    if not same_settings(made_by, config):
        return None
    return ShownChoice(
        latest.selections[side],
        side,
        made_by.model,
        made_by.mode,
        turn=conversation.turns.index(latest) + 1,
        question=latest.question,
        chosen_for=latest.chosen_for[side],
    )


def last_turn_ran(conversation: Conversation, side: str) -> tuple[int, Turn] | None:
    """(number, turn) of the latest turn this side answered, if any."""
    for number in range(len(conversation.turns), 0, -1):
        turn = conversation.turns[number - 1]
        if side in turn.stats:
            return number, turn
    return None


def changed_note(conversation: Conversation, side: str) -> str:
    """ "Turn 2 ran CDPruner 64/tile on Tiny ...; the right side now runs FastV ..." when the side's model or
    mode changed since its latest turn, else ""."""
    last = last_turn_ran(conversation, side)
    if last is None:
        return ""
    number, turn = last
    config, stats = conversation.sides[side], turn.stats[side]
    if stats.model == config.model and stats.mode == config.mode.label:
        return ""
    return (
        f"Settings changed since turn {number}, which ran {stats.mode} on {stats.model}: the "
        f"{side} side now runs {config.mode.label} on {config.model}."
    )


def waiting_message(conversation: Conversation, side: str) -> str:
    """Why a text-dependent side has no choice to draw, and what would show one."""
    config = conversation.sides[side]
    title = config.mode.method_title
    note = changed_note(conversation, side)
    if not conversation.turns:
        return f"{title} chooses by the question: ask one to see which tokens it keeps for it."
    if config.mode.inside_llm:
        return f"{note} Ask a question to see {title}'s choice (it chooses inside the language model).".strip()
    return f"{note} Ask a question to see {title}'s choice.".strip()


def choice_of(conversation: Conversation, side: str, selection: visionzip.ImageSelection) -> ShownChoice:
    """The record of a bare selection (a caller that kept only the selection, e.g. a replayed recording):
    the turn that holds it names its model, mode, turn and question; one no turn holds was chosen now,
    under the side's settings."""
    config = conversation.sides[side]
    for number, turn in enumerate(conversation.turns, start=1):
        if any(chosen is selection for chosen in turn.selections.get(side, [])):
            made_by = turn.chosen_by.get(side, config)
            return ShownChoice(
                turn.selections[side],
                side,
                made_by.model,
                made_by.mode,
                turn=number,
                question=turn.question,
                chosen_for=turn.chosen_for.get(side, "this question"),
            )
    return ShownChoice([selection], side, config.model, config.mode)
