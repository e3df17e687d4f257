"""`LlavaNextModel`: anyres images of 1 + n tiles (the base image, then an n-crop grid row by row).

Per-tile methods are packed in the VisionZip authors' layout (`layout.stitched_order`: the base
tile's tokens; the crops' positioned tokens in raster order over the stitched grid; the crops' CLS
tokens; their merged tokens), with no unpadding and no newline tokens except after a lone tile, so
the count depends only on the image size.  Per-image methods choose rows of the stock packed sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..encode import reduce_packed, reduce_tiles, stock_tile_features
from ..layout import packed_patch_map, stitched_order
from ..methods import get_method
from ..selection import ImageSelection
from .common import _as_size, install

if TYPE_CHECKING:
    from ..settings import Handle, Settings

MODEL = "LlavaNextModel"
PRESETS_KEY = "llava_next"


def num_tiles(config: Any, image_size: tuple[int, int]) -> int:
    return image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def grid_shape(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the crop grid; (0, 0) for a lone tile."""
    if num_tiles(config, image_size) == 1:
        return (0, 0)
    return tuple(
        get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)
    )


def stock_count(handle: Handle, image_size: tuple[int, int]) -> int:
    if handle.processor is None:
        raise ValueError("counting stock LLaVA-NeXT tokens needs the processor passed to apply()")
    # The class's own method: the instance's is patched to count reduced tokens, and a per-image
    # method's count calls this one.
    processor = handle.processor
    return type(processor)._get_num_multimodal_tokens(processor, image_sizes=[list(image_size)]).num_image_tokens[0]


def reduced_count(handle: Handle, image_size: tuple[int, int], settings: Settings) -> int:
    method = get_method(settings.method)
    if method.budget_rule == "per image":
        return method.image_tokens(settings, stock_count(handle, image_size))
    tiles = num_tiles(handle.base.config, image_size)
    return tiles * method.tile_tokens(settings, handle.side) + (1 if tiles == 1 else 0)


def num_image_tokens(handle: Handle, image_size: tuple[int, int], settings: Settings) -> int:
    return reduced_count(handle, image_size, settings) if settings.enabled else stock_count(handle, image_size)


def reduced_image_features(
    handle: Handle, pixel_values: torch.Tensor, image_sizes: Any, settings: Settings, **tower_kwargs: Any
) -> BaseModelOutputWithPooling:
    return anyres_image_features(handle, pixel_values, image_sizes, settings, STOCK_PACKING, **tower_kwargs)


class StockPacking:
    """How a family packs one image's stock tile features (its `pack_image_features`), and which patch
    stands behind each packed row; LLaVA-NeXT's here, LLaVA-OneVision's in its own file."""

    def pack(self, base: Any, tile_features: torch.Tensor, size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """(1 + n, P, E) one image's tile features -> (N, E) its stock packed features."""
        strategy = base.config.vision_feature_select_strategy
        packed_list, _ = base.pack_image_features([tile_features], [size], strategy, image_newline=newline)
        return packed_list[0]

    def patch_map(self, pack, num_tiles: int, side: int, grid: tuple[int, int]) -> torch.Tensor:
        """(N,) tile * side^2 + patch behind each packed row, -1 for a newline (`layout.packed_patch_map`)."""
        return packed_patch_map(pack, num_tiles, side)


STOCK_PACKING = StockPacking()  # how this family packs an image's stock rows (`app.scrub` reads it too)


def anyres_image_features(
    handle: Handle,
    pixel_values: torch.Tensor,
    image_sizes: Any,
    settings: Settings,
    packing: StockPacking,
    **tower_kwargs: Any,
) -> BaseModelOutputWithPooling:
    """An anyres family's image features under reduction: per-tile methods in the authors' layout,
    per-image ones on rows of the family's stock packing."""
    config = handle.base.config
    sizes = [_as_size(size) for size in image_sizes]
    tile_counts = [num_tiles(config, size) for size in sizes]
    if pixel_values.dim() == 5:  # (images, max_tiles, 3, H, W), padded: keep each image's real tiles
        pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, tile_counts)], dim=0)
    if get_method(settings.method).budget_rule == "per tile":
        packed, tiles = _pack_tiles(handle, pixel_values, sizes, tile_counts, settings, **tower_kwargs)
    else:
        packed, tiles = _pack_rows(handle, pixel_values, sizes, tile_counts, settings, packing, **tower_kwargs)
    method, describe = get_method(settings.method).name, settings.describe(handle.family.PRESETS_KEY)
    handle.record(
        [
            ImageSelection(size, grid_shape(config, size), image_tiles, tokens.shape[0], method, describe)
            for size, image_tiles, tokens in zip(sizes, tiles, packed)
        ]
    )
    return BaseModelOutputWithPooling(pooler_output=packed)


def _pack_tiles(handle: Handle, pixel_values, sizes, tile_counts, settings: Settings, **tower_kwargs: Any):
    """A per-tile method on every tile of every image, each image packed in the authors' layout."""
    base = handle.base
    output = reduce_tiles(handle, pixel_values, settings, **tower_kwargs)  # (T, k, E)
    packed, tiles, start = [], [], 0
    for size, count in zip(sizes, tile_counts):
        features = output.features[start : start + count]  # (1 + n, k, E)
        if count == 1:
            tokens = torch.cat([features[0], base.image_newline[None].to(features)], dim=0)
        else:
            rows, cols = grid_shape(base.config, size)
            if rows * cols != count - 1:
                raise ValueError(f"image of size {size} has {count - 1} crops but a {rows}x{cols} grid")
            order = stitched_order(output.positions[start + 1 : start + count], rows, cols, handle.side)
            crops = features[1:].reshape(-1, features.shape[-1])  # (n * k, E), crop-major
            # with device_map, the tower and projector may sit on different GPUs
            tokens = torch.cat([features[0], crops[order.to(crops.device)]], dim=0)
        packed.append(tokens)
        tiles.append(output.tiles[start : start + count])
        start += count
    return packed, tiles


def _pack_rows(
    handle: Handle, pixel_values, sizes, tile_counts, settings: Settings, packing: StockPacking, **tower_kwargs: Any
):
    """A per-image method on each image's stock packed sequence (base tile, unpadded grid, newlines)."""
    base = handle.base
    stock = stock_tile_features(handle, pixel_values, **tower_kwargs).split(tile_counts)  # (1 + n, P, E) each
    packed, tiles = [], []
    for size, count, features in zip(sizes, tile_counts, stock):

        def pack(tile_features, newline, size_tensor=torch.tensor(size)):
            return packing.pack(base, tile_features, size_tensor, newline)

        rows = pack(features, base.image_newline)  # (N, E): exactly the stock image features
        patch_map = packing.patch_map(pack, count, handle.side, grid_shape(base.config, size))
        kept, image_tiles = reduce_packed(handle, rows, patch_map, count, settings)
        packed.append(kept)
        tiles.append(image_tiles)
    return packed, tiles


def patch(handle: Handle):
    return install(handle, reduced_image_features, reduced_count)
