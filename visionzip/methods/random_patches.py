"""Random selection, the baseline of UniPruneBench (`Random_PreLLM.py`) and LightCompress (`random.py`):
per tile, `tokens` patches drawn uniformly without replacement (CLS excluded), kept in ascending raster
order, then projected.  The draw is seeded per call and shown, so a run can be repeated."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..merge import take_tokens
from ..selection import kept_tiles
from .base import Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tower import TowerSignals


def draw_patches(num_tiles: int, num_patches: int, tokens: int, seed: int, first_tile: int = 0) -> torch.Tensor:
    """(num_tiles, tokens) ascending patch indices, on the CPU: tile t keeps the first `tokens` of the
    t-th `randperm` drawn from one generator seeded with `seed` (the tiles draw in order).  The tiles are
    the call's tiles first_tile.. : a call that reaches the tower in chunks (a video's frames) draws the
    same patches for each tile as one that does not.

    The generator lives on the CPU so that a seed picks the same patches on every device, and the
    draw needs nothing from the GPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(first_tile):  # the earlier chunks' draws (a torch generator cannot skip ahead)
        torch.randperm(num_patches, generator=generator)
    draws = [torch.randperm(num_patches, generator=generator)[:tokens] for _ in range(num_tiles)]
    return torch.stack(draws).sort(dim=1).values


class RandomPatches(Method):
    name = "random"
    title = "Random"
    stage = "projector"  # rows of the projector output; chosen before it, which is the same (it is token-wise)
    budget_rule = "per tile"
    reference = (
        "baseline of UniPruneBench (github.com/TianfanPeng/VLMUniPruneBench, methods/Random_PreLLM.py) "
        "and LightCompress (github.com/ModelTC/LightCompress, token_reduction/random.py)"
    )

    def describe(self, settings: Settings, family: str | None = None) -> str:
        return f"Random {settings.tokens}{self.unit(family)}, seed {settings.seed}"

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.tokens

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        hidden = signals.patches  # (T, P, C)
        side = signals.side
        kept = draw_patches(hidden.shape[0], side * side, settings.tokens, settings.seed, signals.first_tile)  # (T, k)
        # A host-to-device copy of pageable memory is staged at once: it does not wait for the GPU.
        on_device = kept.to(hidden.device, non_blocking=True)
        return TileOutput(project(take_tokens(hidden, on_device)), on_device, kept_tiles(kept, side))
