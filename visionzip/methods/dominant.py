"""VisionZip with dominant tokens only (contextual = 0), as the authors' own chat demo runs it: per
tile the CLS token and the tokens-1 patches the CLS attends to most; the rest are dropped."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..merge import choose_tokens, merge_tokens
from ..selection import tile_selections
from .base import Method, TileOutput
from .visionzip import token_positions

if TYPE_CHECKING:
    from ..settings import Handle, Settings
    from ..tower import TowerSignals


class DominantOnly(Method):
    name = "visionzip_dominant"
    title = "VisionZip dominant-only"
    stage = "vision tower"
    budget_rule = "per tile"
    reference = "arXiv 2412.04467 (CVPR 2025); github.com/dvlab-research/VisionZip (its demo: contextual 0)"
    needs_attention = True
    keeps_cls = True
    kept_as = "dominant: highest CLS attention"

    def check(self, settings: Settings, side: int) -> None:
        tokens = settings.tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= side * side + 1:
            raise ValueError(
                f"{self.title}: tokens={tokens!r} is out of range; a tile has {side * side + 1} tokens "
                f"(1 CLS + {side * side} patches) and the count includes the CLS token"
            )

    def check_model(self, settings: Settings, handle: Handle) -> None:
        if not handle.cls_tokens and settings.tokens > handle.side * handle.side:
            raise ValueError(
                f"{self.title}: tokens={settings.tokens} is out of range; a tile of this tower has "
                f"{handle.side * handle.side} patches and no CLS token"
            )

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.tokens

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        cls_tokens = signals.cls_tokens
        choice = choose_tokens(signals.cls_attn, signals.keys_mean, settings.tokens, 0, cls_tokens)
        tokens = merge_tokens(signals.hidden, choice)  # (T, tokens, C): CLS first (if any), then patches ascending
        positions = token_positions(choice.dominant, 0, cls_tokens)
        selections = tile_selections(choice, signals.cls_attn, signals.side, cls_tokens)
        return TileOutput(project(tokens), positions, selections)
