"""Reading VisionZip's signals out of a ViT vision tower (CLIP and its kin) without eager attention.

Two hooks sit on the feature layer for the life of a handle: a pre-hook on its self-attention
(whose input is already layer-normed) computes the CLS attention row and head-mean keys with the
layer's own q/k projections (transformers' separate ones, or vLLM's fused qkv projection), and a forward hook keeps the layer's output.  They act only while a
`TowerSignals` sink is active in the calling context, so concurrent stock calls see plain hooks
that return at once.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .merge import cls_attention, received_attention


@dataclass
class TowerSignals:
    hidden: torch.Tensor | None = None  # (T, S, C) the feature layer's output
    cls_attn: torch.Tensor | None = None  # (T, S) CLS attention summed over heads (float32); without a CLS
    # token, the attention each token receives averaged over queries (merge.received_attention)
    keys_mean: torch.Tensor | None = None  # (T, S, d) keys averaged over heads
    want_attention: bool = True  # False: only the layer output is wanted (stock features)
    handle: Any = None  # the VisionZip handle whose tower made them (set by encode.reduce_tiles), for methods
    # that read more of the model or the call than the feature layer (CDPruner: post_layernorm, the question)
    first_tile: int = 0  # these tiles' place among the call's tiles: a video's frames reach the tower in chunks
    score_span: tuple[torch.Tensor, torch.Tensor] | None = None  # the whole call's (min, max) (Method.score_span)
    scores: torch.Tensor | None = None  # (T, P) the method's raw scores of these tiles, kept by score_span
    cls_tokens: int = 1  # leading CLS tokens before the patches: 1 (CLIP), 0 (SigLIP)

    @property
    def side(self) -> int:
        """Patches per row of a tile (24 for CLIP-L/14-336, 27 for SigLIP-384/14)."""
        return math.isqrt(self.hidden.shape[1] - self.cls_tokens)

    @property
    def patches(self) -> torch.Tensor:
        """(T, P, C) the feature layer's patch states, CLS dropped."""
        return self.hidden[:, self.cls_tokens :]

    @property
    def patch_attention(self) -> torch.Tensor:
        """(T, P) the ranking signal of the patches alone."""
        return self.cls_attn[:, self.cls_tokens :]


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The tower's transformer layers, found by shape rather than by attribute path (the path
    differs between transformers 4.x and 5.x and between towers)."""
    for module in vision_tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            attention = getattr(module[0], "self_attn", None)
            if attention is not None and (
                hasattr(attention, "qkv_proj") or (hasattr(attention, "q_proj") and hasattr(attention, "k_proj"))
            ):
                return module
    raise ValueError(
        f"VisionZip found no ViT encoder layers (with self_attn.q_proj/k_proj or qkv_proj) in {type(vision_tower).__name__}"
    )


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Index of the layer whose output `hidden_states[vision_feature_layer]` is.

    hidden_states holds the embeddings then each layer's output, num_layers + 1 entries.
    """
    if not isinstance(vision_feature_layer, int):
        raise ValueError(
            f"VisionZip needs a single vision_feature_layer; this model concatenates layers {vision_feature_layer}"
        )
    position = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= position <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} does not name a transformer layer of a "
            f"{num_layers}-layer tower (VisionZip needs that layer's attention)"
        )
    return position - 1


def queries_and_keys(attention: nn.Module, normed: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (T, H, Q, d) and every token's keys (T, H, S, d) of one attention layer, from its layer-normed
    input normed (T, S, C), with the layer's own projections: transformers' q_proj/k_proj, or vLLM's fused
    qkv_proj (which returns (output, bias) and holds this rank's heads only). cls_only: the CLS query alone
    (Q = 1), else every token's (Q = S)."""
    num_tiles, seq_len, _ = normed.shape
    heads, head_dim = getattr(attention, "num_heads_per_partition", attention.num_heads), attention.head_dim
    if hasattr(attention, "qkv_proj"):
        qkv, _ = attention.qkv_proj(normed)  # (T, S, 3 * H * d)
        queries, keys, _ = qkv.chunk(3, dim=-1)
        queries = queries[:, :1] if cls_only else queries
    else:
        queries, keys = attention.q_proj(normed[:, :1] if cls_only else normed), attention.k_proj(normed)
    queries = queries.reshape(num_tiles, queries.shape[1], heads, head_dim).transpose(1, 2)
    return queries, keys.reshape(num_tiles, seq_len, heads, head_dim).transpose(1, 2)


class ScopedHooks(abc.ABC):
    """Hooks kept for a handle's life that record only while `capture()` is active in the calling context
    (a ContextVar, so concurrent stock calls on the same model see hooks that return at once).  A
    subclass registers its hooks in `_handles` and says what one capture records (`new_signals`)."""

    def __init__(self) -> None:
        self._sink: ContextVar[Any] = ContextVar(f"visionzip_sink_{id(self)}", default=None)
        self._handles: list[Any] = []

    @abc.abstractmethod
    def new_signals(self, attention: bool) -> Any:
        """A fresh record for one capture; attention=False: only what needs no attention."""

    @contextlib.contextmanager
    def capture(self, attention: bool = True) -> Iterator[Any]:
        """Signals of the calls made inside the block; attention=False keeps only what needs no attention."""
        signals = self.new_signals(attention)
        token = self._sink.set(signals)
        try:
            yield signals
        finally:
            self._sink.reset(token)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class SignalHooks(ScopedHooks):
    """The two hooks on one feature layer, and the context that turns them on."""

    def __init__(self, layer: nn.Module, cls_tokens: int = 1) -> None:
        super().__init__()
        self.layer, self.cls_tokens = layer, cls_tokens
        self._handles = [
            layer.self_attn.register_forward_pre_hook(self._read_attention_input, with_kwargs=True),
            layer.register_forward_hook(self._read_output),
        ]

    def new_signals(self, attention: bool) -> TowerSignals:
        return TowerSignals(want_attention=attention, cls_tokens=self.cls_tokens)

    def _read_attention_input(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        signals = self._sink.get()
        if signals is None or not signals.want_attention:
            return
        normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (T, S, C)
        queries, keys = queries_and_keys(
            attention, normed, cls_only=bool(self.cls_tokens)
        )  # (T, H, 1|S, d), (T, H, S, d)
        if self.cls_tokens:
            signals.cls_attn = cls_attention(queries[:, :, 0], keys, attention.scale)
        else:  # no CLS token: every query's row, a chunk of queries at a time (never the whole map)
            signals.cls_attn = received_attention(queries, keys, attention.scale)
        signals.keys_mean = keys.mean(dim=1)  # (T, S, d)

    def _read_output(self, layer: nn.Module, args: tuple, output) -> None:
        signals = self._sink.get()
        if signals is not None:
            signals.hidden = output[0] if isinstance(output, tuple) else output
