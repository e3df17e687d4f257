"""What VisionZip chose, per image and tile, on the CPU, for drawing and inspection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import TileChoice


@dataclass
class TileSelection:
    """One 336x336 tile.  Patch indices are raster indices in the tile's side x side patch grid
    (CLS excluded); the CLS token is always kept and is not listed."""

    side: int  # patches per row (24 for CLIP-L/14-336)
    kept: torch.Tensor  # (D-1,) dominant patches
    targets: torch.Tensor  # (K,) patches that anchor the contextual tokens, in slot order
    merged: torch.Tensor  # (M,) patches folded into a contextual token
    merged_into: torch.Tensor  # (M,) slot 0..K-1 in `targets` each merged patch went to
    cls_attention: torch.Tensor  # (side*side,) the CLS attention each patch received

    def groups(self) -> torch.Tensor:
        """(side, side) map: -1 kept, k for a patch of contextual group k (its target included),
        -2 for a patch that was dropped (contextual=0)."""
        cells = torch.full((self.side * self.side,), -2, dtype=torch.long)
        cells[self.kept] = -1
        cells[self.targets] = torch.arange(len(self.targets))
        cells[self.merged] = self.merged_into
        return cells.view(self.side, self.side)


@dataclass
class ImageSelection:
    """One image: its size (H, W), its anyres grid (rows, cols; (0, 0) when it is a single tile)
    and its tiles, the base image first, then the grid crops row by row."""

    image_size: tuple[int, int]
    grid: tuple[int, int]
    tiles: list[TileSelection]
    num_tokens: int  # visual tokens this image fed to the language model


def tile_selections(choice: TileChoice, cls_attn: torch.Tensor, side: int) -> list[TileSelection]:
    """Split a batched TileChoice into per-tile records with patch (not token) indices."""
    cpu = TileChoice(*(t.detach().cpu() for t in (choice.dominant, choice.targets, choice.merged, choice.merged_into)))
    attention = cls_attn.detach().float().cpu()[:, 1:]
    return [
        TileSelection(
            side=side,
            kept=cpu.dominant[t, 1:] - 1,
            targets=cpu.targets[t] - 1,
            merged=cpu.merged[t] - 1,
            merged_into=cpu.merged_into[t],
            cls_attention=attention[t],
        )
        for t in range(cpu.dominant.shape[0])
    ]
