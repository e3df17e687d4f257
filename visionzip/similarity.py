"""The cosine-similarity (Gram) matrix the diversity methods choose by (DivPrune over an image's packed
rows, CDPruner per tile): the one part of their choice whose cost grows as N^2 E.  It is symmetric, so
it is computed from its upper band of row blocks and mirrored, about half the multiply-adds of one full
product; the greedy picks after it read one row per pick."""

from __future__ import annotations

import torch

BLOCK_ROWS = 128  # rows per band: the work is N^2 E (1 + BLOCK_ROWS / N) / 2; small bands cost launches


def cosine_gram(vectors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N, E) vectors, optional (..., N) weights w -> (..., N, N) w_i w_j cos(v_i, v_j), in float32
    or wider (the vectors' dtype if wider).  Entries off the diagonal blocks are exactly symmetric."""
    dtype = torch.promote_types(vectors.dtype, torch.float32)
    unit = vectors.to(dtype, copy=True)  # (..., N, E), scaled in place below: one pass over N x E each
    unit.div_(unit.norm(dim=-1, keepdim=True).clamp_min_(1e-12))  # as F.normalize
    if weights is not None:
        unit.mul_(weights.to(dtype).unsqueeze(-1))  # w_i u_i . w_j u_j = w_i w_j cos
    size = unit.shape[-2]
    gram = unit.new_empty(*unit.shape[:-1], size)  # (..., N, N)
    for start in range(0, size, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, size)
        band = unit[..., start:stop, :] @ unit[..., start:, :].transpose(-1, -2)  # (..., b, N - start)
        gram[..., start:stop, start:] = band
        gram[..., stop:, start:stop] = band[..., stop - start :].transpose(-1, -2)
    return gram
