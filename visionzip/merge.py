"""VisionZip as pure tensor functions: no model, no hooks, no state.

Shapes: T tiles (336x336 crops), S = 1 + P tokens per tile (CLS first, then P patches in raster
order), C channels, H heads, d head width, D dominant and K contextual tokens kept per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import Budget

MERGE_MODES = ("sum", "mean")


def cls_attention(query_cls: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLS query's softmax attention over all keys, summed over heads.

    query_cls: (T, H, d) the CLS token's query; keys: (T, H, S, d).  Returns (T, S) in float32.
    Only this one row of the attention map is computed, so the tower keeps its fused attention.
    """
    logits = torch.einsum("thd,thsd->ths", query_cls.float(), keys.float()) * scale  # (T, H, S)
    return logits.softmax(dim=-1).sum(dim=1)


RECEIVED_LOGITS = 2**24  # logits `received_attention` holds at once: 64 MiB in float32


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int | None = None
) -> torch.Tensor:
    """The attention each token receives, averaged over all queries, summed over heads: VisionZip's
    ranking signal on a tower without a CLS token (SigLIP).

    queries, keys: (T, H, S, d).  Returns (T, S) in float32 or wider, summing to H per tile as a CLS row
    does.  The softmax runs over `chunk` queries at a time (default: as many as keep the (T, H, chunk, S)
    logits within RECEIVED_LOGITS, at least 16), so the whole map never exists at once.  Wider than
    float32 when the tower is: a mean over hundreds of queries packs the values close together, and
    VisPruner's whole ranking (not only its top) decides its choice.
    """
    num_tiles, heads, seq_len, _ = queries.shape
    chunk = chunk or max(16, RECEIVED_LOGITS // (num_tiles * heads * seq_len))
    dtype = torch.promote_types(queries.dtype, torch.float32)
    received = torch.zeros(num_tiles, seq_len, dtype=dtype, device=queries.device)
    keys = keys.to(dtype)
    for start in range(0, seq_len, chunk):
        block = queries[:, :, start : start + chunk].to(dtype)  # (T, H, c, d)
        weights = (torch.einsum("thqd,thsd->thqs", block, keys) * scale).softmax(dim=-1)
        received += weights.sum(dim=(1, 2))
    return received / seq_len


@dataclass
class TileChoice:
    """What VisionZip chose in each of T tiles; all indices are token positions (0 = CLS on a tower
    with one; on a tower without, position = patch index)."""

    dominant: torch.Tensor  # (T, D) ascending, CLS (0) first when the tower has one
    targets: torch.Tensor  # (T, K) ascending: the contextual tokens' anchors
    merged: torch.Tensor  # (T, M) ascending: tokens folded into a target, M = S - D - K
    merged_into: torch.Tensor  # (T, M) the target slot (0..K-1) each merged token went to


def choose_tokens(
    cls_attn: torch.Tensor, keys_mean: torch.Tensor, dominant: int, contextual: int, cls_tokens: int = 1
) -> TileChoice:
    """Pick dominant tokens by CLS attention and group the rest around evenly spaced targets.

    cls_attn: (T, S) the ranking signal (the CLS row, or `received_attention` on a tower without
    CLS); keys_mean: (T, S, d) keys averaged over heads; cls_tokens: 1 when position 0 is a CLS
    token (always kept, counted in `dominant`), 0 when every position is a patch.
    """
    num_tiles, seq_len = cls_attn.shape
    device = cls_attn.device
    Budget(dominant, contextual).check(seq_len)
    # Dominant: CLS always (if any), plus the patches ranked highest; kept in position order.
    top_patches = cls_attn[:, cls_tokens:].topk(dominant - cls_tokens, dim=1).indices + cls_tokens  # (T, D - c)
    cls_index = torch.zeros(num_tiles, cls_tokens, dtype=torch.long, device=device)
    dominant_idx = torch.cat([cls_index, top_patches], dim=1).sort(dim=1).values  # (T, D)

    # Stable argsorts of 0/1 masks list the zeros first, in position order: no boolean indexing,
    # so nothing here waits for the GPU.
    num_remaining = seq_len - dominant
    is_dominant = torch.zeros(num_tiles, seq_len, dtype=torch.uint8, device=device)
    is_dominant.scatter_(1, dominant_idx, 1)
    remaining = is_dominant.argsort(dim=1, stable=True)[:, :num_remaining]  # (T, N) ascending

    if contextual == 0:
        empty = remaining[:, :0]
        return TileChoice(dominant_idx, empty, empty, empty)
    # Targets: every step-th remaining token, a 1-D stride over the list (the authors' layout).
    step = max(1, num_remaining // contextual)
    is_target = torch.zeros(num_remaining, dtype=torch.uint8, device=device)
    is_target[torch.arange(contextual, device=device) * step] = 1
    slots = is_target.argsort(stable=True)  # non-targets, then targets, each ascending
    merged_idx = remaining[:, slots[: num_remaining - contextual]]  # (T, M)
    target_idx = remaining[:, slots[num_remaining - contextual :]]  # (T, K)

    # Similarities in at least float32: in bf16 they round so coarsely that ties, which go to the
    # earliest target, become common.
    unit_keys = torch.nn.functional.normalize(keys_mean.to(torch.promote_types(keys_mean.dtype, torch.float32)), dim=-1)
    target_keys = take_tokens(unit_keys, target_idx)  # (T, K, d)
    merged_keys = take_tokens(unit_keys, merged_idx)  # (T, M, d)
    similarity = merged_keys @ target_keys.transpose(1, 2)  # (T, M, K)
    merged_into = similarity.argmax(dim=-1)  # first maximum on ties
    return TileChoice(dominant_idx, target_idx, merged_idx, merged_into)


def merge_tokens(hidden: torch.Tensor, choice: TileChoice, mode: str = "sum") -> torch.Tensor:
    """The kept tokens of each tile: (T, S, C) -> (T, D + K, C), dominant first, then contextual.

    mode "sum" is the authors' (and the paper's): target + mean(members); a target with no
    members stays itself.  mode "mean" averages the target with its members.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    dominant_tokens = take_tokens(hidden, choice.dominant)  # (T, D, C)
    num_targets = choice.targets.shape[1]
    if num_targets == 0:
        return dominant_tokens
    # Sums and counts in at least float32: a bf16 running sum stops counting at 256 and drifts with
    # the order of a GPU's atomic adds; groups of hundreds of patches are common at small budgets.
    accumulate = torch.promote_types(hidden.dtype, torch.float32)
    target_tokens = take_tokens(hidden, choice.targets).to(accumulate)  # (T, K, C)
    member_tokens = take_tokens(hidden, choice.merged).to(accumulate)  # (T, M, C)
    slots = choice.merged_into.unsqueeze(-1).expand_as(member_tokens)
    member_sum = torch.zeros_like(target_tokens).scatter_add_(1, slots, member_tokens)  # (T, K, C)
    counts = torch.zeros(target_tokens.shape[:2], dtype=accumulate, device=hidden.device)
    counts.scatter_add_(1, choice.merged_into, torch.ones_like(choice.merged_into, dtype=accumulate))
    counts = counts.unsqueeze(-1)  # (T, K, 1)
    if mode == "sum":
        contextual_tokens = target_tokens + member_sum / counts.clamp(min=1)
    else:
        contextual_tokens = (target_tokens + member_sum) / (counts + 1)
    return torch.cat([dominant_tokens, contextual_tokens.to(hidden.dtype)], dim=1)


def take_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (T, S, C), index (T, k) -> (T, k, C): row index[t, i] of tile t, the same values as
    `tokens.gather(1, index expanded over C)`.  Whole rows by advanced indexing: on a CPU `gather`
    reads element by element and is 3-12x slower at these shapes."""
    tiles = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1)  # (T, 1)
    return tokens[tiles, index]
