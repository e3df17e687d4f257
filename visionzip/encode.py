"""The family-independent step: run the vision tower on tiles with the signal hooks on, let the
method choose, project.  The model families (`visionzip.patch`) decide which tiles and how to pack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .methods.base import TileOutput, get_method
from .selection import LazyTiles

if TYPE_CHECKING:
    from .settings import Handle, Settings
    from .tower import TowerSignals


def reduce_tiles(
    handle: Handle, tiles: torch.Tensor, settings: Settings, first_tile: int = 0, **tower_kwargs: Any
) -> TileOutput:
    """(T, 3, H, W) tiles -> the per-tile method's (T, k, E) projected tokens and what it chose.
    first_tile: the index of the first of these tiles among all the call's tiles, when they come in chunks."""
    signals = tower_signals(handle, tiles, settings, first_tile, **tower_kwargs)
    return get_method(settings.method).reduce_tiles(signals, settings, handle.base.multi_modal_projector)


def tower_signals(
    handle: Handle, tiles: torch.Tensor, settings: Settings, first_tile: int = 0, **tower_kwargs: Any
) -> TowerSignals:
    """(T, 3, H, W) tiles -> what the tower gives the per-tile method to choose from (its feature layer, and
    the attention signals when the method reads them)."""
    with handle.capture(attention=get_method(settings.method).needs_attention) as signals:
        handle.base.vision_tower(tiles, **tower_kwargs)
    signals.handle = handle  # for methods that read more of the model or the call (CDPruner)
    signals.first_tile = first_tile
    return signals


def stock_tile_features(handle: Handle, tiles: torch.Tensor, **tower_kwargs: Any) -> torch.Tensor:
    """(T, 3, H, W) tiles -> (T, P or 1 + P, E): stock LLaVA's per-tile features (the feature layer,
    CLS dropped under the "default" strategy, projected), read by the hook instead of keeping every
    layer's hidden states."""
    with handle.capture(attention=False) as signals:
        handle.base.vision_tower(tiles, **tower_kwargs)
    drop_cls = handle.base.config.vision_feature_select_strategy == "default"
    hidden = signals.hidden[:, 1:] if drop_cls else signals.hidden
    return handle.base.multi_modal_projector(hidden)


def reduce_packed(
    handle: Handle, packed: torch.Tensor, patch_map: torch.Tensor, num_tiles: int, settings: Settings
) -> tuple[torch.Tensor, LazyTiles]:
    """One image's stock packed features (N, E) -> the per-image method's kept rows (T, E), ascending,
    and per-tile records of them (read lazily).  patch_map: (N,) from `layout.packed_patch_map`."""
    kept = get_method(settings.method).reduce_image(packed, settings)  # (T,) ascending
    return packed[kept], get_method(settings.method).image_record(kept, patch_map, num_tiles, handle.side)
