"""FastV (Chen et al., ECCV 2024), its KV-cache variant: on a call's prefill, layer K-1's attention from
the last prompt token ranks the image tokens; layers K.. run on the T best of each image plus every
text token, at their original positions.  The prompt keeps the stock placeholder count.

The cache then holds every token below layer K and the kept ones from K on; decode steps never
re-rank (they get position prompt length + step, as transformers' generate gives them).  A forward
with no cache (generate with use_cache=False) is a prefill every step, so it re-ranks every step,
like the authors' "inplace" variant.  A later forward on the cache (a new chat turn) is not pruned
again: from layer K it attends to the prefill's kept tokens only.  Batch 1 and no padding, as the
official code.

SDPA stays on: the one attention row is computed from layer K-1's own projections in a pre-hook
(as `visionzip.tower` does for the CLS row), and pre-hooks on layers K.. slice the hidden states,
cos/sin, position ids and mask that every layer is handed.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..layout import tiles_from_kept
from ..selection import LazyTiles, TileSelection
from .base import Method

if TYPE_CHECKING:
    from ..settings import Handle, Settings


# -- the method: pure tensor functions ------------------------------------------------------------
def last_token_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The last prompt token's post-softmax attention over every position, averaged over heads.

    query: (H, d) its query after RoPE; keys: (H_kv, S, d) after RoPE, H_kv dividing H (grouped-query
    attention: key head h serves query heads h*H/H_kv ..., as transformers' repeat_kv).  Returns (S,)
    in float32 or wider.  The last query sees every key under the causal mask, so none is masked.
    """
    groups = query.shape[0] // keys.shape[0]
    keys = keys.repeat_interleave(groups, dim=0)  # (H, S, d)
    dtype = torch.promote_types(query.dtype, torch.float32)
    logits = torch.einsum("hd,hsd->hs", query.to(dtype), keys.to(dtype)) * scaling  # (H, S)
    return logits.softmax(dim=-1).mean(dim=0)


def keep_positions(
    scores: torch.Tensor, spans: list[torch.Tensor], tokens: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Which sequence positions layers K.. keep: all but the image tokens, plus each image's top `tokens`.

    scores: (S,) the attention row; spans: per image, the (N_i,) ascending positions of its tokens.
    Returns the (S - sum N_i + len(spans) * tokens,) kept positions, ascending, and per image the
    (tokens,) kept rows of its span, ascending.  Ties go to topk (the official code uses topk too).
    """
    keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    rows = []
    for span in spans:
        top = scores[span].topk(tokens).indices.sort().values  # (tokens,) rows of this span
        keep[span] = False
        keep[span[top]] = True
        rows.append(top)
    return keep.nonzero().squeeze(1), rows


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half RoPE (also Mistral's, Qwen2's, Yi's): states (B, H, S, d), cos/sin (B, S, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = states.shape[-1] // 2
    rotated = torch.cat([-states[..., half:], states[..., :half]], dim=-1)
    return states * cos + rotated * sin


# -- what a call chose, per image -------------------------------------------------------------------
@dataclass
class ImageChoice:
    """One image's FastV choice: made at the prefill, after its record was written."""

    patch_map: torch.Tensor  # (N,) tile * side^2 + patch behind each row of the image's span, -1: newline
    num_tiles: int
    side: int
    rows: torch.Tensor | None = None  # (T,) kept rows of the span, ascending; None until a prefill chose

    def tiles(self) -> list[TileSelection]:
        if self.rows is None:
            raise RuntimeError(
                "FastV chooses inside the language model: run the model's forward or generate on this image first"
            )
        return tiles_from_kept(self.rows, self.patch_map, self.num_tiles, self.side)


class FastVTiles(LazyTiles):
    """The per-tile records of one image, read from its `ImageChoice` once the prefill made it."""

    def __init__(self, choice: ImageChoice) -> None:
        super().__init__(choice.num_tiles, choice.tiles)
        self.choice = choice


@dataclass
class Prefill:
    """One FastV prefill forward in progress (batch 1)."""

    settings: Settings
    image_positions: torch.Tensor  # (N,) ascending positions of the image tokens
    scores: torch.Tensor | None = None  # (S,) layer K-1's last-token attention row
    kept: torch.Tensor | None = None  # (S',) ascending positions layers K.. keep
    replaced: dict[str, Any] = field(default_factory=dict)  # the sliced kwargs every layer >= K gets
    lengths: list[int] = field(default_factory=list)  # sequence length each layer ran on
    token: Any = None  # resets the context variable that holds this prefill


@dataclass
class Pruned:
    """What a cache filled by a FastV prefill holds from layer `layer` on."""

    layer: int
    kept: torch.Tensor  # (S',) ascending prompt positions cached there
    prompt_length: int  # S: the positions after it are later tokens, all cached


# -- the hooks on one handle's model ------------------------------------------------------------
class FastVHooks:
    """Pre-hooks on the base model, every decoder layer and its self-attention, for a handle's life.
    They return at once unless the calling context runs a FastV prefill, or continues (decodes on)
    a cache that one filled."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.layers = language_model_layers(handle)
        self._prefill: ContextVar[Prefill | None] = ContextVar(f"visionzip_fastv_{id(self)}", default=None)
        self._pruned: weakref.WeakKeyDictionary[Any, Pruned] = weakref.WeakKeyDictionary()
        base = handle.base
        self._handles = [
            base.register_forward_pre_hook(self._start, with_kwargs=True),
            base.register_forward_hook(self._end, always_call=True),
        ]
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._before_layer, index), with_kwargs=True))
            hook = partial(self._before_attention, index)
            self._handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # -- the base model's forward: is this a FastV prefill? -------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        settings = self.handle.settings
        if not (settings.enabled and settings.method == FastV.name):
            return
        cache = _cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return  # a continuation (decode): the prefill chose; the layer hooks follow its cache
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "FastV finds the image by its placeholder ids: call the model with input_ids, not inputs_embeds"
            )
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"FastV runs one prompt at a time (batch 1, as the official code), got {input_ids.shape[0]}"
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("FastV takes no padding: one prompt, an attention_mask of ones (or none)")
        if getattr(cache, "is_compileable", False):
            raise ValueError("FastV's cache layers differ in length: use a dynamic cache, not a static one")
        positions = (input_ids[0] == self.handle.base.config.image_token_id).nonzero().squeeze(1)
        if positions.numel() > 0:  # no image, nothing to prune
            prefill = Prefill(settings, positions)
            prefill.token = self._prefill.set(prefill)

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        prefill = self._prefill.get()
        if prefill is None:
            return
        self._prefill.reset(prefill.token)
        call = self.handle.current_call()
        if call is not None and prefill.lengths:
            text_tokens = prefill.lengths[0] - prefill.image_positions.shape[0]
            call.layer_tokens = [length - text_tokens for length in prefill.lengths]

    # -- the decoder layers -----------------------------------------------------------------------
    def _before_attention(self, index: int, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        """Layer K-1: the last token's attention row, from the layer's own projections (SDPA stays on)."""
        prefill = self._prefill.get()
        if prefill is None or index != prefill.settings.fastv_layer - 1:
            return
        normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (1, S, C), layer-normed
        cos, sin = kwargs["position_embeddings"]  # (1, S, d) each
        head_dim, length = attention.head_dim, normed.shape[1]
        query = attention.q_proj(normed[:, -1:]).view(1, 1, -1, head_dim).transpose(1, 2)  # (1, H, 1, d)
        keys = attention.k_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)  # (1, H_kv, S, d)
        rope = _rope_of(attention)
        query, keys = rope(query, cos[:, -1:], sin[:, -1:]), rope(keys, cos, sin)
        prefill.scores = last_token_attention(query[0, :, 0], keys[0], attention.scaling)

    def _before_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        prefill = self._prefill.get()
        if prefill is None:
            return self._follow_cache(index, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]  # (1, S, C)
        if index < prefill.settings.fastv_layer:
            prefill.lengths.append(hidden.shape[1])
            return None
        if index == prefill.settings.fastv_layer:
            self._choose(prefill, kwargs)
            hidden = hidden[:, prefill.kept]  # (1, S', C); later layers get layer K's shorter output
        kwargs.update(prefill.replaced)
        prefill.lengths.append(hidden.shape[1])
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _choose(self, prefill: Prefill, kwargs: dict) -> None:
        """Layer K: choose the kept positions, record them per image, slice what every layer >= K gets."""
        if prefill.scores is None:
            raise RuntimeError("FastV: layer K-1's attention row was not read")
        settings, positions = prefill.settings, prefill.image_positions
        images = self._images(positions.shape[0])
        counts = [image.tiles.choice.patch_map.shape[0] for image in images]
        for count in counts:
            if settings.tokens > count:
                raise ValueError(f"FastV: tokens={settings.tokens} is more than an image's {count} tokens")
        kept, rows = keep_positions(prefill.scores, list(positions.split(counts)), settings.tokens)
        for image, image_rows, count in zip(images, rows, counts):
            image.tiles.choice.rows = image_rows.detach()
            image.budget = f"{settings.describe()} of its {count}"  # the label, then what it chose from
        cos, sin = kwargs["position_embeddings"]
        replaced = {"position_embeddings": (cos[:, kept], sin[:, kept])}  # the original positions' RoPE
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:  # attention reads them only to spot packed sequences (flash): none here
            uses_flash = "flash" in str(self.handle.base.config.text_config._attn_implementation)
            replaced["position_ids"] = None if uses_flash else position_ids[..., kept]
        replaced["attention_mask"] = _rows_and_keys(kwargs.get("attention_mask"), kept)
        prefill.kept, prefill.replaced = kept, replaced
        cache = _cache(kwargs)
        if cache is not None:
            self._pruned[cache] = Pruned(settings.fastv_layer, kept, int(prefill.scores.shape[0]))

    def _images(self, image_tokens: int) -> list:
        """This call's images (their `ImageSelection`s), which get_image_features recorded under FastV."""
        selection = self.handle.last_selection or []
        fastv = [image for image in selection if isinstance(image.tiles, FastVTiles)]
        encoded = sum(image.tiles.choice.patch_map.shape[0] for image in fastv)
        if not fastv or len(fastv) != len(selection) or encoded != image_tokens:
            raise ValueError(
                f"FastV: the prompt holds {image_tokens} image tokens, but the call's images were encoded as "
                f"{encoded} under FastV: encode them under the same settings (handle.use(method='fastv', ...))"
            )
        return fastv

    def _follow_cache(self, index: int, args: tuple, kwargs: dict):
        """A later forward on a cache a FastV prefill filled: from layer K on the cache lacks the dropped
        prompt tokens, so a materialised mask keeps only the key columns that are there."""
        cache, mask = _cache(kwargs), kwargs.get("attention_mask")
        pruned = self._pruned.get(cache) if cache is not None else None
        if pruned is None or index < pruned.layer or not isinstance(mask, torch.Tensor):
            return None  # no mask (SDPA, one new token, no padding) needs no cut
        later = torch.arange(pruned.prompt_length, mask.shape[-1], device=mask.device)
        kwargs["attention_mask"] = mask[..., torch.cat([pruned.kept.to(mask.device), later])]
        return args, kwargs


def language_model_layers(handle: Handle) -> nn.ModuleList:
    layers = getattr(handle.base.language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"FastV found no decoder layers in {type(handle.base.language_model).__name__}")
    return layers


def _cache(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _rows_and_keys(mask: Any, kept: torch.Tensor) -> torch.Tensor | None:
    """The prefill's (B, 1, S, S) mask on the kept positions (a causal mask stays causal); None stays None
    (SDPA is then causal over the shorter sequence)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"FastV runs with SDPA or eager attention (a 4-D mask or none), got a {type(mask).__name__}")
    kept = kept.to(mask.device)
    return mask[:, :, kept][:, :, :, kept]


def _rope_of(attention: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The RoPE the attention's own modeling file applies, else Llama's."""
    modeling = sys.modules.get(type(attention).__module__)
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    if apply is None:
        return apply_rope
    return lambda states, cos, sin: apply(states, states, cos, sin)[0]


# -- the method ---------------------------------------------------------------------------------------
class FastV(Method):
    name = "fastv"
    title = "FastV"
    stage = "language model"
    budget_rule = "per image"
    reference = "arXiv 2403.06764 (ECCV 2024); github.com/pkunlp-icler/FastV (its KV-cache variant)"
    reads_text = True
    kept_as = "most attended by the last prompt token at layer K-1"  # how the app's overlay names them

    def check(self, settings: Settings, side: int) -> None:
        tokens, layer = settings.tokens, settings.fastv_layer
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"FastV: tokens={tokens!r} is out of range; keep 1 to N image tokens after layer K")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"FastV: fastv_layer={layer!r} is out of range; K >= 1 (layer K-1's attention ranks)")

    def check_model(self, settings: Settings, handle: Handle) -> None:
        layers = len(language_model_layers(handle))
        if not 1 <= settings.fastv_layer <= layers - 1:
            raise ValueError(
                f"FastV: fastv_layer={settings.fastv_layer} is out of range; the language model has {layers} "
                f"layers: need 1 <= K <= {layers - 1} (layer K-1's attention ranks, layers K.. are pruned)"
            )

    def describe(self, settings: Settings, family: str | None = None) -> str:
        return f"FastV K={settings.fastv_layer}, {settings.tokens} kept{self.unit(family)}"

    def image_tokens(self, settings: Settings, stock_tokens: int) -> int:
        if settings.tokens > stock_tokens:
            raise ValueError(f"FastV: tokens={settings.tokens} is out of range; this image has {stock_tokens} tokens")
        return stock_tokens  # the prompt is stock: FastV drops tokens inside the language model

    def reduce_image(self, features: torch.Tensor, settings: Settings) -> torch.Tensor:
        return torch.arange(features.shape[0], device=features.device)  # every row enters the language model

    def image_record(self, kept: torch.Tensor, patch_map: torch.Tensor, num_tiles: int, side: int) -> LazyTiles:
        return FastVTiles(ImageChoice(patch_map, num_tiles, side))

    def attach(self, handle: Handle) -> Callable[[], None] | None:
        try:
            return FastVHooks(handle).remove
        except ValueError:  # no decoder layers FastV knows: check_model refuses FastV on this model
            return None
