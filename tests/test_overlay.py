"""The token overlay: patch cells land where the processor took them from, colours follow the
selection, padding is found, and the heatmap follows the CLS attention.

The geometry is checked against the real processors' `pixel_values`, never against the mapping
itself: a picture whose red and green channels encode each pixel's x and y goes through the
processor, and every 14x14 cell of every tile is decoded back to the position it came from."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import visionzip
from app.overlay import (
    BACKGROUND_DIM,
    GROUP_TINT,
    KEPT_RGB,
    KEPT_TINT,
    draw_attention_heatmap,
    draw_overlay,
    group_colours,
    legend_markdown,
    panel_layout,
    tile_cell_boxes,
    view_choices,
)
from visionzip.tiny import tiny_checkpoint

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TILE, CELL, SIDE = 336, 14, 24
GREY = 128
# (H, W): square, 4:3 (padded rows), 16:9 photo (padding that cuts through cells), an exact 1x3, a tall one
NEXT_SIZES = [(672, 672), (480, 640), (1080, 1920), (336, 1008), (1500, 400)]


@pytest.fixture(scope="module")
def next_processor():
    return AutoProcessor.from_pretrained(tiny_checkpoint("llava_next"))


@pytest.fixture(scope="module")
def llava_processor():
    return AutoProcessor.from_pretrained(tiny_checkpoint("llava"))


def position_image(height: int, width: int) -> Image.Image:
    """Red encodes x, green encodes y (0..255 across the picture); blue is 200, so no real pixel is black."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 200)], axis=-1).round().astype(np.uint8))


def processed_tiles(processor, image: Image.Image) -> np.ndarray:
    """The tiles the model sees, (tiles, 336, 336, 3) in 0..255 (the processor's normalisation undone)."""
    image_processor = processor.image_processor
    pixels = image_processor(images=image, return_tensors="pt")["pixel_values"][0].double()
    if pixels.dim() == 3:  # LLaVA-1.5: one tile
        pixels = pixels[None]
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(3, 1, 1)
    return ((pixels * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def cell_block(tiles: np.ndarray, tile: int, index: int) -> np.ndarray:
    r, c = divmod(index, SIDE)
    return tiles[tile, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]


def black_cells(tiles: np.ndarray, tile: int) -> np.ndarray:
    """Cells the processor filled with padding only (black, where the picture has no black pixel)."""
    return np.array([(cell_block(tiles, tile, i)[..., 2] < 50).all() for i in range(SIDE * SIDE)])


def next_grid(processor, size: tuple[int, int]) -> tuple[int, int]:
    return tuple(get_anyres_image_grid_shape(list(size), processor.image_processor.image_grid_pinpoints, TILE))


def assert_cells_land_where_seen(tiles: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> None:
    height, width = size
    for tile in range(tiles.shape[0]):
        boxes = tile_cell_boxes(size, grid, tile)
        padding_seen = black_cells(tiles, tile)
        np.testing.assert_array_equal(np.isnan(boxes[:, 0]), padding_seen, err_msg=f"padding cells of tile {tile}")
        for index in np.flatnonzero(~padding_seen):
            block = cell_block(tiles, tile, index)
            content = block[..., 2] > 100
            seen_x = block[..., 0][content].mean() / 255 * (width - 1) + 0.5
            seen_y = block[..., 1][content].mean() / 255 * (height - 1) + 0.5
            x0, y0, x1, y1 = boxes[index]
            # resampling blurs a cell by under a pixel (or 5 % of a big cell); a one-pixel slip in the geometry fails
            assert abs(seen_x - (x0 + x1) / 2) <= max(1.0, 0.05 * (x1 - x0)), (tile, index, seen_x, x0, x1)
            assert abs(seen_y - (y0 + y1) / 2) <= max(1.0, 0.05 * (y1 - y0)), (tile, index, seen_y, y0, y1)


@pytest.mark.parametrize("size", NEXT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_next_cells_land_where_the_processor_took_them(next_processor, size):
    tiles = processed_tiles(next_processor, position_image(*size))
    grid = next_grid(next_processor, size)
    assert tiles.shape[0] == 1 + grid[0] * grid[1]
    assert_cells_land_where_seen(tiles, size, grid)


@pytest.mark.parametrize("size", [(480, 640), (900, 500), (336, 336)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_single_tile_cells_land_where_the_processor_took_them(llava_processor, size):
    tiles = processed_tiles(llava_processor, position_image(*size))
    assert tiles.shape[0] == 1
    assert_cells_land_where_seen(tiles, size, (0, 0))


@pytest.mark.parametrize("size", NEXT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_marked_patch_lands_in_the_predicted_cell(next_processor, size):
    """Paint one cell's predicted source box red on a grey picture: the processor must put the red
    into that very tile and cell, for the last crop and for the base tile."""
    grid = next_grid(next_processor, size)
    last = grid[0] * grid[1]
    for tile in (last, 0):
        boxes = tile_cell_boxes(size, grid, tile)
        centre = np.array([SIDE / 2 - 0.5, SIDE / 2 - 0.5])
        candidates = [i for i in range(SIDE * SIDE) if not np.isnan(boxes[i, 0])]
        index = min(candidates, key=lambda i: np.abs(np.array(divmod(i, SIDE)) - centre).sum())
        picture = Image.new("RGB", (size[1], size[0]), (GREY, GREY, GREY))
        ImageDraw.Draw(picture).rectangle(tuple(np.round(boxes[index]) - [0, 0, 1, 1]), fill=(255, 0, 0))
        tiles = processed_tiles(next_processor, picture)
        searched = range(1, last + 1) if tile else [0]
        redness = {
            (t, i): (cell_block(tiles, t, i)[..., 0] - cell_block(tiles, t, i)[..., 1]).mean()
            for t in searched
            for i in range(SIDE * SIDE)
        }
        assert max(redness, key=redness.get) == (tile, index)


def test_padding_cells_found_for_a_picture_that_does_not_fill_the_grid(next_processor):
    """480x640 goes on a 672x672 grid as 672x504: 84 blank rows top and bottom, 6 cell rows each."""
    size = (480, 640)
    grid = next_grid(next_processor, size)
    tiles = processed_tiles(next_processor, position_image(*size))
    for tile in range(1, 1 + grid[0] * grid[1]):
        padding = np.isnan(tile_cell_boxes(size, grid, tile)[:, 0])
        assert padding.sum() == black_cells(tiles, tile).sum() > 0
    assert not np.isnan(tile_cell_boxes(size, grid, 0)).any()  # the base tile is squashed, never padded


# -- drawing, against a real selection ------------------------------------------------------------
@pytest.fixture(scope="module")
def next_selection(tiny_next, next_processor):
    """A real VisionZip choice on a 480x640 picture (2x2 grid with padding)."""
    model, processor = tiny_next
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        picture = Image.fromarray(np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8))
        inputs = processor.image_processor(images=picture, return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        return handle.last_selection[0]
    finally:
        handle.remove()


def scene(height: int, width: int) -> Image.Image:
    """Something to look at in the saved renders: sky, ground, a sun and a house."""
    picture = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, height * 0.65, width, height), fill=(70, 140, 60))
    draw.ellipse((width * 0.72, height * 0.08, width * 0.9, height * 0.08 + width * 0.18), fill=(250, 210, 60))
    draw.rectangle((width * 0.2, height * 0.4, width * 0.45, height * 0.75), fill=(180, 60, 50))
    draw.polygon(
        [(width * 0.17, height * 0.4), (width * 0.325, height * 0.22), (width * 0.48, height * 0.4)], fill=(90, 50, 40)
    )
    return picture


def save_artifact(picture: Image.Image, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    picture.save(ARTIFACTS / name)


def expected_roles(chosen: visionzip.TileSelection) -> dict[int, int]:
    """Cell -> -1 for kept, k for contextual group k (its target or a patch merged into it)."""
    roles = {int(i): -1 for i in chosen.kept}
    roles.update({int(i): k for k, i in enumerate(chosen.targets)})
    roles.update({int(i): int(k) for i, k in zip(chosen.merged, chosen.merged_into)})
    return roles


def assert_colours_follow_selection(
    drawn: np.ndarray, corner: tuple[int, int], scale: float, selection, tiles, labelled: bool = False
) -> int:
    """Sample each cell of `tiles` near its top-left (clear of outline and target dot) on an overlay of
    a uniform grey picture drawn at `corner`; return how many cells were checked.  `labelled`: each
    tile carries a name in its top-left corner, over its first two rows of picture cells, left half."""
    kept_colour = (1 - KEPT_TINT) * GREY + KEPT_TINT * np.array(KEPT_RGB)
    checked = 0
    for tile in tiles:
        chosen = selection.tiles[tile]
        roles = expected_roles(chosen)
        palette = group_colours(len(chosen.targets))
        boxes = tile_cell_boxes(selection.image_size, selection.grid, tile) * scale
        first_row = int(np.flatnonzero(~np.isnan(boxes[:, 0]))[0]) // SIDE
        for index, (x0, y0, x1, y1) in enumerate(boxes):
            if np.isnan(x0) or min(x1 - x0, y1 - y0) < 10:
                continue  # padding, or a sliver of a cell cut by the padding
            if labelled and index // SIDE < first_row + 2 and index % SIDE < SIDE // 2:
                continue
            role = roles[index]
            want = (
                kept_colour
                if role == -1
                else (1 - GROUP_TINT) * BACKGROUND_DIM * GREY + GROUP_TINT * np.array(palette[role])
            )
            x, y = int(x0 + 0.2 * (x1 - x0)) + corner[0], int(y0 + 0.2 * (y1 - y0)) + corner[1]
            np.testing.assert_allclose(drawn[y, x], want, atol=2, err_msg=f"tile {tile} cell {index} role {role}")
            if index in chosen.targets.tolist():  # the target's dot is white at the cell's centre
                cx, cy = int((x0 + x1) / 2) + corner[0], int((y0 + y1) / 2) + corner[1]
                assert (drawn[cy, cx] > 240).all()
            checked += 1
    return checked


@pytest.mark.parametrize("view", ["base", "crop 2"])
def test_overlay_colours_follow_the_selection(next_selection, view):
    grey = Image.new("RGB", (640, 480), (GREY, GREY, GREY))
    drawn = draw_overlay(grey, next_selection, view)
    scale = drawn.width / 640
    tile = 0 if view == "base" else int(view.split()[1])
    checked = assert_colours_follow_selection(np.asarray(drawn), (0, 0), scale, next_selection, [tile])
    assert checked > SIDE * SIDE / 2
    save_artifact(draw_overlay(scene(480, 640), next_selection, view), f"overlay_480x640_{view.replace(' ', '')}.png")


def test_overlay_all_shows_every_crop_on_the_picture_beside_the_base(next_selection):
    grey = Image.new("RGB", (640, 480), (GREY, GREY, GREY))
    drawn = np.asarray(draw_overlay(grey, next_selection, "all"))
    base = draw_overlay(grey, next_selection, "base")
    (width, height), corners = panel_layout([base.size, base.size])
    assert drawn.shape[:2] == (height, width)
    crops = range(1, len(next_selection.tiles))
    checked = assert_colours_follow_selection(drawn, corners[0], base.width / 640, next_selection, crops, labelled=True)
    assert checked > len(crops) * SIDE * SIDE / 2
    x, y = corners[1]
    np.testing.assert_array_equal(drawn[y : y + base.height, x : x + base.width], np.asarray(base))
    save_artifact(draw_overlay(scene(480, 640), next_selection, "all"), "overlay_480x640_all.png")


def test_views_offered_are_the_tiles_and_others_are_refused(next_selection):
    choices = view_choices(next_selection)
    assert choices == ["all", "base", "crop 1", "crop 2", "crop 3", "crop 4"]
    for view in choices:
        assert draw_overlay(Image.new("RGB", (640, 480)), next_selection, view).width > 0
    with pytest.raises(ValueError, match="crop 4"):
        draw_overlay(Image.new("RGB", (640, 480)), next_selection, "crop 5")


def test_legend_counts_each_tile_and_its_padding(next_selection, next_processor):
    legend = legend_markdown(next_selection, "all")
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in legend.splitlines()
        if re.match(r"\| (base|crop \d) \|", line)
    }
    assert list(rows) == ["crop 1", "crop 2", "crop 3", "crop 4", "base"]
    tiles = processed_tiles(next_processor, position_image(480, 640))
    for name, cells in rows.items():
        tile = 0 if name == "base" else int(name.split()[1])
        chosen = next_selection.tiles[tile]
        padding = black_cells(tiles, tile)
        kept_in_padding = sum(bool(padding[i]) for i in chosen.kept.tolist())
        assert cells == [
            f"{len(chosen.kept)} + 1",
            str(len(chosen.targets)),
            str(len(chosen.targets) + len(chosen.merged)),
            "0",
            f"{padding.sum()} ({kept_in_padding})",
            str(54 + 10),
        ]
    assert f"**{next_selection.num_tokens} visual tokens**" in legend
    single = legend_markdown(next_selection, "crop 3")
    assert "| crop 3 |" in single and "| crop 1 |" not in single


def test_heatmap_is_brighter_where_the_cls_attention_is_higher(next_selection):
    grey = Image.new("RGB", (640, 480), (GREY, GREY, GREY))
    drawn = np.asarray(draw_attention_heatmap(grey, next_selection, "crop 1")).astype(float)
    (_, _), (corner,) = panel_layout([(1024, 768)])
    boxes = tile_cell_boxes((480, 640), next_selection.grid, 1) * (1024 / 640)
    attention = next_selection.tiles[1].cls_attention.numpy()
    shown = [i for i in range(SIDE * SIDE) if not np.isnan(boxes[i, 0]) and boxes[i, 3] - boxes[i, 1] >= 10]
    luminance = []
    for i in shown:
        x0, y0, x1, y1 = boxes[i]
        pixel = drawn[int((y0 + y1) / 2) + corner[1], int((x0 + x1) / 2) + corner[0]]
        luminance.append(pixel @ [0.299, 0.587, 0.114])

    def ranks(values):
        return np.argsort(np.argsort(values))

    assert np.corrcoef(ranks(np.array(luminance)), ranks(attention[shown]))[0, 1] > 0.95
    assert shown[int(np.argmax(luminance))] == shown[int(np.argmax(attention[shown]))]
    save_artifact(draw_attention_heatmap(scene(480, 640), next_selection, "all"), "heatmap_480x640_all.png")


def test_llava_overlay_without_recorded_size_maps_onto_the_given_picture(tiny_llava):
    """LLaVA-1.5 gives no image_sizes: the selection has no size and the picture passed in is used."""
    model, processor = tiny_llava
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        picture = Image.fromarray(np.random.RandomState(1).randint(0, 256, (480, 640, 3), dtype=np.uint8))
        pixel_values = processor.image_processor(images=picture, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values)
        selection = handle.last_selection[0]
    finally:
        handle.remove()
    assert selection.image_size is None and view_choices(selection) == ["all"]
    drawn = draw_overlay(Image.new("RGB", (640, 480), (GREY, GREY, GREY)), selection, "all")
    sized = visionzip.ImageSelection((480, 640), selection.grid, selection.tiles, selection.num_tokens)
    assert assert_colours_follow_selection(np.asarray(drawn), (0, 0), drawn.width / 640, sized, [0]) == SIDE * SIDE
    save_artifact(draw_overlay(scene(480, 640), selection, "all"), "overlay_llava_480x640.png")
