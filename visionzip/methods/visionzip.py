"""VisionZip (Yang et al., CVPR 2025): per tile, the CLS token and the D-1 patches the CLS attends to
most, plus C contextual tokens merged from the rest around evenly spaced targets (`visionzip.merge`).

A tower without a CLS token (SigLIP, LLaVA-OneVision's): the authors' official code covers CLIP only
(github.com/dvlab-research/VisionZip, `visionzip/utils.py` reads the CLS row) and publishes no rule.
Ours: the D patches that receive the most attention at the feature layer, averaged over all queries and
summed over heads (`merge.received_attention`); no CLS token, so D counts patches only; contextual
merging unchanged.  Why: with no CLS query, the mean over every query is the layer's one query-free
ranking, and it is what the authors' own demo draws as patch attention (`gradio_demo.py`,
`compute_patch_attention`: the map averaged over queries and heads).  The same rule serves
dominant-only and VisPruner's important patches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..budget import PRESETS
from ..merge import choose_tokens, merge_tokens
from ..selection import tile_selections
from .base import MERGED, Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tower import TowerSignals


class VisionZipMethod(Method):
    name = "visionzip"
    title = "VisionZip"
    stage = "vision tower"
    budget_rule = "per tile"
    reference = "arXiv 2412.04467 (CVPR 2025); github.com/dvlab-research/VisionZip"
    needs_attention = True
    keeps_cls = True
    kept_as = "dominant: highest CLS attention"
    budget_kind = "dominant+contextual"
    merged_as = "contextual group"

    def check(self, settings: Settings, side: int) -> None:
        settings.budget.check(side * side + 1)  # the handle checks it too; a method checks its own budget

    def describe(self, settings: Settings, family: str | None = None) -> str:
        return f"VisionZip {settings.budget.dominant}+{settings.budget.contextual}{self.unit(family)}"

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.budget.per_tile

    def presets(self, family: str) -> dict[int, int]:
        """VisionZip's presets are (dominant, contextual) splits: `visionzip.PRESETS`; here, their sizes."""
        return {name: sum(split) for name, split in sorted(PRESETS[family].items(), reverse=True)}

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        budget = settings.budget
        cls_tokens = signals.cls_tokens
        choice = choose_tokens(signals.cls_attn, signals.keys_mean, budget.dominant, budget.contextual, cls_tokens)
        tokens = merge_tokens(signals.hidden, choice, settings.merge)  # (T, D+K, C): CLS, dominant, contextual
        positions = token_positions(choice.dominant, budget.contextual, cls_tokens)
        selections = tile_selections(choice, signals.cls_attn, signals.side, cls_tokens)
        return TileOutput(project(tokens), positions, selections)


def token_positions(dominant: torch.Tensor, contextual: int, cls_tokens: int = 1) -> torch.Tensor:
    """(T, D) dominant token positions (CLS first, if any) -> (T, D + K) positions of VisionZip's output tokens."""
    num_tiles = dominant.shape[0]
    # token position -> patch raster index; a CLS token (position 0) becomes -1, which is CLS
    patches = dominant - cls_tokens
    merged = torch.full((num_tiles, contextual), MERGED, dtype=torch.long, device=dominant.device)
    return torch.cat([patches, merged], dim=1)
