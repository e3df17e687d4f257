"""VisionZip for `LlavaModel` (LLaVA-1.5): one 336x336 tile per image, reduced to D + K tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..selection import ImageSelection, tile_selections
from .common import _as_size, install, reduce_tiles

if TYPE_CHECKING:
    from ..core import Settings, VisionZip


def reduced_count(handle: VisionZip, image_size: tuple[int, int] | None, settings: Settings) -> int:
    return settings.budget.per_tile


def num_image_tokens(handle: VisionZip, image_size: tuple[int, int], settings: Settings) -> int:
    if settings.enabled:
        return settings.budget.per_tile
    side = handle.side
    strategy = handle.base.config.vision_feature_select_strategy
    return side * side + (0 if strategy == "default" else 1)


def reduced_image_features(
    handle: VisionZip, pixel_values: torch.Tensor, image_sizes: Any, settings: Settings, **tower_kwargs: Any
) -> BaseModelOutputWithPooling:
    features, choice, cls_attn = reduce_tiles(handle, pixel_values, settings, **tower_kwargs)  # (B, D+K, E)
    tiles = tile_selections(choice, cls_attn, handle.side)
    sizes = [_as_size(size) for size in image_sizes] if image_sizes is not None else [None] * len(tiles)
    handle.record([ImageSelection(size, (0, 0), tiles[i : i + 1], features.shape[1]) for i, size in enumerate(sizes)])
    return BaseModelOutputWithPooling(pooler_output=list(features))


def patch(handle: VisionZip):
    return install(handle, reduced_image_features, reduced_count)
