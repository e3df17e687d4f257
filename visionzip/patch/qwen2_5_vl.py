"""`Qwen2_5_VLModel` (Qwen2.5-VL): dynamic resolution, a CLS-free windowed tower, a 2x2 merger, M-RoPE.

An image becomes one grid of rows x cols merged tokens ("cells", `visionzip.merged_grid`), its size
known from the image size (the processor's `smart_resize` to multiples of 28 px).  Every method
chooses per image among those cells (a "per tile" budget is per image here), so the processor expands
`<|image_pad|>` to the reduced count before any pixel is seen.  The kept tokens keep their own cells'
M-RoPE (t, h, w) positions: the text after the image keeps the positions it has in the stock model.

Budgets: a method keeps min(budget, N) of an image's N cells (VisionZip: dominant + contextual);
Pool pools the grid with the smallest square window s whose ceil(rows/s) x ceil(cols/s) grid fits
the budget.  CDPruner is refused (it scores by CLIP's text tower, whose embedding space this tower
does not share), and so is video under reduction (images only, for now).
"""

from __future__ import annotations

import inspect
import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from ..merged_grid import (
    CellChoice,
    GridTile,
    cells_from_window_order,
    kept_choice,
    pool_cells,
    pool_window,
    rope_positions,
    top_cells,
    visionzip_cells,
)
from ..methods import get_method
from ..methods.divprune import divprune_select
from ..methods.fastv import FastVTiles, ImageChoice
from ..methods.random_patches import draw_patches
from ..methods.vispruner import vispruner_select
from ..qwen_tower import ReceivedAttention
from ..selection import ImageSelection, LazyTiles, TileSelection
from .common import _as_size, _Override

if TYPE_CHECKING:
    from ..settings import Handle, Settings

MODEL = "Qwen2_5_VLModel"
PRESETS_KEY = "qwen2_5_vl"
BUDGET_PER_IMAGE = True  # every method's budget counts one image's merged tokens (no tiles)
DEFAULT_MAX_PIXELS = 12845056  # Qwen2VLImageProcessor's default longest_edge (16384 cells)
REFUSED = {
    "cdpruner": "CDPruner scores the question with CLIP's text tower, and Qwen2.5-VL's vision tower does not share "
    "CLIP's embedding space: it does not run on Qwen2.5-VL",
}
VIDEO_REFUSED = (
    "token reduction on Qwen2.5-VL covers images only, not video: run video with the reduction off "
    "(handle.use(enabled=False))"
)


# -- geometry --------------------------------------------------------------------------------------
def merged_grid(processor: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of merged cells an image of (height, width) becomes, from the processor's own
    resize rule (multiples of patch * merge pixels, within its min and max pixels)."""
    images = processor.image_processor
    factor = images.patch_size * images.merge_size
    height, width = smart_resize(
        *image_size, factor=factor, min_pixels=images.size["shortest_edge"], max_pixels=images.size["longest_edge"]
    )
    return height // factor, width // factor


def tower(handle: Handle) -> tuple[int, int, int, Callable[[], ReceivedAttention]]:
    """The handle's geometry and signal hooks (the family protocol's optional `tower`): `side` bounds an
    image's cells (side^2 >= the most the processor makes), no CLS; the signal layer is the last
    full-attention block."""
    images = getattr(handle.processor, "image_processor", None)
    max_pixels = images.size["longest_edge"] if images is not None else DEFAULT_MAX_PIXELS
    cell = handle.base.config.vision_config.patch_size * handle.base.config.vision_config.spatial_merge_size
    side = math.isqrt(max_pixels // (cell * cell) - 1) + 1
    visual = handle.base.visual
    return side, 0, visual.config.fullatt_block_indexes[-1], lambda: ReceivedAttention(visual)


def stock_count(handle: Handle, image_size: tuple[int, int]) -> int:
    if handle.processor is None:
        raise ValueError("counting Qwen2.5-VL tokens needs the processor passed to apply()")
    rows, cols = merged_grid(handle.processor, image_size)
    return rows * cols


def grid_count(grid: tuple[int, int], settings: Settings) -> int:
    """Tokens an image of rows x cols cells becomes under `settings` (enabled)."""
    cells = grid[0] * grid[1]
    method = settings.method
    if method == "pool":
        window = pool_window(grid, settings.tokens)
        return math.ceil(grid[0] / window) * math.ceil(grid[1] / window)
    if method == "fastv":
        return get_method(method).image_tokens(settings, cells)  # the stock count; FastV cuts inside the LM
    budget = settings.budget.per_tile if method == "visionzip" else settings.tokens
    return min(budget, cells)


def reduced_count(handle: Handle, image_size: tuple[int, int], settings: Settings) -> int:
    if handle.processor is None:
        raise ValueError("counting Qwen2.5-VL tokens needs the processor passed to apply()")
    return grid_count(merged_grid(handle.processor, image_size), settings)


def num_tiles(config: Any, image_size: tuple[int, int]) -> int:
    return 1


def num_image_tokens(handle: Handle, image_size: tuple[int, int], settings: Settings) -> int:
    return reduced_count(handle, image_size, settings) if settings.enabled else stock_count(handle, image_size)


def check_settings(handle: Handle, settings: Settings) -> None:
    """This family's budget limits (per image, in cells), before any computation (see `core`)."""
    if settings.method in REFUSED:
        raise ValueError(REFUSED[settings.method])
    method = get_method(settings.method)
    if settings.method == "visionzip":
        for name, value in (("dominant", settings.budget.dominant), ("contextual", settings.budget.contextual)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "dominant" else 0):
                raise ValueError(
                    f"VisionZip on Qwen2.5-VL: {name}={value!r} is out of range; dominant >= 1 and contextual >= 0 "
                    f"merged tokens per image (an image keeps all of its tokens when it has no more)"
                )
        return
    tokens = settings.tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"{method.title} on Qwen2.5-VL: tokens={tokens!r} is out of range; keep 1 or more per image")
    if settings.method == "fastv":
        method.check(settings, handle.side)


# -- the methods on one image's cells ---------------------------------------------------------------
def _choose(features: torch.Tensor, scores, keys, grid: tuple[int, int], settings: Settings):
    """(N, E) one image's merger outputs -> (k, E) tokens in anchor order and their `CellChoice`."""
    method, cells = settings.method, features.shape[0]
    count = grid_count(grid, settings)
    if method == "pool":
        return pool_cells(features, grid, pool_window(grid, settings.tokens))
    if count == cells or method == "fastv":  # the budget holds every cell: the stock tokens
        everything = torch.arange(cells, device=features.device)
        return features, kept_choice(everything, scores)
    if method == "visionzip":
        dominant = min(settings.budget.dominant, count)
        return visionzip_cells(features, scores, keys, dominant, count - dominant, settings.merge)
    if method == "visionzip_dominant":
        kept = top_cells(scores, count)
    elif method == "random":
        kept = draw_patches(1, cells, count, settings.seed)[0].to(features.device)
    elif method == "divprune":
        kept = divprune_select(features, count)
    elif method == "vispruner":
        kept = vispruner_select(scores[None], features[None], count)[0]
    else:
        raise ValueError(f"{get_method(method).title} does not run on Qwen2.5-VL")
    return features[kept], kept_choice(kept, scores)


@dataclass
class ImageCells:
    """One image's merger outputs and the tower's signal on them: everything a method chooses from, so
    a budget slider can choose again at any budget without the tower (`cells_selection`)."""

    features: torch.Tensor  # (N, E) merger outputs, raster order over the cells
    scores: torch.Tensor | None  # (N,) attention received per cell, None when not read
    keys: torch.Tensor | None  # (N, d) head-mean keys per cell, None when not read
    grid: tuple[int, int]  # (rows, cols) of cells


def tower_cells(
    handle: Handle, pixel_values: torch.Tensor, grid_thw: torch.Tensor, attention: bool
) -> list[ImageCells]:
    """The tower on every image, with the signal hook reading (`attention`) or not: per image its cells."""
    visual = handle.base.visual
    with handle.capture(attention=attention) as signals:
        merged = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw).pooler_output  # (N total, E)
    config = visual.config
    sizes = (grid_thw.prod(-1) // config.spatial_merge_size**2).tolist()
    scores = keys = [None] * len(sizes)
    if signals.received:
        window_index, _ = get_vision_window_index(
            grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
        )
        window_index = window_index.to(merged.device)
        scores = cells_from_window_order(torch.cat(signals.received), window_index).split(sizes)
        keys = cells_from_window_order(signals.keys, window_index).split(sizes)
    grids = [(h // config.spatial_merge_size, w // config.spatial_merge_size) for _, h, w in grid_thw.tolist()]
    return [ImageCells(*parts) for parts in zip(merged.split(sizes), scores, keys, grids)]


def encode_images(handle: Handle, pixel_values: torch.Tensor, grid_thw: torch.Tensor, settings: Settings):
    """The tower on every image, then the method per image: per image the (k, E) tokens and the
    `CellChoice` (its anchors, the cells whose positions the tokens keep)."""
    images = tower_cells(handle, pixel_values, grid_thw, get_method(settings.method).needs_attention)
    chosen = [_choose(cells.features, cells.scores, cells.keys, cells.grid, settings) for cells in images]
    return chosen, [cells.grid for cells in images]


def cells_selection(cells: ImageCells, settings: Settings) -> ImageSelection:
    """What `settings` keeps of one image's cells, recorded as a real call records it: a budget slider's
    choice from one tower run (cells read with the signal) at any budget.  Methods that read no signal
    get none, as in a real call."""
    method = get_method(settings.method)
    if settings.method in REFUSED or method.reads_text:
        raise ValueError(f"{method.title} cannot choose from the tower's cells alone on Qwen2.5-VL")
    signal = (cells.scores, cells.keys) if method.needs_attention else (None, None)
    tokens, choice = _choose(cells.features, *signal, cells.grid, settings)
    tiles = LazyTiles(1, lambda: [_tile(choice, *cells.grid)])
    return ImageSelection(None, cells.grid, tiles, tokens.shape[0], method.name, settings.describe(PRESETS_KEY))


def budget_values(handle: Handle, image_size: tuple[int, int], method: str) -> list[int]:
    """Every per-image budget `method` runs at on an image of `image_size`, ascending: 1 to its N cells, or
    for pooling the counts its square windows give (`grid_count`)."""
    rows, cols = merged_grid(handle.processor, image_size)
    if method == "pool":
        return sorted({math.ceil(rows / window) * math.ceil(cols / window) for window in range(1, max(rows, cols) + 1)})
    return list(range(1, rows * cols + 1))


def _record(handle: Handle, chosen: list, grids: list[tuple[int, int]], settings: Settings) -> None:
    method = get_method(settings.method)
    describe = settings.describe(handle.family.PRESETS_KEY)
    images = []
    for (tokens, choice), (rows, cols) in zip(chosen, grids):
        if settings.method == "fastv":  # chosen inside the language model, recorded there
            tiles = FastVTiles(CellChoiceInLM(torch.arange(rows * cols), 1, handle.side, grid=(rows, cols)))
        else:
            tiles = LazyTiles(1, lambda choice=choice, rows=rows, cols=cols: [_tile(choice, rows, cols)])
        # the image's own size is unknown here; the cells cover the whole picture evenly
        images.append(ImageSelection(None, (rows, cols), tiles, tokens.shape[0], method.name, describe))
    handle.record(images)


def _tile(choice: CellChoice, rows: int, cols: int) -> GridTile:
    """The choice as a `GridTile` over the merged grid, on the CPU."""
    parts = [part.detach().cpu() for part in (choice.kept, choice.targets, choice.merged, choice.merged_into)]
    scores = None if choice.scores is None else choice.scores.detach().float().cpu()
    return GridTile(cols, *parts, scores, rows=rows)


@dataclass
class CellChoiceInLM(ImageChoice):
    """FastV's record of one image's cells (it chooses inside the language model), as a `GridTile`."""

    grid: tuple[int, int] = (0, 0)  # rows, cols; `side` only bounds the raster indices (side^2 >= cells)

    def tiles(self) -> list[TileSelection]:
        [tile] = super().tiles()
        rows, cols = self.grid
        return [GridTile(cols, tile.kept, tile.targets, tile.merged, tile.merged_into, None, rows=rows)]


# -- positions ------------------------------------------------------------------------------------
def rope_index(
    base: nn.Module,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    anchors: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`get_rope_index` for reduced images: (3, B, L) positions and (B, 1) deltas.  Text as stock; an
    image's k tokens get the stock positions of their anchor cells (None: its first k cells, for
    callers that only need the text positions and deltas); the text after an image starts where it
    does in the stock model, and a delta is the next position minus the length (stock's max + 1)."""
    merge = base.config.vision_config.spatial_merge_size
    positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    grids, cells = iter(image_grid_thw), iter(anchors) if anchors is not None else None
    deltas = []
    for row in range(input_ids.shape[0]):
        kinds = mm_token_type_ids[row]
        if attention_mask is not None:
            kinds = kinds[attention_mask[row].bool()]
        pieces, current = [], 0
        for kind, group in itertools.groupby(kinds.tolist()):
            length = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(length, device=input_ids.device).expand(3, -1) + current)
                current += length
                continue
            if kind != 1:
                raise ValueError(VIDEO_REFUSED)
            grid = next(grids)
            full = base.get_vision_position_ids(current, grid, 1, merge, 1, device=input_ids.device)  # (3, N)
            kept = next(cells) if cells is not None else torch.arange(length)
            if kept.shape[0] != length:
                raise ValueError(f"an image has {length} placeholder tokens but {kept.shape[0]} features")
            pieces.append(rope_positions(full, kept))
            current += max(int(grid[1]), int(grid[2])) // merge
        sequence = torch.cat(pieces, dim=1)
        if attention_mask is not None:
            positions[:, row, attention_mask[row].bool()] = sequence
        else:
            positions[:, row] = sequence
        deltas.append(current - kinds.shape[0])
    return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


# -- the overrides ----------------------------------------------------------------------------------
def patch(handle: Handle) -> Callable[[], None]:
    """Install the model's and processor's overrides on the instances; returns what undoes them."""
    base, processor = handle.base, handle.processor
    if "get_image_features" in base.__dict__:
        raise ValueError("VisionZip is already applied to this model: reuse its handle, or call handle.remove() first")
    overrides = {
        "get_image_features": _image_features(handle, base.get_image_features),
        "get_rope_index": _rope_index(handle, base.get_rope_index),
        "forward": _forward(handle, base.forward),
    }
    # accelerate's device hooks may already sit on the instance's forward: put them back on removal
    previous = {name: base.__dict__.get(name) for name in overrides}
    for name, function in overrides.items():
        setattr(base, name, function)
    undo = [lambda name=name: _restore(base, name, previous[name]) for name in overrides]
    if processor is not None:
        names = ("replace_image_token", "_get_num_multimodal_tokens")
        processor.replace_image_token = _Override(_replace_image_token(handle, processor.replace_image_token))
        processor._get_num_multimodal_tokens = _Override(_counts(handle, processor._get_num_multimodal_tokens))
        undo += [lambda name=name: processor.__dict__.pop(name, None) for name in names]

    def unpatch() -> None:
        for restore in undo:
            restore()

    return unpatch


@dataclass
class CellFeatures(BaseModelOutputWithPooling):
    """`get_image_features`' output under reduction, with each image's anchor cells: generate() encodes the
    images before the prefill's forward, which puts the tokens at those cells' positions."""

    anchors: tuple[torch.Tensor, ...] | None = None
    grid_thw: torch.Tensor | None = None  # generate() drops image_grid_thw from the forward's inputs


def _restore(owner: Any, name: str, previous: Any) -> None:
    if previous is None:
        owner.__dict__.pop(name, None)
    else:
        setattr(owner, name, previous)


def reduced_image_features(handle: Handle, pixel_values, image_grid_thw, settings: Settings, **kwargs: Any):
    """What `get_image_features` returns under reduction (the family protocol's entry point)."""
    chosen, grids = encode_images(handle, pixel_values, image_grid_thw, settings)
    _record(handle, chosen, grids, settings)
    tokens = tuple(tokens for tokens, _ in chosen)
    anchors = tuple(choice.anchors for _, choice in chosen)
    return CellFeatures(pooler_output=tokens, anchors=anchors, grid_thw=image_grid_thw)


def _image_features(handle: Handle, stock: Callable) -> Callable:
    def get_image_features(pixel_values, image_grid_thw=None, **kwargs: Any):
        settings = handle.settings
        if not settings.enabled:
            return stock(pixel_values, image_grid_thw, **kwargs)
        return reduced_image_features(handle, pixel_values, image_grid_thw, settings)

    get_image_features.__signature__ = inspect.signature(stock)
    return get_image_features


def _rope_index(handle: Handle, stock: Callable) -> Callable:
    """generate() asks for the prompt's positions before any pixel is encoded: the text positions and
    deltas are right here; the forward then puts the image tokens at their anchors' positions."""

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None, **kwargs: Any):
        if not handle.settings.enabled or image_grid_thw is None:
            return stock(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, **kwargs)
        if video_grid_thw is not None:
            raise ValueError(VIDEO_REFUSED)
        return rope_index(handle.base, input_ids, mm_token_type_ids, image_grid_thw, kwargs.get("attention_mask"))

    return get_rope_index


def _forward(handle: Handle, stock: Callable) -> Callable:
    """A prefill with images under reduction: encode them first, put each kept token at its anchor
    cell's position, then run the stock forward on those features and positions.

    Every call (reduced or not) also keeps its prefill's M-RoPE delta with its cache: transformers keeps
    one `rope_deltas` on the model, so two chats on one model (the app's two sides) would continue each
    other's caches at the wrong positions."""
    signature = inspect.signature(stock)
    deltas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prefill's (B, 1) deltas

    def forward(*args: Any, **kwargs: Any):
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        cache = arguments.get("cache", arguments.get("past_key_values"))
        filled = cache is not None and cache.get_seq_length() > 0
        if filled and cache in deltas:
            _continue_at(handle.base, arguments, cache, deltas[cache])
        if handle.settings.enabled:
            if filled and (arguments.get("pixel_values") is not None or arguments.get("mm_encoder_outputs")):
                raise ValueError("Qwen2.5-VL under reduction takes images at the prefill only, not on a filled cache")
            _reduce_for_prefill(handle, arguments)
        output = stock(**arguments)
        if cache is not None and not filled and handle.base.rope_deltas is not None:
            deltas[cache] = handle.base.rope_deltas
        return output

    return forward


def _continue_at(base: nn.Module, arguments: dict, cache: Any, deltas: torch.Tensor) -> None:
    """A forward on a filled cache continues at the positions of that cache's prefill: the text position
    (as transformers counts it) plus that prefill's delta, in the shape the caller gave (generate() adds
    the model's last delta, which another chat may have set)."""
    base.rope_deltas = deltas
    given = arguments.get("position_ids")
    if given is None:
        return  # the stock forward adds base.rope_deltas
    reference = arguments.get("input_ids")
    if reference is None:
        reference = arguments["inputs_embeds"][..., 0]
    batch, length = reference.shape
    past, mask = cache.get_seq_length(), arguments.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + length:
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length:]
    else:
        text = torch.arange(past, past + length, device=given.device).expand(batch, -1)
    text = text.to(given.device)[None]  # (1, B, n)
    rope = (text + deltas.to(given.device)).expand(3, -1, -1)
    arguments["position_ids"] = torch.cat([text, rope]) if given.shape[0] == 4 else rope[: given.shape[0]]


def _reduce_for_prefill(handle: Handle, arguments: dict) -> None:
    """Encode the prefill's images under the reduction (unless generate() did) and place their tokens."""
    if arguments.get("pixel_values_videos") is not None:
        raise ValueError(VIDEO_REFUSED)
    pixels, encoded = arguments.get("pixel_values"), dict(arguments.get("mm_encoder_outputs") or {})
    if pixels is None and encoded.get("image") is None:
        return
    if pixels is not None:
        encoded["image"] = reduced_image_features(handle, pixels, arguments.get("image_grid_thw"), handle.settings)
    anchors, grid = (getattr(encoded["image"], name, None) for name in ("anchors", "grid_thw"))
    if anchors is None:
        raise ValueError("these image features were not encoded under the reduction: encode them in the same call")
    input_ids = arguments.get("input_ids")
    if input_ids is None or arguments.get("mm_token_type_ids") is None:
        raise ValueError("Qwen2.5-VL under reduction needs input_ids and mm_token_type_ids (the processor's)")
    mask = arguments.get("attention_mask")
    positions, deltas = rope_index(handle.base, input_ids, arguments["mm_token_type_ids"], grid, mask, anchors)
    given = arguments.get("position_ids")
    if given is not None and given.shape[0] == 4:  # generate's: the text positions row, then M-RoPE's
        positions = torch.cat([given[:1], positions.to(given.device)])
    handle.base.rope_deltas = deltas
    arguments.update(pixel_values=None, position_ids=positions, mm_encoder_outputs=encoded)


def _replace_image_token(handle: Handle, stock: Callable) -> Callable:
    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        settings = handle.settings
        if not settings.enabled:
            return stock(image_inputs, image_idx, **kwargs)
        merge = handle.processor.image_processor.merge_size
        _, height, width = (int(n) for n in image_inputs["image_grid_thw"][image_idx])
        return handle.processor.image_token * grid_count((height // merge, width // merge), settings)

    return replace_image_token


def _counts(handle: Handle, stock: Callable) -> Callable:
    def get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
        result = stock(image_sizes=image_sizes, **kwargs)
        settings = handle.settings
        if not settings.enabled or image_sizes is None:
            return result
        result.num_image_tokens = [reduced_count(handle, _as_size(size), settings) for size in image_sizes]
        return result

    return get_num_multimodal_tokens
