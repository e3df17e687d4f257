"""What a reduction method chose, per image and tile, on the CPU, for drawing and inspection.

Every method's choice is one vocabulary: patches kept as themselves, and groups of patches that
became one token (VisionZip's contextual tokens, pooling windows), each with an anchor patch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .merge import TileChoice


@dataclass
class TileSelection:
    """One 336x336 tile.  Patch indices are raster indices in the tile's side x side patch grid
    (CLS excluded); the CLS token is always kept and is not listed."""

    side: int  # patches per row (24 for CLIP-L/14-336)
    kept: torch.Tensor  # (D-1,) patches kept as themselves (VisionZip: dominant), ascending
    targets: torch.Tensor  # (K,) patches that anchor the merged tokens (contextual tokens, windows), in slot order
    merged: torch.Tensor  # (M,) patches folded into a merged token
    merged_into: torch.Tensor  # (M,) slot 0..K-1 in `targets` each merged patch went to
    cls_attention: torch.Tensor | None  # (side*side,) the CLS attention each patch received; None: not read

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
    tiles: Sequence[TileSelection]  # a LazyTiles when made by the model: copied to the CPU on first read
    num_tokens: int  # visual tokens this image fed to the language model
    method: str = "visionzip"  # the registry name of the method that chose
    budget: str = ""  # the method and budget, as Method.describe() puts it


class LazyTiles(Sequence):
    """Per-tile selections made on first read by `make` (which copies device tensors to the CPU), so
    recording what was chosen never makes the host wait for the GPU in the middle of a forward.
    Slicing is lazy too."""

    def __init__(self, count: int, make: Callable[[], list[TileSelection]]) -> None:
        self._make: Callable[[], list[TileSelection]] | None = make
        self._tiles: list[TileSelection] | None = None
        self._range = range(count)
        self._root = self

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index):
        if isinstance(index, slice):
            view = object.__new__(LazyTiles)
            view._root, view._range = self._root, self._range[index]
            return view
        return self._root._materialise()[self._range[index]]

    def __reduce__(self):
        # Pickled (sent to another process, as ZeroGPU does with results), it is its tiles: on the
        # CPU, with no reference to the device tensors they were read from.
        return list, (list(self),)

    def _materialise(self) -> list[TileSelection]:
        if self._tiles is None:
            self._tiles, self._make = self._make(), None
        return self._tiles


def tile_selections(choice: TileChoice, cls_attn: torch.Tensor, side: int, cls_tokens: int = 1) -> LazyTiles:
    """VisionZip's per-tile records with patch (not token) indices, copied to the CPU when first read.
    cls_tokens: 1 when token position 0 is a CLS token, 0 on a tower without one."""
    detached = TileChoice(*(t.detach() for t in (choice.dominant, choice.targets, choice.merged, choice.merged_into)))
    cls_attn = cls_attn.detach()
    return LazyTiles(detached.dominant.shape[0], lambda: _to_cpu_tiles(detached, cls_attn, side, cls_tokens))


def _to_cpu_tiles(choice: TileChoice, cls_attn: torch.Tensor, side: int, cls_tokens: int) -> list[TileSelection]:
    cpu = TileChoice(*(t.cpu() for t in (choice.dominant, choice.targets, choice.merged, choice.merged_into)))
    attention = cls_attn.float().cpu()[:, cls_tokens:]
    return [
        TileSelection(
            side=side,
            kept=cpu.dominant[t, cls_tokens:] - cls_tokens,
            targets=cpu.targets[t] - cls_tokens,
            merged=cpu.merged[t] - cls_tokens,
            merged_into=cpu.merged_into[t],
            cls_attention=attention[t],
        )
        for t in range(cpu.dominant.shape[0])
    ]


def kept_tiles(kept: torch.Tensor, side: int, patch_attention: torch.Tensor | None = None) -> LazyTiles:
    """Per-tile records of a method that keeps patches as themselves and drops the rest.

    kept: (T, k) ascending patch raster indices; patch_attention: (T, side^2) the CLS attention each
    patch received (`TowerSignals.patch_attention`), or None when the method never read it.  Copied
    to the CPU when first read."""
    kept = kept.detach()
    attention = None if patch_attention is None else patch_attention.detach()

    def make() -> list[TileSelection]:
        cpu_kept = kept.cpu()
        cpu_attention = None if attention is None else attention.float().cpu()
        empty = torch.zeros(0, dtype=torch.long)
        return [
            TileSelection(side, cpu_kept[t], empty, empty, empty, None if cpu_attention is None else cpu_attention[t])
            for t in range(cpu_kept.shape[0])
        ]

    return LazyTiles(kept.shape[0], make)
