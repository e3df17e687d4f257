"""`LlavaModel` (LLaVA-1.5): one 336x336 tile per image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..encode import reduce_packed, reduce_tiles, stock_tile_features
from ..methods import get_method
from ..selection import ImageSelection
from .common import _as_size, install

if TYPE_CHECKING:
    from ..settings import Handle, Settings

MODEL = "LlavaModel"
PRESETS_KEY = "llava"


def num_tiles(config: Any, image_size: tuple[int, int]) -> int:
    return 1


def stock_count(handle: Handle, image_size: tuple[int, int] | None) -> int:
    keeps_cls = handle.base.config.vision_feature_select_strategy != "default"
    return handle.side * handle.side + int(keeps_cls)


def reduced_count(handle: Handle, image_size: tuple[int, int] | None, settings: Settings) -> int:
    method = get_method(settings.method)
    if method.budget_rule == "per tile":
        return method.tile_tokens(settings, handle.side)
    return method.image_tokens(settings, stock_count(handle, image_size))


def num_image_tokens(handle: Handle, image_size: tuple[int, int], settings: Settings) -> int:
    return reduced_count(handle, image_size, settings) if settings.enabled else stock_count(handle, image_size)


def reduced_image_features(
    handle: Handle, pixel_values: torch.Tensor, image_sizes: Any, settings: Settings, **tower_kwargs: Any
) -> BaseModelOutputWithPooling:
    method = get_method(settings.method)
    count = pixel_values.shape[0]
    sizes = [_as_size(size) for size in image_sizes] if image_sizes is not None else [None] * count
    if method.budget_rule == "per tile":
        output = reduce_tiles(handle, pixel_values, settings, **tower_kwargs)  # (B, k, E)
        features, tiles = list(output.features), [output.tiles[i : i + 1] for i in range(count)]
    else:
        stock = stock_tile_features(handle, pixel_values, **tower_kwargs)  # (B, P or 1 + P, E)
        patch_map = torch.arange(stock.shape[1]) - (stock.shape[1] - handle.side * handle.side)  # CLS -> -1
        features, tiles = zip(*(reduce_packed(handle, image, patch_map, 1, settings) for image in stock))
    describe = settings.describe(handle.family.PRESETS_KEY)
    handle.record(
        [
            ImageSelection(size, (0, 0), tile, image.shape[0], method.name, describe)
            for size, tile, image in zip(sizes, tiles, features)
        ]
    )
    return BaseModelOutputWithPooling(pooler_output=list(features))


def patch(handle: Handle):
    return install(handle, reduced_image_features, reduced_count)
