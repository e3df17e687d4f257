"""Which tokens VisionZip kept, merged or dropped, drawn on the uploaded picture.

Each tile's 24x24 patch cells are mapped back through the processor's geometry to the pixels they
came from (`tile_cell_boxes`), so the cells land on the uploaded image, not on a 336x336 thumbnail.
LLaVA-NeXT: the base tile is the whole image squashed to 336x336; the crops come from the image
resized (aspect kept) to the grid's resolution, padded centred, and cut into 336x336 tiles row by row.
LLaVA-1.5 (a lone tile, grid (0, 0)): shortest edge resized to 336, then a centre crop.
LLaVA-OneVision: as LLaVA-NeXT with 384x384 tiles of 27x27 patches (`TILE_GEOMETRY`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading

import numpy as np
import plotly.colors as pcolors
import torch
from PIL import Image, ImageDraw, ImageFont

import visionzip
from app.models import LoadedModel
from app.modes import Mode, use_mode
from visionzip import ImageSelection, TileSelection
from visionzip.merged_grid import GridTile
from visionzip.video import frame_features, frame_pixel_values

TILE_PX = 336  # CLIP-L/14-336 tile; a patch cell is TILE_PX / side pixels of the tile
# A tile's pixels by its patch grid side: (tile px, patch px).  SigLIP-384/14 (LLaVA-OneVision): 27 patches
# of 14 px cover the first 378 of the tile's 384 px; its tiles are cut like LLaVA-NeXT's.
TILE_GEOMETRY = {24: (336, 14), 27: (384, 14)}
CLS_FREE_SIDES = {27}  # patch grids of towers without a CLS token (SigLIP): no method keeps one there


def _cls_free(tile: TileSelection) -> bool:
    """Whether the tower behind `tile` has no CLS token: SigLIP's patch grid, Qwen2.5-VL's merged cells."""
    return isinstance(tile, GridTile) or tile.side in CLS_FREE_SIDES


def signal_name(tile: TileSelection) -> str:
    """What the attention-reading methods rank patches by on `tile`."""
    return "attention received" if _cls_free(tile) else "CLS attention"


def keeps_cls(method_name: str, tile: TileSelection) -> bool:
    """Whether `method_name`'s tokens include a CLS token on `tile`."""
    return visionzip.get_method(method_name).keeps_cls and not _cls_free(tile)


PANEL_LONG_SIDE = 1024  # drawn size of each picture: big enough for a projector, small enough to be quick
TITLE_PX = 44  # height of the title strip above each panel of a multi-panel view

# The overlay's colours and the words the page uses for them, in one place.
KEPT_RGB = (255, 221, 0)  # kept (dominant) tokens: one clear colour, absent from the group palette
KEPT_NAME = "Yellow"
LEFT_ONLY_RGB, LEFT_ONLY_NAME = (66, 133, 244), "blue"  # the difference view: kept by one side, the other, both
RIGHT_ONLY_RGB, RIGHT_ONLY_NAME = (255, 140, 0), "orange"
BOTH_RGB, BOTH_NAME = (52, 199, 89), "green"
FILMSTRIP_LEGEND = (
    f"{KEPT_NAME}: kept tokens; colours: merged groups (contextual tokens, pooling windows), ⚪ on each anchor. "
)
KEPT_TINT = 0.35
GROUP_TINT = 0.45
BACKGROUND_DIM = 0.6  # merged and dropped cells sit on a darkened picture so kept cells stand out
DROPPED_DIM = 0.2  # contextual=0: patches that feed no token at all
HEAT_TINT = 0.7
HEAT_SCALE = "Inferno"


# -- geometry -------------------------------------------------------------------------------------
def tile_cell_boxes(
    image_size: tuple[int, int], grid: tuple[int, int], tile_index: int, side: int = 24, tile_px: int | None = None
) -> np.ndarray:
    """(side*side, 4) boxes x0, y0, x1, y1 in pixels of the uploaded (H, W) image, one per patch cell
    of tile `tile_index` in raster order; a row of NaN marks a cell that lies entirely in padding.

    `grid` is the selection's (rows, cols): (0, 0) for a LLaVA-1.5 lone tile, else LLaVA-NeXT, where
    tile 0 is the base image and tile k (1-based) the k-th crop of the grid, row by row."""
    height, width = image_size
    rows, cols = grid
    if tile_px is None:
        tile_px, cell = TILE_GEOMETRY.get(side, (TILE_PX, TILE_PX / side))
    else:
        cell = tile_px / side
    if rows * cols == 0:  # LLaVA-1.5: resize the shortest edge to tile_px, then centre-crop
        if width <= height:
            new_w, new_h = tile_px, int(tile_px * height / width)
        else:
            new_h, new_w = tile_px, int(tile_px * width / height)
        # the tile's origin on the resized canvas, and the canvas area that holds the picture
        origin = ((new_h - tile_px) // 2, (new_w - tile_px) // 2)
        content = (0, 0, new_h, new_w)
    elif tile_index == 0:  # LLaVA-NeXT base tile: the whole picture squashed to tile_px x tile_px
        new_h, new_w = tile_px, tile_px
        origin, content = (0, 0), (0, 0, tile_px, tile_px)
    else:
        if not 1 <= tile_index <= rows * cols:
            raise ValueError(f"tile {tile_index} does not exist in a {rows}x{cols} grid (tiles 0..{rows * cols})")
        # transformers' get_patch_output_size: fit inside the grid resolution, aspect kept, ceil
        target_h, target_w = rows * tile_px, cols * tile_px
        if target_w / width < target_h / height:
            new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
        else:
            new_h, new_w = target_h, min(math.ceil(width * target_h / height), target_w)
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2  # centred padding, remainder after
        row, col = divmod(tile_index - 1, cols)
        origin = (row * tile_px, col * tile_px)
        content = (top, left, top + new_h, left + new_w)
    r, c = np.divmod(np.arange(side * side), side)
    y0, x0 = origin[0] + r * cell, origin[1] + c * cell
    top, left, bottom, right = content
    cy0, cx0 = np.maximum(y0, top), np.maximum(x0, left)
    cy1, cx1 = np.minimum(y0 + cell, bottom), np.minimum(x0 + cell, right)
    boxes = np.stack([cx0 - left, cy0 - top, cx1 - left, cy1 - top], axis=1) * ([width / new_w, height / new_h] * 2)
    boxes[(cy1 <= cy0) | (cx1 <= cx0)] = np.nan
    return boxes


def grid_cell_boxes(image_size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 4) boxes of a merged grid that covers the whole (H, W) picture evenly (Qwen2.5-VL resizes
    the picture whole to rows x cols cells of 28 px, no crop, no padding), in raster order."""
    height, width = image_size
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows], axis=1)


def view_choices(selection: ImageSelection) -> list[str]:
    """Views of one image: "all", and for a LLaVA-NeXT grid also "base" and "crop 1".. "crop n"."""
    return ["all"] if len(selection.tiles) == 1 else ["all"] + tile_names(selection)


def tile_names(selection: ImageSelection) -> list[str]:
    """Display name of each tile: "base", "crop 1", ... ("tile" for a lone LLaVA-1.5 tile)."""
    if isinstance(selection.tiles[0], GridTile):  # Qwen2.5-VL: one grid of merged cells over the whole picture
        rows, cols = selection.grid
        return [f"{rows}x{cols} merged cells"]
    if len(selection.tiles) == 1:
        return ["tile"]
    return ["base"] + [f"crop {k}" for k in range(1, len(selection.tiles))]


def tiles_in_view(selection: ImageSelection, view: str) -> list[list[int]]:
    """Tile indices `view` shows, as panels: one panel for one tile, two (crops, base) for "all"."""
    count = len(selection.tiles)
    if view == "base" or (view == "all" and count == 1):
        return [[0]]
    if view == "all":
        return [list(range(1, count)), [0]]
    if view.startswith("crop "):
        k = view.removeprefix("crop ").strip()
        if k.isdigit() and 1 <= int(k) < count:
            return [[int(k)]]
    raise ValueError(f"unknown view {view!r} for this image; choose one of {view_choices(selection)}")


def _panel_title(selection: ImageSelection, tiles: list[int]) -> str:
    rows, cols = selection.grid
    if isinstance(selection.tiles[0], GridTile):
        return f"{rows}x{cols} merged cells (each 2x2 patches of 14 px), the whole picture resized"
    px = TILE_GEOMETRY.get(selection.tiles[0].side, (TILE_PX,))[0]
    if rows * cols == 0:
        return f"the one {px}x{px} tile (shortest edge resized, centre crop)"
    if tiles == [0]:
        return f"base tile: whole picture squashed to {px}x{px}"
    if len(tiles) == 1:
        return f"crop {tiles[0]} of the {rows}x{cols} grid"
    return f"{rows}x{cols} grid: {rows * cols} crops, high resolution"


# -- colours --------------------------------------------------------------------------------------
def group_colours(count: int) -> list[tuple[int, int, int]]:
    """One RGB colour per contextual group: evenly spaced hues of plotly's cyclic HSV scale, skipping
    the yellows and yellow-greens (0.07..0.27 of the cycle): yellow marks kept cells."""
    positions = [(0.27 + 0.8 * k / count) % 1.0 for k in range(count)]
    hues = pcolors.sample_colorscale(pcolors.cyclical.HSV, positions) if count else []
    return [tuple(round(v) for v in pcolors.unlabel_rgb(colour)) for colour in hues]


def _heat_colours(values: np.ndarray) -> np.ndarray:
    return np.array([pcolors.unlabel_rgb(c) for c in pcolors.sample_colorscale(HEAT_SCALE, list(values))])


# -- drawing --------------------------------------------------------------------------------------
def _image_size(image: Image.Image, selection: ImageSelection) -> tuple[int, int]:
    # LLaVA-1.5 records no size when the processor gave none: the picture passed in is the one seen
    return tuple(selection.image_size) if selection.image_size is not None else (image.height, image.width)


def _canvas(image: Image.Image) -> np.ndarray:
    """The picture at the drawn size, as a float32 (H, W, 3) array of its own (the caller paints on it).
    The last few pictures' resized arrays are kept by content: a budget slider redraws one many times."""
    rgb = image.convert("RGB")
    key = (rgb.size, hashlib.blake2b(rgb.tobytes(), digest_size=16).digest())
    with _RESIZED_LOCK:
        resized = _RESIZED.get(key)
    if resized is None:
        scale = PANEL_LONG_SIDE / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        resized = np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        with _RESIZED_LOCK:
            _RESIZED[key] = resized
            while len(_RESIZED) > 4:
                _RESIZED.pop(next(iter(_RESIZED)))
    return resized.copy()


_RESIZED: dict[tuple, np.ndarray] = {}
_RESIZED_LOCK = threading.Lock()


def _pixel_boxes(
    selection: ImageSelection, image_size: tuple[int, int], tile: int, canvas_shape: tuple[int, ...]
) -> np.ndarray:
    """Whole-pixel (side*side, 4) boxes on a canvas of (height, width, ...); padding rows stay NaN."""
    chosen = selection.tiles[tile]
    return _scaled_boxes(image_size, selection.grid, tile, chosen.side, canvas_shape, grid_rows(chosen))


def grid_rows(tile: TileSelection) -> int:
    """A merged grid's rows (Qwen2.5-VL's `GridTile`: rows x side cells); 0 for a square tile of patches."""
    return tile.rows if isinstance(tile, GridTile) else 0


def _scaled_boxes(
    image_size: tuple[int, int], grid: tuple[int, int], tile: int, side: int, canvas_shape: tuple[int, ...], rows: int
) -> np.ndarray:
    if rows:  # Qwen2.5-VL: merged cells spread evenly over the whole picture
        boxes = grid_cell_boxes(image_size, rows, side)
    else:
        boxes = tile_cell_boxes(image_size, grid, tile, side)
    scale = np.array([canvas_shape[1] / image_size[1], canvas_shape[0] / image_size[0]] * 2)
    return np.round(boxes * scale)


def _cells(boxes: np.ndarray):
    for index, box in enumerate(boxes):
        if not np.isnan(box[0]) and box[2] > box[0] and box[3] > box[1]:
            x0, y0, x1, y1 = (int(v) for v in box)
            yield index, (slice(y0, y1), slice(x0, x1)), (x0, y0, x1, y1)


def _mark_tiles(
    picture: Image.Image, selection: ImageSelection, image_size: tuple[int, int], tiles: list[int]
) -> Image.Image:
    """Outline and number each crop when several share a panel, so the audience sees the grid."""
    if len(tiles) < 2:
        return picture
    canvas_shape = (picture.height, picture.width)
    draw = ImageDraw.Draw(picture)
    font = _font(max(14, PANEL_LONG_SIDE // 40))
    for tile in tiles:
        boxes = _pixel_boxes(selection, image_size, tile, canvas_shape)
        x0, y0 = np.nanmin(boxes[:, 0]), np.nanmin(boxes[:, 1])
        x1, y1 = np.nanmax(boxes[:, 2]), np.nanmax(boxes[:, 3])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="white", width=3)
        draw.text((x0 + 6, y0 + 4), f"crop {tile}", fill="white", font=font, stroke_width=3, stroke_fill="black")
    return picture


def _cell_map(
    selection: ImageSelection, image_size: tuple[int, int], tiles: list[int], canvas_shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, tuple[int, int, int, int]]]:
    """(H, W) the cell behind each canvas pixel, as tile * side^2 + cell (-1: none), and each drawn
    cell's box: the geometry of one view, made once per image size, grid and canvas (a budget slider
    redraws the same cells with other colours)."""
    first = selection.tiles[tiles[0]]
    key = (tuple(image_size), tuple(selection.grid), tuple(tiles), tuple(canvas_shape[:2]), first.side)
    return _cached_cell_map(*key, grid_rows(first))


@functools.lru_cache(maxsize=16)
def _cached_cell_map(image_size, grid, tiles, canvas_shape, side, rows):
    cells = np.full(canvas_shape, -1, dtype=np.int32)
    boxes = {}
    per_tile = (rows or side) * side
    for tile in tiles:
        for index, region, box in _cells(_scaled_boxes(image_size, grid, tile, side, canvas_shape, rows)):
            cells[region] = tile * per_tile + index
            boxes[tile * per_tile + index] = box
    cells.setflags(write=False)
    return cells, boxes


def _draw_tokens(
    canvas: np.ndarray, selection: ImageSelection, image_size: tuple[int, int], tiles: list[int]
) -> Image.Image:
    cells, boxes = _cell_map(selection, image_size, tiles, canvas.shape)
    first = selection.tiles[tiles[0]]
    per_tile = (grid_rows(first) or first.side) * first.side  # cells of one tile (a merged grid need not be square)
    # Each pixel becomes scale * picture + shift by its cell's role; entry 0 is "no cell": dimmed.
    scale = np.full(len(selection.tiles) * per_tile + 1, BACKGROUND_DIM, dtype=np.float32)
    shift = np.zeros((len(scale), 3), dtype=np.float32)
    outlines, targets = [], []
    for tile in tiles:
        chosen: TileSelection = selection.tiles[tile]
        roles = chosen.groups().flatten().numpy()
        cell = tile * per_tile + np.arange(per_tile)  # global cell ids of this tile
        palette = np.array(group_colours(len(chosen.targets)) or [(0, 0, 0)], dtype=np.float32)
        kept, dropped, grouped = roles == -1, roles == -2, roles >= 0
        scale[1 + cell[kept]], shift[1 + cell[kept]] = 1 - KEPT_TINT, KEPT_TINT * np.array(KEPT_RGB)
        scale[1 + cell[dropped]] = DROPPED_DIM
        scale[1 + cell[grouped]] = (1 - GROUP_TINT) * BACKGROUND_DIM
        shift[1 + cell[grouped]] = GROUP_TINT * palette[roles[grouped]]
        outlines += [boxes[c] for c in cell[kept].tolist() if c in boxes]
        targets += [boxes[c] for c in (tile * per_tile + chosen.targets).tolist() if c in boxes]
    lookup = cells + 1  # (H, W); in place below: the canvas is this call's own copy
    canvas *= scale[lookup][..., None]
    canvas += shift[lookup]
    picture = Image.fromarray(np.clip(canvas, 0, 255, out=canvas).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in outlines:
        width = max(1, min(x1 - x0, y1 - y0) // 8)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=KEPT_RGB, width=width)
    for x0, y0, x1, y1 in targets:  # a white dot ringed in black: the patch a contextual token is anchored on
        radius = max(2, min(x1 - x0, y1 - y0) // 5)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        dot = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(dot, fill="white", outline="black", width=max(1, radius // 3))
    return _mark_tiles(picture, selection, image_size, tiles)


def _draw_heat(
    canvas: np.ndarray, selection: ImageSelection, image_size: tuple[int, int], tiles: list[int]
) -> Image.Image:
    grey = canvas.mean(axis=2, keepdims=True) * np.ones((1, 1, 3), dtype=np.float32)
    canvas[:] = grey * BACKGROUND_DIM
    peak = max(float(selection.tiles[t].cls_attention.max()) for t in tiles) or 1.0
    for tile in tiles:
        colours = _heat_colours(selection.tiles[tile].cls_attention.numpy().clip(0, None) / peak)
        for index, region, _ in _cells(_pixel_boxes(selection, image_size, tile, canvas.shape)):
            canvas[region] = (1 - HEAT_TINT) * grey[region] + HEAT_TINT * colours[index]
    return _mark_tiles(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), selection, image_size, tiles)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def panel_layout(
    sizes: list[tuple[int, int]], title_px: int = TITLE_PX
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Canvas (width, height) and each panel's top-left corner for panels of `sizes` (width, height)
    with a title strip above each: side by side or stacked, whichever is closer to a 16:9 screen."""
    widths, heights = [w for w, _ in sizes], [h + title_px for _, h in sizes]
    side_by_side = (sum(widths), max(heights))
    stacked = (max(widths), sum(heights))
    screen = 16 / 9
    if abs(math.log(side_by_side[0] / side_by_side[1] / screen)) <= abs(math.log(stacked[0] / stacked[1] / screen)):
        corners = [(sum(widths[:i]), title_px) for i in range(len(sizes))]
        return side_by_side, corners
    corners = [(0, sum(heights[:i]) + title_px) for i in range(len(sizes))]
    return stacked, corners


def _compose(panels: list[tuple[str, Image.Image]], footer: Image.Image | None = None) -> Image.Image:
    title_px = TITLE_PX
    (width, height), corners = panel_layout([picture.size for _, picture in panels])
    footer_px = footer.height if footer is not None else 0
    sheet = Image.new("RGB", (width, height + footer_px), "white")
    draw = ImageDraw.Draw(sheet)
    for (title, picture), (x, y) in zip(panels, corners):
        sheet.paste(picture, (x, y))
        size = int(title_px * 0.7)
        while size > 10 and draw.textlength(title, font=_font(size)) > picture.width - 16:
            size -= 1  # narrow (tall) pictures: shrink the title to its panel
        draw.text((x + 8, y - title_px // 2), title, fill="black", font=_font(size), anchor="lm")
    if footer is not None:
        sheet.paste(footer, ((width - footer.width) // 2, height))
    return sheet


def _colourbar(width: int, signal: str = "CLS attention") -> Image.Image:
    height = max(48, PANEL_LONG_SIDE // 16)
    bar = Image.new("RGB", (width, height), "white")
    ramp = _heat_colours(np.linspace(0, 1, width // 2)).astype(np.uint8)
    strip = np.repeat(ramp[None], height // 3, axis=0)
    bar.paste(Image.fromarray(strip), (width // 4, 4))
    draw = ImageDraw.Draw(bar)
    font = _font(int(height * 0.35))
    draw.text((width // 4 - 8, 4 + height // 6), "low", fill="black", font=font, anchor="rm")
    draw.text((3 * width // 4 + 8, 4 + height // 6), "high", fill="black", font=font, anchor="lm")
    draw.text((width // 2, height - 4), f"{signal} per patch (feature layer)", fill="black", font=font, anchor="ms")
    return bar


def draw_overlay(image: Image.Image, selection: ImageSelection, view: str = "all") -> Image.Image:
    """The picture with each tile's patch cells coloured by what VisionZip did with them: kept
    (yellow tint and outline), merged into contextual group k (group k's colour; a dot marks the
    group's target), dropped (dark).  "all" shows the grid crops on the picture beside the base tile."""
    size = _image_size(image, selection)
    panels = [
        (_panel_title(selection, tiles), _draw_tokens(_canvas(image), selection, size, tiles))
        for tiles in tiles_in_view(selection, view)
    ]
    return panels[0][1] if len(panels) == 1 else _compose(panels)


def draw_attention_heatmap(image: Image.Image, selection: ImageSelection, view: str = "base") -> Image.Image:
    """The CLS attention each patch received in the feature layer (what VisionZip ranks by), as a
    heatmap over the picture, with a colour bar; "all" shows crops and base side by side."""
    size = _image_size(image, selection)
    panels = [
        (_panel_title(selection, tiles), _draw_heat(_canvas(image), selection, size, tiles))
        for tiles in tiles_in_view(selection, view)
    ]
    width = sum(p.width for _, p in panels) if len(panels) > 1 else panels[0][1].width
    return _compose(panels, footer=_colourbar(min(width, PANEL_LONG_SIDE), signal_name(selection.tiles[0])))


# -- legend ---------------------------------------------------------------------------------------
def _swatch(rgb: tuple[int, int, int]) -> str:
    style = f"background:rgb{tuple(rgb)};display:inline-block;width:1em;height:1em;vertical-align:middle"
    return f'<span style="{style}"></span>'


def legend_markdown(selection: ImageSelection, view: str) -> str:
    """Counts per tile in the view (kept, contextual groups, merged patches, padding cells) and the
    colour legend, as Markdown (with inline HTML colour swatches)."""
    lone = len(selection.tiles) == 1
    names = tile_names(selection)
    method = visionzip.get_method(selection.method)
    cls = 1 if keeps_cls(selection.method, selection.tiles[0]) else 0
    kept_as = method.kept_as.replace("CLS attention", signal_name(selection.tiles[0]))  # SigLIP, Qwen: no CLS
    rows = [
        f"| tile | kept patches{' (+CLS)' if cls else ''} | {method.merged_as} tokens | patches merged into them "
        "| dropped | padding cells (kept) | tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    groups, dropped = 0, 0
    for tiles in tiles_in_view(selection, view):
        for tile in tiles:
            chosen = selection.tiles[tile]
            roles = chosen.groups().flatten().numpy()
            if lone:  # a centre crop of the resized picture: no padding (and perhaps no size recorded)
                padding = np.zeros(len(roles), dtype=bool)
            else:
                padding = np.isnan(tile_cell_boxes(selection.image_size, selection.grid, tile, chosen.side)[:, 0])
            kept, contextual = len(chosen.kept), len(chosen.targets)
            groups, dropped = max(groups, contextual), dropped + int((roles == -2).sum())
            rows.append(
                f"| {names[tile]} | {kept}{' + 1' if cls else ''} | {contextual} | {contextual + len(chosen.merged)} "
                f"| {int((roles == -2).sum())} | {int(padding.sum())} ({int((roles[padding] == -1).sum())}) "
                f"| {kept + cls + contextual} |"
            )
    swatches = " ".join(_swatch(c) for c in group_colours(groups)[:12]) + (" ..." if groups > 12 else "")
    legend = [
        f"{_swatch(KEPT_RGB)} **kept** ({kept_as}; {KEPT_NAME.lower()} tint, outlined)",
        f"{swatches} **merged**: one colour per {method.merged_as}, ⚪ on its anchor patch" if groups else "",
        "dark: **dropped** (feeds no token)" if dropped else "",
        "dimmed outside the tile: cropped away by the processor"
        if lone
        else "padding cells (the grid's blank border) are not drawn, only counted",
    ]
    total = (
        f"**{selection.num_tokens} visual tokens** for this image under {selection.budget or method.title} "
        "(all tiles, as fed to the language model)."
    )
    return "\n".join(rows) + "\n\n" + " · ".join(part for part in legend if part) + "\n\n" + total


# -- two sides' choices compared --------------------------------------------------------------------
def kept_overlap(left: ImageSelection, right: ImageSelection) -> list[dict]:
    """Per tile, the patches each side feeds the language model as themselves (TileSelection.kept):
    left only, right only, both, and their Jaccard overlap |L & R| / |L | R| (None when neither keeps
    any, e.g. pooling); the last row, tile "all", pools every tile's patches."""
    if len(left.tiles) != len(right.tiles):
        raise ValueError("the two sides cut this image into different tiles: their choices cannot be compared")
    rows, totals = [], [0, 0, 0]
    for tile, name in enumerate(tile_names(left)):
        kept_left, kept_right = set(left.tiles[tile].kept.tolist()), set(right.tiles[tile].kept.tolist())
        counts = [len(kept_left - kept_right), len(kept_right - kept_left), len(kept_left & kept_right)]
        totals = [total + count for total, count in zip(totals, counts)]
        rows.append(_overlap_row(name, *counts))
    return rows + [_overlap_row("all", *totals)]


def _overlap_row(tile: str, left_only: int, right_only: int, both: int) -> dict:
    union = left_only + right_only + both
    jaccard = both / union if union else None
    return {"tile": tile, "left_only": left_only, "right_only": right_only, "both": both, "jaccard": jaccard}


def overlap_markdown(rows: list[dict], left_label: str, right_label: str) -> str:
    table = [
        f"| tile | {_swatch(LEFT_ONLY_RGB)} left only | {_swatch(RIGHT_ONLY_RGB)} right only | {_swatch(BOTH_RGB)} both "
        "| overlap (Jaccard) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        jaccard = "n/a (no patch kept as itself)" if row["jaccard"] is None else f"{row['jaccard']:.2f}"
        name = f"**{row['tile']}**" if row["tile"] == "all" else row["tile"]
        table.append(f"| {name} | {row['left_only']} | {row['right_only']} | {row['both']} | {jaccard} |")
    note = (
        f"Patches each side feeds the language model as themselves: left ({left_label}) only in "
        f"{LEFT_ONLY_NAME}, right ({right_label}) only in {RIGHT_ONLY_NAME}, both in {BOTH_NAME}. "
        "Merged and pooled tokens are not counted."
    )
    return note + "\n\n" + "\n".join(table)


def draw_difference(image: Image.Image, left: ImageSelection, right: ImageSelection, view: str = "all") -> Image.Image:
    """The picture with each patch cell coloured by which side kept it as itself."""
    size = _image_size(image, left)
    panels = []
    for tiles in tiles_in_view(left, view):
        canvas = _canvas(image)
        original = canvas.copy()
        canvas *= DROPPED_DIM
        for tile in tiles:
            kept_left, kept_right = set(left.tiles[tile].kept.tolist()), set(right.tiles[tile].kept.tolist())
            for index, region, _ in _cells(_pixel_boxes(left, size, tile, canvas.shape)):
                colour = _difference_colour(index in kept_left, index in kept_right)
                if colour is not None:
                    canvas[region] = (1 - GROUP_TINT) * original[region] + GROUP_TINT * np.array(colour)
        picture = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        panels.append((_panel_title(left, tiles), _mark_tiles(picture, left, size, tiles)))
    return panels[0][1] if len(panels) == 1 else _compose(panels)


def _difference_colour(in_left: bool, in_right: bool) -> tuple[int, int, int] | None:
    if in_left and in_right:
        return BOTH_RGB
    return LEFT_ONLY_RGB if in_left else RIGHT_ONLY_RGB if in_right else None


# -- what to draw: the vision tower alone, under one side's mode ------------------------------------
def frame_selections(
    loaded: LoadedModel, frames: tuple[Image.Image, ...], mode: Mode, text: str | None = None
) -> list[visionzip.ImageSelection]:
    """What `mode`'s method keeps and merges on each frame (on each frame pair, for a model that pairs
    frames in time: Qwen2.5-VL): the vision tower alone."""
    if loaded.pairs_frames:
        video = loaded.processor.video_processor(list(frames), return_tensors="pt")
        with torch.inference_mode(), use_mode(loaded, mode, text) as call:
            loaded.model.model.get_video_features(
                pixel_values_videos=video["pixel_values_videos"].to(loaded.device, loaded.dtype),
                video_grid_thw=video["video_grid_thw"].to(loaded.device),
            )
        return call.selection
    pixel_values = frame_pixel_values(loaded.processor, frames).to(loaded.device, loaded.dtype)
    with torch.inference_mode(), use_mode(loaded, mode, text) as call:
        frame_features(loaded.handle, pixel_values)
    return call.selection


def image_selection(
    loaded: LoadedModel, image: Image.Image, mode: Mode, text: str | None = None
) -> visionzip.ImageSelection:
    """What `mode`'s method keeps and merges on `image`: the vision tower (and, for a per-image
    method, the projector) alone, no language model, so the overlay follows the budget without
    re-running the chat.  `text`: the question a text-dependent method (CDPruner) chooses by."""
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")
    geometry = {"image_sizes": torch.tensor([[image.height, image.width]])}
    if "image_grid_thw" in pixels:  # Qwen2.5-VL: the processor's grid
        geometry = {"image_grid_thw": pixels["image_grid_thw"].to(loaded.device)}
    with torch.inference_mode(), use_mode(loaded, mode, text) as call:
        loaded.model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(loaded.device, loaded.dtype), **geometry
        )
    return call.selection[0]
