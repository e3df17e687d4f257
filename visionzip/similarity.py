"""The cosine-similarity (Gram) matrix the diversity methods choose by (DivPrune over an image's packed
rows, CDPruner per tile): the one part of their choice whose cost grows as N^2 E.  It is symmetric, so
it is computed from its upper band of row blocks and mirrored, about half the multiply-adds of one full
product; the greedy picks after it read one row per pick."""

from __future__ import annotations

import torch

BLOCK_ROWS = 128  # rows per band: the work is N^2 E (1 + BLOCK_ROWS / N) / 2; small bands cost launches
SCREEN_BLOCK_ROWS = 512  # bfloat16 bands: matrix units want larger blocks (2,928 rows: 61 vs 80 ms full)


def cosine_gram(vectors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N, E) vectors, optional (..., N) weights w -> (..., N, N) w_i w_j cos(v_i, v_j), in float32
    or wider (the vectors' or weights' dtype if wider).  Entries off the diagonal blocks are exactly symmetric."""
    return symmetric_product(weighted_unit_rows(vectors, weights), BLOCK_ROWS)


def symmetric_product(rows: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(..., N, E) -> (..., N, N) rows @ rows.T in the rows' dtype, from the upper band of row blocks
    mirrored: about half the multiply-adds of one full product."""
    size = rows.shape[-2]
    product = rows.new_empty(*rows.shape[:-1], size)  # (..., N, N)
    for start in range(0, size, block_rows):
        stop = min(start + block_rows, size)
        band = rows[..., start:stop, :] @ rows[..., start:, :].transpose(-1, -2)  # (..., b, N - start)
        product[..., start:stop, start:] = band
        product[..., stop:, start:stop] = band[..., stop - start :].transpose(-1, -2)
    return product


def weighted_unit_rows(vectors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N, E) vectors, optional (..., N) weights w -> (..., N, E) w_i v_i / |v_i|, in float32 or wider
    (the vectors' or weights' dtype if wider): their products are the weighted cosines."""
    if weights is None:
        return unit_rows(vectors)
    unit = unit_rows(vectors, weights.dtype)  # (..., N, E), a copy: scaled in place below
    return unit.mul_(weights.to(unit.dtype).unsqueeze(-1))  # w_i u_i . w_j u_j = w_i w_j cos


def unit_rows(vectors: torch.Tensor, wider: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., N, E) -> (..., N, E) the rows scaled to unit length, in `wider` or the vectors' dtype,
    whichever is wider (as F.normalize): a new tensor, scaled in place (one pass over N x E each)."""
    unit = vectors.to(torch.promote_types(torch.promote_types(vectors.dtype, wider), torch.float32), copy=True)
    return unit.div_(unit.norm(dim=-1, keepdim=True).clamp_min_(1e-12))


def bfloat16_matmul_pays(device: torch.device) -> bool:
    """On a CPU with bfloat16 matrix units (AMX, AVX512-BF16) a bfloat16 product runs several times
    faster than a float32 one (7.5x for 2928 x 4096 rows on this project's AMX CPU); on a GPU float32 is
    cheap enough and a screen's host round trips are not."""
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def screening_products(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, E) vectors -> (N, N) bfloat16 dot products from one bfloat16 product, (N,) float32 norms from
    its diagonal, and a bound on how far products / (norm_i norm_j) is from the float32 cosine that
    `unit_rows(v) @ unit_rows(v).T` gives.  For screening only: which pairs could matter, never which wins.

    The product rounds its float32 sums to bfloat16: relative error at most 2^-8 of |v_i . v_j|, which is
    at most |v_i| |v_j|; so do the norms read from its diagonal (2^-9 each, after the square root).  Rows
    not already bfloat16 are rounded first (2 x 2^-8 more, and as much in the norms).  Both float32
    computations accumulate E products (E 2^-24 each, and as much again in the float32 norms)."""
    exact_input = vectors.dtype == torch.bfloat16
    products = symmetric_product(vectors.bfloat16(), SCREEN_BLOCK_ROWS)  # (N, N)
    norms = products.diagonal().float().sqrt_().clamp_min_(1e-12)  # (N,)
    bound = 2**-8 * (2 if exact_input else 6.05) + 4 * vectors.shape[-1] * 2**-24 + 2**-20
    return products, norms, bound
