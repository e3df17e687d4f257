"""What a side runs (a `Mode`: full, or a method and its budget), the choices the page offers, and
the library's `use()` block that puts a mode in force for one call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import visionzip
from app.models import LoadedModel
from visionzip.projector import use_projector

FULL = "Full"  # every visual token: no reduction
CUSTOM = "Custom D/C"
PRESET_PREFIX = "VisionZip "


@dataclass(frozen=True)
class Mode:
    """What one side runs: the stock model, or a reduction method (visionzip.METHODS) and its budget."""

    name: str  # as chosen in the UI: FULL, "VisionZip 320", CUSTOM
    enabled: bool
    dominant: int = 0  # VisionZip's budget per tile
    contextual: int = 0
    tuned: str | None = None  # the tuned projector's description ("trained at 54+10, 200 steps"); None: the model's own
    method: str = "visionzip"  # a name in visionzip.METHODS
    tokens: int | None = None  # every other method's budget (per tile or per image, by its rule)
    seed: int = 0  # methods that draw at random

    @property
    def label(self) -> str:
        return self.settings().describe() + (f" + tuned projector ({self.tuned})" if self.tuned else "")

    @property
    def key(self) -> tuple:
        return (
            self.enabled,
            self.method,
            self.dominant,
            self.contextual,
            self.tokens,
            self.seed,
            self.tuned is not None,
        )

    def settings(self, merge: str = "sum") -> visionzip.Settings:
        """The library's settings for this mode (not checked against a model: `use_mode` does that)."""
        budget = visionzip.Budget(self.dominant, self.contextual) if self.enabled else visionzip.Budget(1, 0)
        return visionzip.Settings(self.enabled, budget, merge, self.method, self.tokens, self.seed)


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


@contextmanager
def use_mode(loaded: LoadedModel, mode: Mode) -> Iterator[visionzip.Call]:
    """The handle's `use()` block for `mode`, with the mode's projector (tuned or the model's own),
    for this thread only: the other side, on the same weights, keeps its own."""
    budget = {}
    if mode.enabled:
        budget = dict(method=mode.method, tokens=mode.tokens, seed=mode.seed)
        if mode.method == "visionzip":
            budget.update(dominant=mode.dominant, contextual=mode.contextual)
    projector = loaded.tuned_projector() if mode.tuned else None
    if projector is not None and mode.enabled:
        budget["merge"] = projector.info.merge  # a projector runs under the merge it was trained with
    with loaded.handle.use(enabled=mode.enabled, **budget) as call, use_projector(loaded.model, projector):
        yield call
