"""`apply`: VisionZip on a stock transformers LLaVA model and its processor, switchable per call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .budget import Budget
from .merge import MERGE_MODES
from .patch import llava, llava_next
from .selection import ImageSelection
from .tower import SignalHooks, encoder_layers, feature_layer_index

_FAMILIES = {"LlavaNextModel": llava_next, "LlavaModel": llava}


@dataclass(frozen=True)
class Settings:
    enabled: bool
    budget: Budget
    merge: str = "sum"


@dataclass
class Call:
    """One `with handle.use(...)` block: its settings and what its image calls chose."""

    settings: Settings
    selection: list[ImageSelection] | None = None
    visual_tokens: list[int] = field(default_factory=list)


class VisionZip:
    """A handle on a model and processor that VisionZip was applied to.

    `enabled` and `set_budget` change the default for every caller; `use(...)` overrides them for
    the calls made inside its block, in this thread (or asyncio task) only.
    """

    def __init__(self, model: nn.Module, processor: Any, budget: Budget, merge: str, enabled: bool) -> None:
        base = model.model if hasattr(model, "model") and type(model.model).__name__ in _FAMILIES else model
        family = _FAMILIES.get(type(base).__name__)
        if family is None:
            raise TypeError(f"VisionZip supports LLaVA-NeXT and LLaVA-1.5 models, got {type(model).__name__}")
        self.model, self.processor, self.base, self.family = model, processor, base, family
        vision_config = base.config.vision_config
        if not any(name.endswith("class_embedding") for name, _ in base.vision_tower.named_parameters()):
            raise ValueError(
                f"VisionZip ranks tokens by the CLS token's attention; {type(base.vision_tower).__name__} has no CLS token"
            )
        self.side = vision_config.image_size // vision_config.patch_size
        self.tokens_per_tile = self.side * self.side + 1  # CLS + patches
        layers = encoder_layers(base.vision_tower)
        self.layer_index = feature_layer_index(base.config.vision_feature_layer, len(layers))
        self._default = Settings(enabled, self._checked(budget), self._checked_merge(merge))
        self._current: ContextVar[Call | None] = ContextVar(f"visionzip_call_{id(self)}", default=None)
        self._last_selection: list[ImageSelection] | None = None
        self._unpatch = family.patch(self)
        self._hooks = SignalHooks(layers[self.layer_index])

    # -- settings -------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        call = self._current.get()
        return call.settings if call is not None else self._default

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._default = replace(self._default, enabled=bool(value))

    @property
    def budget(self) -> Budget:
        return self.settings.budget

    def set_budget(self, dominant: int, contextual: int) -> None:
        self._default = replace(self._default, budget=self._checked(Budget(dominant, contextual)))

    @contextlib.contextmanager
    def use(
        self,
        enabled: bool | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        merge: str | None = None,
    ) -> Iterator[Call]:
        """Settings for the calls inside the block only; yields a `Call` that records them."""
        base = self.settings
        budget = Budget(
            base.budget.dominant if dominant is None else dominant,
            base.budget.contextual if contextual is None else contextual,
        )
        settings = Settings(
            base.enabled if enabled is None else bool(enabled),
            self._checked(budget),
            self._checked_merge(base.merge if merge is None else merge),
        )
        call = Call(settings)
        token = self._current.set(call)
        try:
            yield call
        finally:
            self._current.reset(token)

    # -- what was chosen ------------------------------------------------------------------------
    @property
    def last_selection(self) -> list[ImageSelection] | None:
        """Per image of the last VisionZip call: inside `use()`, that block's; otherwise the
        latest in any thread (read `Call.selection` when several threads share the model)."""
        call = self._current.get()
        return call.selection if call is not None else self._last_selection

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens one image of (height, width) becomes under the current settings."""
        return self.family.num_image_tokens(self, image_size, self.settings)

    def remove(self) -> None:
        """Undo `apply`: the model and processor are stock again."""
        self._hooks.remove()
        self._unpatch()

    # -- internals used by the patches ------------------------------------------------------------
    def capture(self, attention: bool = True):
        return self._hooks.capture(attention)

    def record(self, selection: list[ImageSelection]) -> None:
        self._last_selection = selection
        call = self._current.get()
        if call is not None:
            call.selection = selection
            call.visual_tokens = [image.num_tokens for image in selection]

    def _checked(self, budget: Budget) -> Budget:
        return budget.check(self.tokens_per_tile)

    @staticmethod
    def _checked_merge(merge: str) -> str:
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        return merge


def apply(
    model: nn.Module,
    processor: Any = None,
    dominant: int = 54,
    contextual: int = 10,
    *,
    merge: str = "sum",
    enabled: bool = True,
) -> VisionZip:
    """Apply VisionZip to a stock `LlavaNextForConditionalGeneration` / `LlavaForConditionalGeneration`
    (or their base models) and, if given, its processor.  Weights are untouched and shared."""
    return VisionZip(model, processor, Budget(dominant, contextual), merge, enabled)
