"""VisPruner (Zhang et al., ICCV 2025): per tile, T_imp = int(T r) important patches by the feature
layer's CLS attention, then T - T_imp diverse ones from the rest by ToMe-style duplicate removal on
the patch states; kept in ascending raster order, then projected.  r = 0.5 as in the official scripts.

LLaVA-NeXT: every tile keeps T (the official code strips `_unpad`), packed in raster order over the
stitched grid with no newline tokens: the family's per-tile layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..merge import take_tokens
from ..selection import kept_tiles
from .base import Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tower import TowerSignals

IMPORTANT_RATIO = 0.5  # the official scripts' --important_ratio
ROUND_DROP = 8  # duplicates removed per matching round, as the official code


def vispruner_select(
    attention: torch.Tensor, patches: torch.Tensor, tokens: int, important_ratio: float = IMPORTANT_RATIO
) -> torch.Tensor:
    """(T, P) CLS attention of each patch and (T, P, C) patch states -> (T, tokens) ascending patch
    indices kept.

    Sorts are stable where the official `argsort`s are not: among equal scores the earlier entry
    comes first (on real features ties do not occur; the choice only makes the output defined)."""
    important = int(tokens * important_ratio)
    diverse = tokens - important
    ranked = attention.sort(dim=1, descending=True, stable=True).indices  # (T, P) by attention, descending
    kept = ranked[:, :important]  # (T, T_imp)
    if diverse > 0:
        # L2-normalised in at least float32 (the official code stays in fp16).
        unit = F.normalize(patches.to(torch.promote_types(patches.dtype, torch.float32)), dim=-1)
        cosine = unit @ unit.transpose(1, 2)  # (T, P, P): once, instead of a product per round
        residual = remove_duplicates(cosine, ranked[:, important:], diverse)  # (T, T_div)
        kept = torch.cat([kept, residual], dim=1)
    return kept.sort(dim=1).values


def remove_duplicates(cosine: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """Shrink each tile's residual list (T, R) of patch indices to (T, target) by matching rounds;
    cosine: (T, P, P) the patches' cosine similarities.

    Each round splits the list into a = even positions and b = odd positions, scores every a by its
    highest cosine to any b, drops the r = min(8, R - target) highest-scoring a's, and continues with
    [the other a's by descending score, then every b in its order] (the order decides later rounds).
    For odd R, a is the longer half (ceil(R/2)), and r is also capped at len(a): the official
    indexing assumes an even R and r <= R/2 and fails otherwise, which its standard budgets avoid.
    The lengths depend only on the budget, so the loop never reads the device.
    """
    tile = torch.arange(residual.shape[0], device=residual.device)[:, None, None]
    while True:
        length = residual.shape[1]
        num_a = (length + 1) // 2
        drop = min(ROUND_DROP, length - target, num_a)
        if drop <= 0:
            return residual
        a, b = residual[:, ::2], residual[:, 1::2]
        scores = cosine[tile, a[:, :, None], b[:, None, :]].amax(dim=-1)  # (T, ceil(R/2))
        survivors = scores.sort(dim=1, descending=True, stable=True).indices[:, drop:]  # (T, ceil(R/2) - r)
        residual = torch.cat([a.gather(1, survivors), b], dim=1)


class VisPruner(Method):
    name = "vispruner"
    title = "VisPruner"
    stage = "vision tower"
    budget_rule = "per tile"
    reference = "arXiv 2412.01818 (ICCV 2025); github.com/Theia-4869/VisPruner"
    needs_attention = True

    def describe(self, settings: Settings, family: str | None = None) -> str:
        important = int(settings.tokens * IMPORTANT_RATIO)
        return f"VisPruner {settings.tokens}{self.unit(family)} ({important} important + {settings.tokens - important} diverse)"

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.tokens

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        # The CLS row summed over heads ranks the patches as the official head mean does; on a tower
        # without CLS, the attention each patch receives (visionzip.merge.received_attention).
        kept = vispruner_select(signals.patch_attention, signals.patches, settings.tokens)  # (T, k)
        tokens = take_tokens(signals.patches, kept)  # (T, k, C) pre-projector feature-layer states
        return TileOutput(project(tokens), kept, kept_tiles(kept, signals.side, signals.patch_attention))
