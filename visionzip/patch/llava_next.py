"""VisionZip for `LlavaNextModel`: every anyres tile reduced to D + K tokens, packed in the
authors' layout (no unpadding, no newline tokens except after a lone tile)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..merge import stitched_dominant_order
from ..selection import ImageSelection, tile_selections
from .common import _as_size, install, reduce_tiles

if TYPE_CHECKING:
    from ..core import Settings, VisionZip


def num_tiles(config: Any, image_size: tuple[int, int]) -> int:
    return image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def reduced_count(handle: VisionZip, image_size: tuple[int, int], settings: Settings) -> int:
    tiles = num_tiles(handle.base.config, image_size)
    return tiles * settings.budget.per_tile + (1 if tiles == 1 else 0)


def num_image_tokens(handle: VisionZip, image_size: tuple[int, int], settings: Settings) -> int:
    if settings.enabled:
        return reduced_count(handle, image_size, settings)
    if handle.processor is None:
        raise ValueError("counting stock LLaVA-NeXT tokens needs the processor passed to apply()")
    return handle.processor._get_num_multimodal_tokens(image_sizes=[list(image_size)]).num_image_tokens[0]


def reduced_image_features(
    handle: VisionZip, pixel_values: torch.Tensor, image_sizes: Any, settings: Settings, **tower_kwargs: Any
) -> BaseModelOutputWithPooling:
    base = handle.base
    config = base.config
    sizes = [_as_size(size) for size in image_sizes]
    tile_counts = [num_tiles(config, size) for size in sizes]
    if pixel_values.dim() == 5:  # (images, max_tiles, 3, H, W), padded: keep each image's real tiles
        pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, tile_counts)], dim=0)
    features, choice, cls_attn = reduce_tiles(handle, pixel_values, settings, **tower_kwargs)  # (T, D+K, E)

    dominant = settings.budget.dominant
    width = features.shape[-1]
    tiles = tile_selections(choice, cls_attn, handle.side)
    packed, selection, start = [], [], 0
    for size, count in zip(sizes, tile_counts):
        image_features = features[start : start + count]  # (1 + n, D+K, E)
        if count == 1:
            grid = (0, 0)
            tokens = torch.cat([image_features[0], base.image_newline[None].to(image_features)], dim=0)
        else:
            grid = tuple(
                get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
            )
            if grid[0] * grid[1] != count - 1:
                raise ValueError(f"image of size {size} has {count - 1} crops but a {grid[0]}x{grid[1]} grid")
            crops = image_features[1:]  # (n, D+K, E)
            order = stitched_dominant_order(choice.dominant[start + 1 : start + count], *grid, handle.side)
            order = order.to(crops.device)  # with device_map, the tower and projector may sit on different GPUs
            tokens = torch.cat(
                [
                    image_features[0],  # base tile: D dominant (CLS first) + K contextual
                    crops[:, 1:dominant].reshape(-1, width)[order],  # crops' dominant patches, stitched raster order
                    crops[:, 0],  # the crops' CLS tokens
                    crops[:, dominant:].reshape(-1, width),  # the crops' contextual tokens, crop by crop
                ],
                dim=0,
            )
        packed.append(tokens)
        selection.append(ImageSelection(size, grid, tiles[start : start + count], tokens.shape[0]))
        start += count
    handle.record(selection)
    return BaseModelOutputWithPooling(pooler_output=packed)


def patch(handle: VisionZip):
    return install(handle, reduced_image_features, reduced_count)
