"""Budget scrubbing (issue 19, item 4): a text-agnostic method's choice at any budget, redrawn without the
chat and without the vision tower.

The tower runs once per image and model (`run_tower`): it keeps the feature layer's signals per tile (its
output, the CLS attention row, the head-mean keys), which is all a per-tile method reads, and, made on
first need, the image's stock packed projector rows, which is all a per-image method reads.  On a family
without tiles (Qwen2.5-VL: `BUDGET_PER_IMAGE`) it keeps the image's merged cells instead (the merger's
outputs, the attention each receives and their keys: the family's `tower_cells`), and the family chooses
on them (`cells_selection`).  A budget's
choice is then only the method's own selection function on those (`cached_selection`), with the
projection of the kept tokens left out: the overlay needs what was kept, not the features.  Plain
functions, so that any view (the researcher's page, a presenter view) can call them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

import visionzip
from app.hosting import ON_ZEROGPU, clock
from app.models import LoadedModel
from app.modes import Mode, allowed_tile_tokens, matched_mode, use_mode
from visionzip.cost import prefill_flops
from visionzip.tower import TowerSignals

if TYPE_CHECKING:
    from visionzip.patch.qwen2_5_vl import ImageCells

MAX_CACHED_IMAGES = 4  # (model, image) pairs whose tower signals are kept; the least recently used go first


@dataclass
class TowerCache:
    """One tower run on one image: what a text-agnostic method needs to choose at any budget."""

    model: str  # registry label
    image_size: tuple[int, int]  # (H, W)
    grid: tuple[int, int]  # the anyres grid (rows, cols); (0, 0) for a lone tile
    signals: TowerSignals | None  # hidden (T, 1 + P, C), cls_attn (T, 1 + P), keys_mean (T, 1 + P, d); None on cells
    tower_ms: float  # the tower's own time for this image (clock after the device finished)
    picture: Image.Image | None = field(default=None, repr=False)  # the image itself, for redraws
    rows: torch.Tensor | None = None  # (N, E) the stock packed projector output, for per-image methods
    patch_map: torch.Tensor | None = None  # (N,) tile * P + patch behind each row, -1 for a newline
    orders: dict = field(default_factory=dict, repr=False)  # per-image method -> its order of the rows, or None
    choices: dict = field(default_factory=dict, repr=False)  # Mode.key -> ImageSelection, already chosen
    cells: ImageCells | None = None  # a family without tiles: merger outputs (N, E), scores (N,), keys (N, d)

    @property
    def num_tiles(self) -> int:
        return 1 if self.signals is None else self.signals.hidden.shape[0]


@dataclass(frozen=True)
class Scrubbed:
    """One budget's redraw: the mode it stands for, what it keeps, and what it predicts for prefill."""

    mode: Mode
    selection: visionzip.ImageSelection
    visual_tokens: int  # this image's visual tokens under `mode`
    stock_tokens: int  # ... with every visual token
    prefill_gflop: float  # predicted LM prefill of the visual tokens and `text_tokens`
    stock_prefill_gflop: float  # ... with every visual token
    text_tokens: int  # the prompt's text tokens counted in the prediction
    picture: Image.Image | None = None  # the image it was chosen on, to draw on

    @property
    def prefill_share(self) -> float:
        return self.prefill_gflop / self.stock_prefill_gflop


def can_scrub(mode: Mode) -> bool:
    """Whether `mode`'s choice follows from the tower's signals alone (no question, model's own projector)."""
    return mode.enabled and not mode.reads_text and mode.tuned is None


def run_tower(loaded: LoadedModel, image: Image.Image) -> TowerCache:
    """Run the vision tower once on `image` with the signal hooks on, and keep their signals."""
    handle = loaded.handle
    if _per_image_family(loaded):
        return _run_cells(loaded, image)
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    size = (image.height, image.width)
    count = handle.family.num_tiles(handle.base.config, size)
    tiles = pixels.reshape(-1, *pixels.shape[-3:])[:count].to(loaded.device, loaded.dtype)  # (T, 3, H, W)
    grid_shape = getattr(handle.family, "grid_shape", None)
    grid = tuple(grid_shape(handle.base.config, size)) if grid_shape is not None else (0, 0)
    with torch.inference_mode(), handle.capture(attention=True) as signals:
        start = clock(loaded.device)
        handle.base.vision_tower(tiles)
        tower_ms = (clock(loaded.device) - start) * 1000
    # plain data, no handle (on ZeroGPU it is pickled back): the methods it serves read only the signals
    kept = TowerSignals(signals.hidden, signals.cls_attn, signals.keys_mean, cls_tokens=signals.cls_tokens)
    cache = TowerCache(loaded.label, size, grid, kept, tower_ms, image)
    if ON_ZEROGPU:  # made in a worker process: only CPU tensors come back, and the projector stays behind
        with torch.inference_mode():
            cache.rows, cache.patch_map = (t.cpu() for t in _stock_rows(loaded, cache))
        cache.signals = replace(
            kept, hidden=kept.hidden.cpu(), cls_attn=kept.cls_attn.cpu(), keys_mean=kept.keys_mean.cpu()
        )
    return cache


def _per_image_family(loaded: LoadedModel) -> bool:
    """A family without tiles, whose every budget counts one image's tokens (Qwen2.5-VL's merged cells)."""
    return getattr(loaded.handle.family, "BUDGET_PER_IMAGE", False)


def _run_cells(loaded: LoadedModel, image: Image.Image) -> TowerCache:
    """`run_tower` on a family without tiles: the tower once, with the signal read, its cells kept."""
    handle = loaded.handle
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")
    grid_thw = pixels["image_grid_thw"].to(loaded.device)
    with torch.inference_mode():
        start = clock(loaded.device)
        [cells] = handle.family.tower_cells(
            handle, pixels["pixel_values"].to(loaded.device, loaded.dtype), grid_thw, True
        )
        tower_ms = (clock(loaded.device) - start) * 1000
    if ON_ZEROGPU:  # made in a worker process: only CPU tensors come back
        cells = replace(cells, features=cells.features.cpu(), scores=cells.scores.cpu(), keys=cells.keys.cpu())
    return TowerCache(loaded.label, (image.height, image.width), cells.grid, None, tower_ms, image, cells=cells)


def _stock_rows(loaded: LoadedModel, cache: TowerCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) the image's stock packed features from the cached feature layer, and their patch map,
    as the family packs them for a per-image method (visionzip.patch: `_pack_rows`, LLaVA-1.5's rows)."""
    base, side = loaded.handle.base, loaded.handle.side
    strategy = base.config.vision_feature_select_strategy
    hidden = cache.signals.hidden
    device = next(base.multi_modal_projector.parameters()).device
    features = base.multi_modal_projector((hidden[:, 1:] if strategy == "default" else hidden).to(device))
    if not hasattr(base, "pack_image_features"):  # LLaVA-1.5: one tile, its rows as they are
        rows = features[0]
        return rows, torch.arange(rows.shape[0]) - (rows.shape[0] - side * side)  # CLS -> -1
    size, packing = torch.tensor(cache.image_size), loaded.handle.family.STOCK_PACKING  # LLaVA-NeXT's, OneVision's

    def pack(tile_features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        return packing.pack(base, tile_features, size, newline)

    return pack(features, base.image_newline), packing.patch_map(pack, cache.num_tiles, side, cache.grid)


def cached_selection(loaded: LoadedModel, cache: TowerCache, mode: Mode) -> visionzip.ImageSelection:
    """What `mode` (text-agnostic) keeps on the cached image: its method's selection on the tower's
    signals, without the tower and without projecting what it kept."""
    if not can_scrub(mode):
        raise ValueError(
            f"{mode.method_title} cannot be previewed from the tower alone: it chooses by the question, "
            "or runs a tuned projector"
        )
    if mode.key in cache.choices:
        return cache.choices[mode.key]
    method, handle = mode.reducer, loaded.handle
    with torch.inference_mode(), use_mode(loaded, mode):
        settings = handle.settings
        if cache.cells is not None:  # a family without tiles chooses on the image's cells
            cache.choices[mode.key] = handle.family.cells_selection(cache.cells, settings)
            return cache.choices[mode.key]
        count = handle.num_image_tokens(cache.image_size)
        if method.budget_rule == "per tile":
            tiles = method.reduce_tiles(cache.signals, settings, _unprojected).tiles
        else:
            kept = _image_rows(loaded, cache, method, settings)  # (k,) ascending rows
            tiles = method.image_record(kept, cache.patch_map, cache.num_tiles, handle.side)
        selection = visionzip.ImageSelection(
            cache.image_size, cache.grid, list(tiles), count, method.name, settings.describe(handle.family.PRESETS_KEY)
        )
    cache.choices[mode.key] = selection
    return selection


def _image_rows(loaded: LoadedModel, cache: TowerCache, method: visionzip.Method, settings) -> torch.Tensor:
    """A per-image method's kept rows: the prefix of its order when its choices nest (DivPrune's greedy
    order, found once per image), else its own selection at this budget."""
    if cache.rows is None:
        cache.rows, cache.patch_map = _stock_rows(loaded, cache)
    if method.name not in cache.orders:
        cache.orders[method.name] = method.image_order(cache.rows)
    order = cache.orders[method.name]
    if order is None:
        return method.reduce_image(cache.rows, settings)
    return order[: method.image_tokens(settings, cache.rows.shape[0])].sort().values


def _unprojected(tokens: torch.Tensor) -> torch.Tensor:
    """A projector that projects nothing: (T, k, C) -> (T, k, 0).  The overlay reads what was kept."""
    return tokens[..., :0]


def budget_values(loaded: LoadedModel, mode: Mode, image_size: tuple[int, int]) -> list[int]:
    """Every budget `mode`'s method allows on this image, in its own unit (tokens per tile for a per-tile
    method, VisionZip's dominant + contextual included; tokens per image for a per-image one), ascending."""
    method, handle = mode.reducer, loaded.handle
    if _per_image_family(loaded):
        return handle.family.budget_values(handle, image_size, method.name)
    if method.budget_rule == "per image":
        with handle.use(enabled=False):
            return list(range(1, handle.num_image_tokens(image_size) + 1))
    patches = handle.side * handle.side  # 576 for CLIP-L/14-336 (+ CLS), 729 for SigLIP-384/14 (no CLS)
    if method.budget_kind == "dominant+contextual":
        return list(range(1, patches + 1))  # D >= 1, D + C at most the patches
    return allowed_tile_tokens(method, handle.side, patches)


def budget_value(loaded: LoadedModel, mode: Mode) -> int:
    """`mode`'s budget in the unit `budget_values` counts."""
    if mode.reducer.budget_kind == "dominant+contextual":
        return mode.dominant + mode.contextual
    return mode.tokens


def mode_at(loaded: LoadedModel, mode: Mode, image_size: tuple[int, int], value: int) -> Mode:
    """`mode`'s method at budget `value` (in its own unit), or the nearest budget it allows."""
    method, handle = mode.reducer, loaded.handle
    if method.budget_rule == "per image" or _per_image_family(loaded):  # the value is the image's count
        return replace(matched_mode(loaded, mode, image_size, int(value)), seed=mode.seed)
    tiles = handle.family.num_tiles(handle.base.config, image_size)
    target = int(value) * tiles + (1 if tiles == 1 else 0)  # matched_mode counts a lone tile's newline
    return replace(matched_mode(loaded, mode, image_size, target), seed=mode.seed)


def scrub(loaded: LoadedModel, cache: TowerCache, mode: Mode, value: int, text_tokens: int = 0) -> Scrubbed:
    """The redraw at budget `value`: the mode it stands for, what it keeps, the count and the predicted
    LM prefill (visual tokens + `text_tokens`), from the cache alone."""
    at = mode_at(loaded, mode, cache.image_size, value)
    selection = cached_selection(loaded, cache, at)
    with loaded.handle.use(enabled=False):
        stock = loaded.handle.num_image_tokens(cache.image_size)
    text_config = loaded.model.config.text_config
    return Scrubbed(
        at,
        selection,
        selection.num_tokens,
        stock,
        prefill_flops(text_config, selection.num_tokens + text_tokens) / 1e9,
        prefill_flops(text_config, stock + text_tokens) / 1e9,
        text_tokens,
        cache.picture,
    )


class TowerCaches:
    """The tower signals of the last MAX_CACHED_IMAGES (model, image) pairs, shared by the page's events."""

    def __init__(self, max_entries: int = MAX_CACHED_IMAGES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, TowerCache] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> TowerCache | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            return self._entries.get(key)

    def put(self, key: tuple, cache: TowerCache) -> TowerCache:
        with self._lock:
            self._entries[key] = cache
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return cache


def scrub_markdown(result: Scrubbed) -> str:
    """The count and the predicted prefill of one budget, as one Markdown line."""
    text = f" + {result.text_tokens:,} text" if result.text_tokens else ""
    return (
        f"**{result.visual_tokens:,} visual tokens** for this image (of {result.stock_tokens:,}) under "
        f"{result.mode.label} · predicted LM prefill of the visual{text} tokens: **{result.prefill_gflop:,.3g} GFLOP**, "
        f"{result.prefill_share:.0%} of {result.stock_prefill_gflop:,.3g} GFLOP with every visual token"
    )
