"""Where reduced tokens go in LLaVA-NeXT's sequence, and what per-image choices mean per tile: pure
tensor functions, no model.

Shapes: n crops of one image on a rows x cols grid, k tokens per crop, side patches per tile row.
"""

from __future__ import annotations

import torch

from .methods.base import CLS
from .selection import TileSelection


def stitched_order(positions: torch.Tensor, rows: int, cols: int, side: int) -> torch.Tensor:
    """Permutation of the n * k crop tokens (crop-major) into the packed order: tokens with a patch
    position in raster order over the stitched (rows*side) x (cols*side) grid, then the CLS tokens
    crop by crop, then the tokens with no position (merged) crop by crop, each in slot order.

    positions: (n, k) patch raster index inside its crop, CLS (-1) or MERGED (-2).  Sorting keys
    instead of boolean masks keeps the shapes static: nothing here waits for the GPU.
    """
    n, k = positions.shape
    crop = torch.arange(n, device=positions.device).unsqueeze(1)  # (n, 1)
    patch = positions.clamp(min=0)
    row = (crop // cols) * side + patch // side
    col = (crop % cols) * side + patch % side
    stitched = row * (cols * side) + col  # < n * side * side
    slot = crop * k + torch.arange(k, device=positions.device)  # crop-major slot index
    offset = n * side * side
    key = torch.where(positions >= 0, stitched, torch.where(positions == CLS, offset + crop, 2 * offset + slot))
    return key.flatten().argsort(stable=True)


def packed_patch_map(pack, num_tiles: int, side: int) -> torch.Tensor:
    """(N,) the tile * side^2 + patch index behind each row of a stock packed image, -1 for a newline.

    `pack(features (num_tiles, side^2, 1), newline (1,))` is the family's own stock packing; it is run
    on the indices themselves (float64 holds them exactly), so the map follows its unpadding exactly.
    """
    index = torch.arange(num_tiles * side * side, dtype=torch.float64).view(num_tiles, side * side, 1)
    return pack(index, torch.tensor([-1.0], dtype=torch.float64)).flatten().round().long()


def tiles_from_kept(kept_rows: torch.Tensor, patch_map: torch.Tensor, num_tiles: int, side: int) -> list[TileSelection]:
    """Per-tile records of a choice of packed rows (kept_rows, ascending) made over a whole image."""
    kept = patch_map[kept_rows.cpu()]
    kept = kept[kept >= 0]  # newline rows stand for no patch
    empty = torch.zeros(0, dtype=torch.long)
    tiles = []
    for tile in range(num_tiles):
        patches = kept[kept // (side * side) == tile] % (side * side)
        tiles.append(TileSelection(side, patches.sort().values, empty, empty, empty, None))
    return tiles
