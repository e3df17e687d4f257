"""Pooling against the spec: the mean of each non-overlapping s x s window of the stock pre-projector
patch grid (CLS dropped), row-major, projected; on LLaVA-NeXT the crops' windows in raster order
over the stitched pooled grid."""

import pytest
import torch
from method_refs import (
    SIDE,
    apply_method,
    count_placeholders,
    image_tiles,
    models64,
    per_tile_expected,
    pool_reference,
    reduced_features,
    stock_signals,
)

from visionzip.methods.pool import pool_patches

WINDOWS = [1, 2, 3, 4, 6, 8, 12, 24]


@pytest.mark.parametrize("window", WINDOWS)
def test_pool_patches_matches_reference(window):
    patches = torch.randn(3, SIDE * SIDE, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(window))
    ours = pool_patches(patches, window)
    assert ours.shape == (3, (SIDE // window) ** 2, 5)
    for t in range(3):
        torch.testing.assert_close(ours[t], torch.stack(pool_reference(patches[t], window)), rtol=1e-12, atol=1e-12)


def test_half_precision_pools_in_float32_and_rounds_once():
    patches = torch.randn(2, SIDE * SIDE, 8).bfloat16()
    ours = pool_patches(patches, 3)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, pool_patches(patches.float(), 3).bfloat16())


def window_of(patch, window):
    i, j = divmod(patch, SIDE)
    return (i // window) * (SIDE // window) + j // window


def window_reference(tokens):
    window = SIDE // int(tokens**0.5)

    def tile_reference(_tile, hidden, _cls_row):
        anchors = [(wi * window) * SIDE + wj * window for wi in range(SIDE // window) for wj in range(SIDE // window)]
        return pool_reference(hidden[1:], window), anchors

    return tile_reference


def stitched_pooled_grid(oracle, inputs, tokens):
    """The crops' pooled tokens read in raster order over the stitched (rows*g) x (cols*g) pooled
    grid (g = 24/s): derived from the grid itself, not from window positions."""
    tiles, (rows, cols) = image_tiles(oracle, inputs)
    hidden, _ = stock_signals(oracle, tiles)
    g = int(tokens**0.5)
    pooled = [pool_reference(hidden[t, 1:], SIDE // g) for t in range(len(tiles))]
    order = []
    for row in range(rows * g):
        for col in range(cols * g):
            crop = (row // g) * cols + col // g
            order.append(pooled[1 + crop][(row % g) * g + col % g])
    return oracle.model.multi_modal_projector(torch.stack(pooled[0] + order))


@pytest.mark.parametrize("size, tokens", [((336, 672), 144), ((672, 672), 64), ((480, 640), 36), ((1008, 336), 16)])
def test_llava_next_matches_reference(make_image, size, tokens):
    model, oracle, processor = models64("llava_next")
    handle = apply_method(model, processor, "pool", tokens)
    try:
        inputs, [ours] = reduced_features(model, processor, make_image(*size, seed=tokens), "<image>\nhi")
        [(expected, results)] = per_tile_expected(oracle, inputs, window_reference(tokens))
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)
        with torch.no_grad():
            torch.testing.assert_close(ours, stitched_pooled_grid(oracle, inputs, tokens), rtol=1e-7, atol=1e-7)
        window = SIDE // int(tokens**0.5)
        for tile, (_, anchors) in zip(handle.last_selection[0].tiles, results):
            assert tile.kept.tolist() == [] and tile.targets.tolist() == anchors and tile.cls_attention is None
            assert sorted(tile.merged.tolist() + anchors) == list(range(SIDE * SIDE))
            assert tile.merged_into.tolist() == [window_of(p, window) for p in tile.merged.tolist()]
            assert tile.groups().flatten().tolist() == [window_of(p, window) for p in range(SIDE * SIDE)]
        expected_count = len(results) * tokens
        assert count_placeholders(inputs, model) == ours.shape[0] == handle.num_image_tokens(size) == expected_count
    finally:
        handle.remove()


def test_llava_15_matches_reference(make_image):
    model, oracle, processor = models64("llava")
    handle = apply_method(model, processor, "pool", 64)
    try:
        images = [make_image(480, 640, seed=12), make_image(700, 300, seed=13)]
        inputs, ours = reduced_features(model, processor, images, ["<image>\na", "<image>\nb"])
        expected = per_tile_expected(oracle, inputs, window_reference(64))
        for b in range(2):
            torch.testing.assert_close(ours[b], expected[b][0], rtol=1e-7, atol=1e-7)
        assert (
            count_placeholders(inputs, model) == 2 * 64
            and handle.last_selection[0].budget == "Pool 64/image (8x8 grid)"  # LLaVA-1.5: one tile is the image
        )
    finally:
        handle.remove()


@pytest.mark.parametrize("tokens", [0, 100, 128, 577, 2.0])
def test_counts_that_are_no_pooled_grid_are_refused_with_the_valid_ones(tiny_next, tokens):
    model, processor = tiny_next
    with pytest.raises(ValueError, match=r"576 \(1x1\), 144 \(2x2\), 64 \(3x3\), 36 \(4x4\).*1 \(24x24\)"):
        apply_method(model, processor, "pool", tokens)
