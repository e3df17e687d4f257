"""Qwen2.5-VL's tower signal for the attention-reading methods (`visionzip.merged_grid` says which and
why): a pre-hook on the last full-attention block's attention, for a handle's life."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from .merged_grid import attention_received
from .tower import ScopedHooks


@dataclass
class CellSignals:
    """What the signal block saw in one tower call (every image together, the tower's window order)."""

    want_attention: bool = True
    received: list[torch.Tensor] = field(default_factory=list)  # per image, (S_i,) attention received
    keys: torch.Tensor | None = None  # (S, d) head-mean keys before RoPE


class ReceivedAttention(ScopedHooks):
    """A pre-hook on the last full-attention block's attention, for a handle's life; it acts only while
    `capture()` is active in the calling context, and computes `merged_grid.attention_received` per
    image with the block's own qkv projection and RoPE (the tower keeps SDPA)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        attention = visual.blocks[visual.config.fullatt_block_indexes[-1]].attn
        self._handles = [attention.register_forward_pre_hook(self._read, with_kwargs=True)]

    def new_signals(self, attention: bool) -> CellSignals:
        return CellSignals(want_attention=attention)

    def _read(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        signals = self._sink.get()
        if signals is None or not signals.want_attention:
            return
        normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (S, C), window order
        length = normed.shape[0]
        query, keys, _ = attention.qkv(normed).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        signals.keys = keys.mean(dim=1)  # (S, d): the content, before the rotation
        cos, sin = kwargs["position_embeddings"]
        query, keys = apply_rotary_pos_emb_vision(query, keys, cos, sin)  # (S, H, d) each
        bounds = kwargs["cu_seqlens"].tolist()  # one segment per image in a full-attention block
        for start, end in itertools.pairwise(bounds):
            signals.received.append(
                attention_received(query[start:end].transpose(0, 1), keys[start:end].transpose(0, 1), attention.scaling)
            )
