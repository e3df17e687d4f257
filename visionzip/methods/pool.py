"""Spatial average pooling, as LLaVA-NeXT-Video's `LlavaNextVideoPooler` does it: each tile's
pre-projector side x side patch grid (CLS dropped) averaged over non-overlapping s x s windows,
flattened row-major, then projected.  s = 2 -> 144 tokens a tile, 3 -> 64, 4 -> 36."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..selection import LazyTiles, TileSelection
from .base import NOMINAL_TILES, Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tower import TowerSignals


POOLED_COUNTS = {"llava_onevision": (81, 9)}  # families whose tiles are not 24x24: their windows' counts
# families whose window follows each image's grid: the budget is a most (visionzip.merged_grid.pool_window)
WINDOW_BY_IMAGE = {"qwen2_5_vl"}


def pool_patches(patches: torch.Tensor, window: int) -> torch.Tensor:
    """(T, side^2, C) patch states in raster order -> (T, (side/window)^2, C) window means, row-major.

    Averaged in at least float32 (as merge.py sums): a bf16 mean of 64 values would round at every
    step of the accumulation; the result is cast back once."""
    num_tiles, num_patches, channels = patches.shape
    side = math.isqrt(num_patches)
    accumulate = torch.promote_types(patches.dtype, torch.float32)
    grid = patches.to(accumulate).transpose(1, 2).reshape(num_tiles, channels, side, side)  # (T, C, side, side)
    pooled = F.avg_pool2d(grid, kernel_size=window, stride=window)  # (T, C, side/w, side/w)
    return pooled.flatten(2).transpose(1, 2).to(patches.dtype)


def window_groups(side: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows in patch coordinates: (K,) each window's top-left patch (window order, row-major),
    (M,) the other patches of the windows, ascending, and (M,) the window slot each belongs to."""
    rows = torch.arange(side * side) // side
    cols = torch.arange(side * side) % side
    per_row = side // window
    slot = (rows // window) * per_row + cols // window  # (side^2,) the window of every patch
    is_anchor = (rows % window == 0) & (cols % window == 0)
    anchors = torch.nonzero(is_anchor).flatten()  # raster order of the top-left corners = window order
    members = torch.nonzero(~is_anchor).flatten()
    return anchors, members, slot[members]


def valid_counts(side: int) -> list[int]:
    """Tokens a tile can pool to: (side/s)^2 for every window s that divides side, largest first."""
    return [(side // s) ** 2 for s in range(1, side + 1) if side % s == 0]


class Pool(Method):
    name = "pool"
    title = "Pool"
    stage = "vision tower"
    budget_rule = "per tile"
    reference = (
        "LLaVA-NeXT-Video's pooler (transformers LlavaNextVideoPooler, 'average'); github.com/LLaVA-VL/LLaVA-NeXT"
    )

    def check(self, settings: Settings, side: int) -> None:
        tokens = settings.tokens
        counts = valid_counts(side)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens not in counts:
            windows = ", ".join(
                f"{count} ({side // math.isqrt(count)}x{side // math.isqrt(count)})" for count in counts
            )
            raise ValueError(
                f"{self.title}: tokens={tokens!r} is not a pooled grid of a {side}x{side}-patch tile; "
                f"valid counts (window): {windows}"
            )

    def describe(self, settings: Settings, family: str | None = None) -> str:
        if family in WINDOW_BY_IMAGE:
            return f"Pool {settings.tokens}{self.unit(family)} (at most: the smallest square window that fits)"
        grid = math.isqrt(settings.tokens)
        return f"Pool {settings.tokens}{self.unit(family)} ({grid}x{grid} grid)"

    def presets(self, family: str) -> dict[int, int]:
        """2x2, 3x3 and 4x4 windows of a 24x24 tile (144, 64, 36 tokens), named by their total over the
        family's nominal tiles (the paper's 640 and 160 are no pooled grid: 128 and 32 are not squares);
        a 27x27 SigLIP tile pools only by 3 or 9 (81, 9 tokens)."""
        tiles = NOMINAL_TILES[family]
        return {tiles * tokens: tokens for tokens in POOLED_COUNTS.get(family, (144, 64, 36))}

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.tokens

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        side = signals.side
        window = side // math.isqrt(settings.tokens)  # check() made tokens = (side / window)^2
        hidden = signals.patches  # (T, side^2, C)
        tokens = pool_patches(hidden, window)  # (T, k, C)
        anchors, members, member_slot = window_groups(side, window)
        num_tiles = hidden.shape[0]
        # Fixed by the budget alone: the positions (each window's top-left patch) and the records need
        # nothing from the device.
        positions = anchors.to(hidden.device, non_blocking=True).expand(num_tiles, -1)  # (T, k)
        empty = torch.zeros(0, dtype=torch.long)

        def records() -> list[TileSelection]:
            return [TileSelection(side, empty, anchors, members, member_slot, None) for _ in range(num_tiles)]

        return TileOutput(project(tokens), positions, LazyTiles(num_tiles, records))
