"""Token reduction on Qwen2.5-VL's merged grid, as pure tensor functions: no model, no hooks.

Qwen2.5-VL's tower has no CLS token and ends in a 2x2 patch merger: an image of gh x gw patches
becomes N = (gh/2) x (gw/2) merged tokens of the language model's width, in raster order over the
merged grid ("cells").  Every method here chooses among those cells (per image, or per temporal slice
of a video, never per tile).

The signal the attention-reading methods use in place of a CLS row: the VisionZip authors' official
code (github.com/dvlab-research/VisionZip, read for this port) covers LLaVA's CLIP tower only, and no
published port for this tower that we could read states a rule, so this one is ours: the attention each
patch RECEIVES at the tower's last full-attention block (`fullatt_block_indexes[-1]`, the last block on
the released checkpoints), averaged over every query of its image and over heads, then over the 4
patches of each merged cell.  The windowed blocks are not used: there a patch competes only inside
its 112-px window, so the scores of two windows are not comparable.  It is computed from the block's own fused qkv projection
and RoPE, one chunk of queries at a time, so the tower keeps SDPA and no S x S map exists.

Shapes: S patches of one image (window order where said), H heads, d head width, N cells, E width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .merge import choose_tokens, merge_tokens, received_attention
from .selection import TileSelection


def attention_received(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, S, d) queries and keys (after RoPE) of one image -> (S,) float32 or wider: the softmax attention
    each key receives, averaged over the S queries and the H heads (`merge.received_attention`, SigLIP's
    signal summed over heads, on one image, in its bounded query chunks)."""
    return received_attention(query[None], keys[None], scale)[0] / query.shape[0]


def cells_from_window_order(per_patch: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """(S, ...) values of one image's patches in the tower's window order -> (N, ...) per merged cell in
    raster order: the mean over each cell's 4 patches (contiguous in window order), then un-permuted
    (window position j holds cell window_index[j], as the tower's own `argsort(window_index)` undoes)."""
    cells = per_patch.reshape(window_index.shape[0], -1, *per_patch.shape[1:]).float().mean(dim=1)
    out = torch.empty_like(cells)
    out[window_index] = cells
    return out


@dataclass
class CellChoice:
    """What one image's method chose, in cell terms (raster indices over the rows x cols merged grid),
    in `selection.TileSelection`'s vocabulary.

    anchors: (k,) the cell each output token stands at, ascending: the tokens' order in the sequence
        and the cells whose M-RoPE positions they keep.
    kept: cells kept as themselves; targets: the anchor cells of tokens that stand for several cells
        (VisionZip's contextual tokens, pooling windows), in slot order; merged / merged_into: the other
        cells of those groups and the target slot each went to; scores: (N,) the signal, or None."""

    anchors: torch.Tensor
    kept: torch.Tensor
    targets: torch.Tensor
    merged: torch.Tensor
    merged_into: torch.Tensor
    scores: torch.Tensor | None = None


def visionzip_cells(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int, mode: str = "sum"
) -> tuple[torch.Tensor, CellChoice]:
    """VisionZip on one image's cells: the `dominant` cells with the highest received attention, and
    `contextual` tokens merged from the rest around evenly spaced targets by head-mean key cosine
    (VisionZip's rule, `merge.choose_tokens`; there the CLS slot is a placeholder that is always kept
    and then dropped, so the tower needs none).  Each contextual token stands at its target's cell.

    features: (N, E) merger outputs; scores: (N,); keys: (N, d).  Needs dominant + contextual < N.
    Returns (dominant + contextual, E) tokens in anchor order and the choice."""

    def pad(values: torch.Tensor) -> torch.Tensor:  # a placeholder CLS row at position 0
        return torch.cat([torch.zeros_like(values[:1]), values])

    choice = choose_tokens(pad(scores)[None], pad(keys)[None], dominant + 1, contextual)
    tokens = merge_tokens(pad(features)[None], choice, mode)[0, 1:]  # (D + K, E): dominant, then contextual
    kept, targets = choice.dominant[0, 1:] - 1, choice.targets[0] - 1
    anchors = torch.cat([kept, targets])
    order = anchors.argsort()
    cells = CellChoice(anchors[order], kept, targets, choice.merged[0] - 1, choice.merged_into[0], scores)
    return tokens[order], cells


def top_cells(scores: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N,) scores -> (tokens,) ascending cells with the highest scores (VisionZip dominant-only)."""
    return scores.topk(tokens).indices.sort().values


def pool_window(grid: tuple[int, int], tokens: int) -> int:
    """The smallest square window s whose pooled grid ceil(h/s) x ceil(w/s) fits in `tokens` cells."""
    rows, cols = grid
    window = 1
    while math.ceil(rows / window) * math.ceil(cols / window) > tokens:
        window += 1
    return window


def pool_cells(features: torch.Tensor, grid: tuple[int, int], window: int) -> tuple[torch.Tensor, CellChoice]:
    """(N, E) cells of a rows x cols grid -> (ceil(rows/s) * ceil(cols/s), E) window means (edge windows
    average the cells they hold), row-major, each at its top-left cell; averaged in at least float32."""
    rows, cols = grid
    cell = torch.arange(rows * cols, device=features.device)
    slot = (cell // cols // window) * math.ceil(cols / window) + (cell % cols) // window  # (N,) window of each cell
    accumulate = torch.promote_types(features.dtype, torch.float32)
    count = math.ceil(rows / window) * math.ceil(cols / window)
    sums = torch.zeros(count, features.shape[1], dtype=accumulate, device=features.device)
    sums.index_add_(0, slot, features.to(accumulate))
    sizes = torch.bincount(slot, minlength=count).to(accumulate)
    is_anchor = ((cell // cols) % window == 0) & ((cell % cols) % window == 0)
    anchors, members = cell[is_anchor], cell[~is_anchor]  # anchors ascending = window order
    pooled = (sums / sizes[:, None]).to(features.dtype)
    return pooled, CellChoice(anchors, anchors[:0], anchors, members, slot[members])


def kept_choice(kept: torch.Tensor, scores: torch.Tensor | None = None) -> CellChoice:
    """A choice that keeps cells as themselves (ascending) and drops the rest."""
    empty = kept[:0]
    return CellChoice(kept, kept, empty, empty, empty, scores)


def rope_positions(full: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(3, N) an image's stock M-RoPE (t, h, w) positions, (k,) anchor cells -> (3, k): the kept
    tokens keep their own cells' positions, not renumbered."""
    return full[:, anchors.to(full.device)]


@dataclass
class GridTile(TileSelection):
    """A `TileSelection` over a rows x `side` merged grid (Qwen2.5-VL's cells need not form a square):
    raster indices run over `rows` rows of `side` cells; the cells map onto the whole picture evenly
    (the processor resizes it whole, with no crop and no padding)."""

    rows: int = 0

    def groups(self) -> torch.Tensor:
        """(rows, side) map: -1 kept, k for a cell of merged group k (its target included), -2 dropped."""
        cells = torch.full((self.rows * self.side,), -2, dtype=torch.long)
        cells[self.kept] = -1
        cells[self.targets] = torch.arange(len(self.targets))
        cells[self.merged] = self.merged_into
        return cells.view(self.rows, self.side)
