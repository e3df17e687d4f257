"""`Qwen2_5_VLModel` (Qwen2.5-VL): dynamic resolution, a CLS-free windowed tower, a 2x2 merger, M-RoPE.

An image becomes one grid of rows x cols merged tokens ("cells", `visionzip.merged_grid`), its size
known from the image size (the processor's `smart_resize` to multiples of 28 px).  Every method
chooses per image among those cells (a "per tile" budget is per image here), so the processor expands
`<|image_pad|>` to the reduced count before any pixel is seen.  The kept tokens keep their own cells'
M-RoPE (t, h, w) positions: the text after the image keeps the positions it has in the stock model.

Budgets: a method keeps min(budget, N) of an image's N cells (VisionZip: dominant + contextual);
Pool pools the grid with the smallest square window s whose ceil(rows/s) x ceil(cols/s) grid fits
the budget.  CDPruner is refused (it scores by CLIP's text tower, whose embedding space this tower
does not share).

Video (`pixel_values_videos`, `video_grid_thw`): the tower pairs frames (temporal patch 2), so a clip of
F frames is T = ceil(F/2) temporal slices of rows x cols cells each.  Every method chooses per slice,
with the budget per slice, exactly as on an image of that grid: the tower's full-attention blocks attend
within one slice only (its `cu_seqlens` has one segment per slice), so the signal is per slice, and a
per-slice budget keeps every moment of the clip and makes the count T x (an image's count) before any
pixel is seen; the processor expands `<|video_pad|>` to it.  Random draws slice k's cells as the k-th
draw of one seeded generator.  The kept tokens keep their cells' (t, h, w) positions, t scaled by
`second_per_grid_ts` as in the stock model.  FastV is refused on video (it chooses among the image
placeholders inside the language model).
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
FASTV_VIDEO_REFUSED = (
    "FastV chooses among the image placeholders inside the language model: on Qwen2.5-VL it runs on images, "
    "not video. Pick a method that chooses on the tower's cells, or run video with the reduction off"
)


# -- geometry --------------------------------------------------------------------------------------
def merged_grid(processor: Any, image_size: tuple[int, int], part: str = "image_processor") -> tuple[int, int]:
    """(rows, cols) of merged cells an image (or a video frame, part="video_processor") of (height, width)
    becomes, from that processor's own resize rule (multiples of patch * merge pixels, within its bounds)."""
    images = getattr(processor, part)
    factor = images.patch_size * images.merge_size
    height, width = smart_resize(
        *image_size, factor=factor, min_pixels=images.size["shortest_edge"], max_pixels=images.size["longest_edge"]
    )
    return height // factor, width // factor


def video_grid(processor: Any, video_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(slices, rows, cols) a clip of (frames, height, width) becomes: the frames paired by the temporal
    patch (an odd last frame repeated, as the video processor pads), each slice a grid of merged cells."""
    if processor.video_processor is None:
        raise ValueError("this processor has no video processor: Qwen2.5-VL video needs one (see workarounds)")
    frames, height, width = (int(n) for n in video_size)
    return (math.ceil(frames / processor.video_processor.temporal_patch_size),) + merged_grid(
        processor, (height, width), "video_processor"
    )


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


def clip_count(slices: int, grid: tuple[int, int], settings: Settings) -> int:
    """Tokens a clip of `slices` temporal slices of rows x cols cells becomes under `settings`: the
    budget is per slice.  Refuses FastV (images only)."""
    if not settings.enabled:
        return slices * grid[0] * grid[1]
    if settings.method == "fastv":
        raise ValueError(FASTV_VIDEO_REFUSED)
    return slices * grid_count(grid, settings)


def num_video_tokens(handle: Handle, video_size: tuple[int, int, int], settings: Settings) -> int:
    """Visual tokens a clip of (frames, height, width) becomes under `settings`, before any pixel is seen."""
    if handle.processor is None:
        raise ValueError("counting Qwen2.5-VL tokens needs the processor passed to apply()")
    slices, rows, cols = video_grid(handle.processor, video_size)
    return clip_count(slices, (rows, cols), settings)


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


# -- the methods on one image's (or one video slice's) cells -------------------------------------------
def _choose(features: torch.Tensor, scores, keys, grid: tuple[int, int], settings: Settings, drawn=None):
    """(N, E) one image's (or slice's) merger outputs -> (k, E) tokens in anchor order and their
    `CellChoice`; `drawn`: Random's (k,) cells for this slice (drawn for all of an input's slices at once)."""
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
        kept = drawn.to(features.device)
    elif method == "divprune":
        kept = divprune_select(features, count)
    elif method == "vispruner":
        kept = vispruner_select(scores[None], features[None], count)[0]
    else:
        raise ValueError(f"{get_method(method).title} does not run on Qwen2.5-VL")
    return features[kept], kept_choice(kept, scores)


@dataclass
class Chosen:
    """One input's (image's or clip's) choice: per temporal slice (one for an image) its (k, E) tokens and
    `CellChoice` over its rows x cols cells."""

    grid: tuple[int, int]
    slices: list[tuple[torch.Tensor, CellChoice]]

    def tokens(self) -> torch.Tensor:
        """(sum k, E) the slices' tokens in time order."""
        return torch.cat([tokens for tokens, _ in self.slices])

    def anchors(self) -> torch.Tensor:
        """(sum k,) each token's cell in the input's (t, h, w) raster: slice t's anchors + t * cells."""
        cells = self.grid[0] * self.grid[1]
        return torch.cat([choice.anchors + t * cells for t, (_, choice) in enumerate(self.slices)])


def _slice_cells(grid_thw: torch.Tensor, merge: int) -> list[int]:
    """Merged cells of each temporal slice of every input, in order (an image is one slice)."""
    return [h * w // merge**2 for t, h, w in grid_thw.tolist() for _ in range(t)]


def _tower_signals(handle: Handle, pixel_values: torch.Tensor, grid_thw: torch.Tensor, attention: bool):
    """The tower on every input: (sum N, E) merged outputs and, per temporal slice (one per image), its
    cells' scores and keys (None unless `attention`: read the signal)."""
    visual = handle.base.visual
    with handle.capture(attention=attention) as signals:
        merged = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw).pooler_output  # (N total, E)
    config = visual.config
    slice_cells = _slice_cells(grid_thw, config.spatial_merge_size)
    if not signals.received:  # one received vector per slice: full attention never crosses slices
        return merged, [None] * len(slice_cells), [None] * len(slice_cells)
    window_index, _ = get_vision_window_index(
        grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    window_index = window_index.to(merged.device)
    scores = cells_from_window_order(torch.cat(signals.received), window_index).split(slice_cells)
    keys = cells_from_window_order(signals.keys, window_index).split(slice_cells)
    return merged, scores, keys


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
    """The tower on images (one temporal slice each), with the signal read (`attention`) or not: per image its cells."""
    merged, scores, keys = _tower_signals(handle, pixel_values, grid_thw, attention)
    merge = handle.base.visual.config.spatial_merge_size
    grids = [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]
    return [ImageCells(*parts) for parts in zip(merged.split(_slice_cells(grid_thw, merge)), scores, keys, grids)]


def cells_selection(cells: ImageCells, settings: Settings) -> ImageSelection:
    """What `settings` keeps of one image's cells, recorded as a real call records it: a budget slider's
    choice from one tower run (cells read with the signal) at any budget.  Methods that read no signal
    get none, as in a real call; Random draws as `encode_images` draws an image's one slice."""
    method = get_method(settings.method)
    if settings.method in REFUSED or method.reads_text:
        raise ValueError(f"{method.title} cannot choose from the tower's cells alone on Qwen2.5-VL")
    signal = (cells.scores, cells.keys) if method.needs_attention else (None, None)
    count, total = grid_count(cells.grid, settings), cells.grid[0] * cells.grid[1]
    drawn = draw_patches(1, total, count, settings.seed)[0] if settings.method == "random" and count < total else None
    tokens, choice = _choose(cells.features, *signal, cells.grid, settings, drawn)
    tiles = LazyTiles(1, lambda: [_tile(choice, *cells.grid)])
    return ImageSelection(None, cells.grid, tiles, tokens.shape[0], method.name, settings.describe(PRESETS_KEY))


def budget_values(handle: Handle, image_size: tuple[int, int], method: str) -> list[int]:
    """Every per-image budget `method` runs at on an image of `image_size`, ascending: 1 to its N cells, or
    for pooling the counts its square windows give (`grid_count`)."""
    rows, cols = merged_grid(handle.processor, image_size)
    if method == "pool":
        return sorted({math.ceil(rows / window) * math.ceil(cols / window) for window in range(1, max(rows, cols) + 1)})
    return list(range(1, rows * cols + 1))


def encode_images(handle: Handle, pixel_values: torch.Tensor, grid_thw: torch.Tensor, settings: Settings):
    """The tower on every image or clip, then the method per temporal slice: one `Chosen` per input."""
    merged, scores, keys = _tower_signals(handle, pixel_values, grid_thw, get_method(settings.method).needs_attention)
    merge = handle.base.visual.config.spatial_merge_size
    slices = iter(zip(scores, keys))
    features = iter(merged.split(_slice_cells(grid_thw, merge)))
    chosen = []
    for t, h, w in grid_thw.tolist():
        grid = (h // merge, w // merge)
        draws = [None] * t
        if settings.method == "random" and grid_count(grid, settings) < grid[0] * grid[1]:
            draws = list(draw_patches(t, grid[0] * grid[1], grid_count(grid, settings), settings.seed))
        parts = [_choose(next(features), *next(slices), grid, settings, drawn) for drawn in draws]
        chosen.append(Chosen(grid, parts))
    return chosen


def _selections(handle: Handle, chosen: list[Chosen], settings: Settings) -> list[ImageSelection]:
    """One `ImageSelection` per image or per clip's temporal slice."""
    method = get_method(settings.method)
    describe = settings.describe(handle.family.PRESETS_KEY)
    images = []
    for (rows, cols), slices in ((one.grid, one.slices) for one in chosen):
        for tokens, choice in slices:
            if settings.method == "fastv":  # chosen inside the language model, recorded there
                tiles = FastVTiles(CellChoiceInLM(torch.arange(rows * cols), 1, handle.side, grid=(rows, cols)))
            else:
                tiles = LazyTiles(1, lambda choice=choice, rows=rows, cols=cols: [_tile(choice, rows, cols)])
            # the image's own size is unknown here; the cells cover the whole picture evenly
            images.append(ImageSelection(None, (rows, cols), tiles, tokens.shape[0], method.name, describe))
    return images


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
@dataclass
class Visuals:
    """A prompt's images and videos, in order, for `rope_index`: their grids, each video's seconds per
    temporal slice (None: 1, as stock), and per input the cells its tokens stand at in its (t, h, w)
    raster (None: its first cells, for callers that only need the text positions and deltas)."""

    image_grid_thw: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: Any = None
    image_anchors: tuple[torch.Tensor, ...] | None = None
    video_anchors: tuple[torch.Tensor, ...] | None = None

    def inputs(self, tokens_per_second: float) -> dict[int, Any]:
        """Per placeholder kind (1 image, 2 video): an iterator of (grid, anchors or None, time interval)."""
        seconds = self.second_per_grid_ts if self.second_per_grid_ts is not None else itertools.repeat(1)
        images = self.image_grid_thw if self.image_grid_thw is not None else []
        videos = self.video_grid_thw if self.video_grid_thw is not None else []
        return {
            1: zip(images, self.image_anchors or itertools.repeat(None), itertools.repeat(1)),
            2: zip(videos, self.video_anchors or itertools.repeat(None), (tokens_per_second * s for s in seconds)),
        }


def rope_index(
    base: nn.Module,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    visuals: Visuals,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`get_rope_index` for reduced images and videos: (3, B, L) positions and (B, 1) deltas.  Text as
    stock; an input's k tokens get the stock positions of their anchor cells; the text after it starts
    where it does in the stock model, and a delta is stock's (the largest stock position + 1, of the
    full grids too, minus the length)."""
    merge = base.config.vision_config.spatial_merge_size
    positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    inputs = visuals.inputs(base.config.vision_config.tokens_per_second)
    deltas = []
    for row in range(input_ids.shape[0]):
        kinds = mm_token_type_ids[row]
        if attention_mask is not None:
            kinds = kinds[attention_mask[row].bool()]
        pieces, current, top = [], 0, 0
        for kind, group in itertools.groupby(kinds.tolist()):
            length = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(length, device=input_ids.device).expand(3, -1) + current)
                current += length
                continue
            grid, kept, interval = next(inputs[kind])
            full = base.get_vision_position_ids(current, grid, 1, merge, interval, device=input_ids.device)  # (3, N)
            kept = kept if kept is not None else torch.arange(length)
            if kept.shape[0] != length:
                name = "an image" if kind == 1 else "a video"
                raise ValueError(f"{name} has {length} placeholder tokens but {kept.shape[0]} features")
            pieces.append(rope_positions(full, kept))
            top = max(top, int(full.max()) + 1)
            current += max(int(grid[1]), int(grid[2])) // merge
        sequence = torch.cat(pieces, dim=1)
        if attention_mask is not None:
            positions[:, row, attention_mask[row].bool()] = sequence
        else:
            positions[:, row] = sequence
        deltas.append(max(top, current) - kinds.shape[0])
    return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


# -- the overrides ----------------------------------------------------------------------------------
def patch(handle: Handle) -> Callable[[], None]:
    """Install the model's and processor's overrides on the instances; returns what undoes them."""
    base, processor = handle.base, handle.processor
    if "get_image_features" in base.__dict__:
        raise ValueError("VisionZip is already applied to this model: reuse its handle, or call handle.remove() first")
    overrides = {
        "get_image_features": _features(handle, base.get_image_features, "image"),
        "get_video_features": _features(handle, base.get_video_features, "video"),
        "get_rope_index": _rope_index(handle, base.get_rope_index),
        "forward": _forward(handle, base.forward),
    }
    # accelerate's device hooks may already sit on the instance's forward: put them back on removal
    previous = {name: base.__dict__.get(name) for name in overrides}
    for name, function in overrides.items():
        setattr(base, name, function)
    undo = [lambda name=name: _restore(base, name, previous[name]) for name in overrides]
    if processor is not None:
        names = ("replace_image_token", "replace_video_token", "_get_num_multimodal_tokens")
        for kind in ("image", "video"):
            name = f"replace_{kind}_token"
            setattr(processor, name, _Override(_replace_token(handle, getattr(processor, name), kind)))
        processor._get_num_multimodal_tokens = _Override(_counts(handle, processor._get_num_multimodal_tokens))
        undo += [lambda name=name: processor.__dict__.pop(name, None) for name in names]

    def unpatch() -> None:
        for restore in undo:
            restore()

    return unpatch


@dataclass
class CellFeatures(BaseModelOutputWithPooling):
    """`get_image_features`' (or `get_video_features`') output under reduction, with each input's anchor
    cells: generate() encodes them before the prefill's forward, which puts the tokens at those cells'
    positions, and records the selections of both kinds together."""

    anchors: tuple[torch.Tensor, ...] | None = None
    grid_thw: torch.Tensor | None = None  # generate() drops image_grid_thw from the forward's inputs
    selections: list[ImageSelection] | None = None  # per image, or per clip's temporal slice


def _restore(owner: Any, name: str, previous: Any) -> None:
    if previous is None:
        owner.__dict__.pop(name, None)
    else:
        setattr(owner, name, previous)


def reduced_image_features(handle: Handle, pixel_values, image_grid_thw, settings: Settings, **kwargs: Any):
    """What `get_image_features` (or `get_video_features`, given a clip's pixels and `video_grid_thw`)
    returns under reduction (the family protocol's entry point); records the selections."""
    chosen = encode_images(handle, pixel_values, image_grid_thw, settings)
    selections = _selections(handle, chosen, settings)
    handle.record(selections)
    tokens = tuple(one.tokens() for one in chosen)
    anchors = tuple(one.anchors() for one in chosen)
    return CellFeatures(pooler_output=tokens, anchors=anchors, grid_thw=image_grid_thw, selections=selections)


def _reduced(handle: Handle, kind: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> CellFeatures:
    """Images or a video ("image" / "video") under the handle's settings; FastV refuses video."""
    if kind == "video" and handle.settings.method == "fastv":
        raise ValueError(FASTV_VIDEO_REFUSED)
    return reduced_image_features(handle, pixel_values, grid_thw, handle.settings)


def _features(handle: Handle, stock: Callable, kind: str) -> Callable:
    """`get_image_features` or `get_video_features` (kind "image" / "video"): stock when off."""

    signature = inspect.signature(stock)
    pixels_name, grid_name = list(signature.parameters)[:2]  # pixel_values(_videos), image/video_grid_thw

    def get_features(*args: Any, **kwargs: Any):
        if not handle.settings.enabled:
            return stock(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        return _reduced(handle, kind, arguments[pixels_name], arguments.get(grid_name))

    get_features.__signature__ = signature
    return get_features


def _rope_index(handle: Handle, stock: Callable) -> Callable:
    """generate() asks for the prompt's positions before any pixel is encoded: the text positions and
    deltas are right here; the forward then puts the visual tokens at their anchors' positions."""

    def get_rope_index(
        input_ids,
        mm_token_type_ids=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
        **kwargs: Any,
    ):
        given = (image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask)
        if not handle.settings.enabled or (image_grid_thw is None and video_grid_thw is None):
            return stock(input_ids, mm_token_type_ids, *given, **kwargs)
        visuals = Visuals(image_grid_thw, video_grid_thw, second_per_grid_ts)
        return rope_index(handle.base, input_ids, mm_token_type_ids, visuals, attention_mask)

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
            pixels = (arguments.get(name) is not None for name in ("pixel_values", "pixel_values_videos"))
            if filled and (any(pixels) or arguments.get("mm_encoder_outputs")):
                raise ValueError(
                    "Qwen2.5-VL under reduction takes images and video at the prefill only, not on a filled cache"
                )
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
    """Encode the prefill's images and videos under the reduction (unless generate() did) and place their
    tokens at their anchors' positions."""
    encoded = dict(arguments.get("mm_encoder_outputs") or {})
    for kind, pixels, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if arguments.get(pixels) is not None:
            encoded[kind] = _reduced(handle, kind, arguments[pixels], arguments.get(grids))
            arguments[pixels] = None
    image, video = encoded.get("image"), encoded.get("video")
    if image is None and video is None:
        return
    if any(not isinstance(features, CellFeatures) for features in (image, video) if features is not None):
        raise ValueError("these visual features were not encoded under the reduction: encode them in the same call")
    input_ids = arguments.get("input_ids")
    if input_ids is None or arguments.get("mm_token_type_ids") is None:
        raise ValueError("Qwen2.5-VL under reduction needs input_ids and mm_token_type_ids (the processor's)")
    visuals = Visuals(
        getattr(image, "grid_thw", None),
        getattr(video, "grid_thw", None),
        arguments.get("second_per_grid_ts"),
        getattr(image, "anchors", None),
        getattr(video, "anchors", None),
    )
    mask = arguments.get("attention_mask")
    positions, deltas = rope_index(handle.base, input_ids, arguments["mm_token_type_ids"], visuals, mask)
    given = arguments.get("position_ids")
    if given is not None and given.shape[0] == 4:  # generate's: the text positions row, then M-RoPE's
        positions = torch.cat([given[:1], positions.to(given.device)])
    handle.base.rope_deltas = deltas
    handle.record([*(getattr(image, "selections", None) or []), *(getattr(video, "selections", None) or [])])
    arguments.update(position_ids=positions, mm_encoder_outputs=encoded)


def _replace_token(handle: Handle, stock: Callable, kind: str) -> Callable:
    """The processor's `replace_image_token` or `replace_video_token` (kind "image" / "video"): the
    placeholder repeated for the reduced count, from the input's grid alone."""

    def replace_token(inputs: dict, *args: Any, **kwargs: Any) -> str:
        settings = handle.settings
        if not settings.enabled:
            return stock(inputs, *args, **kwargs)
        index = args[0] if args else kwargs[f"{kind}_idx"]  # transformers passes image_idx= / video_idx=
        merge = getattr(handle.processor, f"{kind}_processor").merge_size
        slices, height, width = (int(n) for n in inputs[f"{kind}_grid_thw"][index])
        grid = (height // merge, width // merge)
        count = grid_count(grid, settings) if kind == "image" else clip_count(slices, grid, settings)
        return getattr(handle.processor, f"{kind}_token") * count

    return replace_token


def _counts(handle: Handle, stock: Callable) -> Callable:
    def get_num_multimodal_tokens(image_sizes=None, video_sizes=None, **kwargs: Any):
        result = stock(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        settings = handle.settings
        if not settings.enabled:
            return result
        if image_sizes is not None:
            result.num_image_tokens = [reduced_count(handle, _as_size(size), settings) for size in image_sizes]
        if video_sizes is not None:
            result.num_video_tokens = [num_video_tokens(handle, tuple(size), settings) for size in video_sizes]
        return result

    return get_num_multimodal_tokens
