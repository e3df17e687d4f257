"""`LlavaOnevisionModel`: SigLIP-384/14 tiles (27x27 patches, no CLS token), anyres up to 6x6 crops.

Stock OneVision packs an image as the base tile's 729 tokens, then the stitched crop grid unpadded,
bilinearly downscaled when it holds more than about 9 tiles' worth ("anyres_max_9"), with a newline
token per row.  Under reduction it is packed as LLaVA-NeXT is (`llava_next.anyres_image_features`):
a per-tile method keeps k tokens on every tile (base + crops) in the authors' layout, with no
unpadding, downscaling or newlines, so an image of n crops becomes (1 + n) * k tokens; a per-image
method chooses rows of the stock packed sequence.  Either count is known from the image size.

One image per prompt: several images in one prompt (each then a lone base tile) run stock only, and
a reducing call refuses them with a plain message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .common import install
from .llava_next import (
    StockPacking,
    anyres_image_features,
    grid_shape,
    num_image_tokens,
    num_tiles,
    reduced_count,
    stock_count,
)

if TYPE_CHECKING:
    from ..settings import Handle, Settings

MODEL = "LlavaOnevisionModel"
PRESETS_KEY = "llava_onevision"
# The counts are LLaVA-NeXT's functions: the processor's stock count, (1 + n) * k per tile.
__all__ = [
    "MODEL",
    "PRESETS_KEY",
    "grid_shape",
    "num_image_tokens",
    "num_tiles",
    "patch",
    "reduced_count",
    "stock_count",
]
MULTI_IMAGE = (
    "LLaVA-OneVision with several images in one prompt runs stock only: token reduction takes one image "
    "per prompt (several prompts of one image each batch fine)"
)


class OnevisionPacking(StockPacking):
    def pack(self, base: Any, tile_features: torch.Tensor, size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        ratio = base.config.vision_aspect_ratio  # what stock get_image_features passes (its config default)
        packed_list, _ = base.pack_image_features([tile_features], [size], newline, vision_aspect_ratio=ratio)
        return packed_list[0]

    def patch_map(self, pack, num_tiles: int, side: int, grid: tuple[int, int]) -> torch.Tensor:
        return interpolated_patch_map(pack, num_tiles, side, grid)


STOCK_PACKING = OnevisionPacking()


def interpolated_patch_map(pack, num_tiles: int, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N,) tile * side^2 + patch behind each row of a stock packed OneVision image, -1 for a newline.

    A downscaled grid's row is a bilinear blend of patches: it maps to the patch nearest the point
    the interpolation sampled.  The stitched (row, column) coordinates are packed as two channels
    (float64): bilinear interpolation of a coordinate is the sampled point's coordinate, and
    unpadding crops both channels alike, so rounding gives that patch."""
    rows, cols = grid
    raster = torch.arange(side * side)
    row, col = raster // side, raster % side  # (P,) within a tile
    crop = torch.arange(num_tiles - 1)[:, None]  # (n, 1)
    stitched = torch.stack([(crop // cols) * side + row, (crop % cols) * side + col], dim=-1)  # (n, P, 2)
    base = torch.stack([row, col], dim=-1)[None]  # (1, P, 2)
    coordinates = pack(torch.cat([base, stitched]).double(), torch.tensor([-1.0, -1.0], dtype=torch.float64))
    coordinates = coordinates.round().long()  # (N, 2)
    grid_rows, grid_cols = coordinates[side * side :, 0], coordinates[side * side :, 1]
    tile = 1 + (grid_rows // side) * cols + grid_cols // side
    patch = (grid_rows % side) * side + grid_cols % side
    crops = torch.where(grid_rows >= 0, tile * side * side + patch, -1)
    return torch.cat([raster, crops])


def reduced_image_features(handle: Handle, pixel_values: torch.Tensor, image_sizes: Any, settings: Settings, **kwargs):
    return anyres_image_features(handle, pixel_values, image_sizes, settings, STOCK_PACKING, **kwargs)


def patch(handle: Handle):
    unpatch = install(handle, reduced_image_features, reduced_count)
    _refuse_several_images(handle)
    return unpatch  # removes the refusals too: they replace the same instance attributes


def _refuse_several_images(handle: Handle) -> None:
    """Several images in one prompt are each one lone tile (`batch_num_images`): refuse them under
    reduction, in the model and in the processor, rather than count them as anyres images."""
    base, processor = handle.base, handle.processor
    features = base.get_image_features

    def get_image_features(*args: Any, **kwargs: Any):
        counts = kwargs.get("batch_num_images")
        if handle.settings.enabled and counts is not None and any(int(n) != 1 for n in counts):
            raise ValueError(MULTI_IMAGE)
        return features(*args, **kwargs)

    get_image_features.__signature__ = features.__signature__
    base.get_image_features = get_image_features
    if processor is None:
        return
    override = processor.replace_image_token  # common.install's, on the instance
    replace = override.function

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        if handle.settings.enabled and any(int(n) != 1 for n in image_inputs.get("batch_num_images", [1])):
            raise ValueError(MULTI_IMAGE)
        return replace(image_inputs, image_idx, **kwargs)

    override.function = replace_image_token
