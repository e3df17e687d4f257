"""What one call runs (`Settings`), what it chose (`Call`), and what the methods and model families
read of the handle (`Handle`).

A module of its own, importing only leaves, so that `core` (the handle) can import the methods and the
families, and they can name these types, without an import circle."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .budget import Budget
from .selection import ImageSelection

if TYPE_CHECKING:
    from .tower import TowerSignals


@dataclass(frozen=True)
class Settings:
    """What one call runs: stock (`enabled=False`) or `method` under its budget."""

    enabled: bool
    budget: Budget  # VisionZip's (dominant, contextual) per tile
    merge: str = "sum"  # VisionZip's merge rule
    method: str = "visionzip"  # a name in visionzip.methods.METHODS
    tokens: int | None = None  # every other method's budget, per tile or per image by its rule
    seed: int = 0  # methods that draw at random use a generator seeded with this, per call
    fastv_layer: int = 2  # FastV's K: layer K-1's attention ranks, layers K.. run on the kept tokens
    text: str | None = None  # the question, for methods that choose by it (CDPruner)

    def describe(self, family: str | None = None) -> str:
        """The method and its budget as the page and the records put it, or "full"; `family` (a PRESETS
        key) says what the budget counts there (per tile, or per image); None: the method's own rule."""
        from .methods import get_method  # at call time: the registry's modules import this one

        return get_method(self.method).describe(self, family) if self.enabled else "full"


@dataclass
class Call:
    """One `with handle.use(...)` block: its settings and what its image calls chose."""

    settings: Settings
    selection: list[ImageSelection] | None = None
    visual_tokens: list[int] = field(default_factory=list)
    layer_tokens: list[int] | None = None  # FastV: image tokens each language-model layer ran on (last prefill)
    text_tower: str | None = None  # CDPruner: which CLIP text tower scored the question
    text_embeds: torch.Tensor | None = None  # CDPruner: the question's embedding by it, computed once per call


class Handle(Protocol):
    """What the methods and model families use of `visionzip.core.VisionZip`."""

    model: nn.Module  # as passed to apply()
    base: nn.Module  # the family's base model (model.model), which owns the vision tower
    family: Any  # the family's module in `visionzip.patch` (its optional functions: see there)
    processor: Any
    side: int  # patches per tile side (24 for CLIP-L/14-336)
    cls_tokens: int  # CLS tokens per tile before its patches: 1 (CLIP), 0 (SigLIP)
    layer_index: int  # the feature layer among the tower's encoder layers

    @property
    def settings(self) -> Settings: ...

    def capture(self, attention: bool = True) -> AbstractContextManager[TowerSignals]: ...

    def current_call(self) -> Call | None: ...

    def record(self, selection: list[ImageSelection]) -> None: ...

    @property
    def last_selection(self) -> list[ImageSelection] | None: ...

    def remove(self) -> None: ...

    def use(self, *args: Any, **kwargs: Any) -> AbstractContextManager[Call]: ...
