"""Random selection against the spec's draw (one CPU generator seeded per call, randperm per tile in
order, first T, ascending) applied to the stock model's own feature-layer states."""

import pytest
import torch
from method_refs import (
    apply_method,
    count_placeholders,
    models64,
    per_tile_expected,
    random_reference,
    reduced_features,
)

from visionzip.methods.random_patches import draw_patches
from visionzip.video import frame_features, frame_pixel_values


@pytest.mark.parametrize("num_tiles, tokens, seed", [(1, 1, 0), (3, 64, 1), (5, 576, 2), (2, 100, 12345)])
def test_draw_is_the_specs_seeded_randperm(num_tiles, tokens, seed):
    assert draw_patches(num_tiles, 576, tokens, seed).tolist() == random_reference(num_tiles, tokens, seed)


def kept_patches_reference(tokens, seed):
    draws = random_reference(32, tokens, seed)  # more tiles than any call below makes
    return lambda tile, hidden, _cls_row: ([hidden[1 + p] for p in draws[tile]], draws[tile])


@pytest.mark.parametrize(
    "size, tokens, seed", [((336, 672), 64, 0), ((672, 672), 144, 1), ((480, 640), 1, 2), ((1008, 336), 576, 3)]
)
def test_llava_next_matches_reference(make_image, size, tokens, seed):
    model, oracle, processor = models64("llava_next")
    handle = apply_method(model, processor, "random", tokens, seed)
    try:
        inputs, [ours] = reduced_features(model, processor, make_image(*size, seed=seed), "<image>\nhi")
        [(expected, results)] = per_tile_expected(oracle, inputs, kept_patches_reference(tokens, seed))
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)
        tiles = handle.last_selection[0].tiles
        assert [tile.kept.tolist() for tile in tiles] == [patches for _, patches in results]
        assert all(tile.cls_attention is None and len(tile.targets) == len(tile.merged) == 0 for tile in tiles)
        expected_count = len(results) * tokens
        assert count_placeholders(inputs, model) == ours.shape[0] == handle.num_image_tokens(size) == expected_count
    finally:
        handle.remove()


def test_llava_15_batch_draws_tiles_in_order(make_image):
    model, oracle, processor = models64("llava")
    handle = apply_method(model, processor, "random", 64, 7)
    try:
        images = [make_image(480, 640, seed=12), make_image(700, 300, seed=13)]
        inputs, ours = reduced_features(model, processor, images, ["<image>\na", "<image>\nb"])
        expected = per_tile_expected(oracle, inputs, kept_patches_reference(64, 7))
        for b in range(2):
            torch.testing.assert_close(ours[b], expected[b][0], rtol=1e-7, atol=1e-7)
            assert handle.last_selection[b].tiles[0].kept.tolist() == expected[b][1][0][1]
        assert count_placeholders(inputs, model) == 2 * 64
    finally:
        handle.remove()


def test_same_seed_same_draw_other_seed_other_draw(tiny_next, make_image):
    model, processor = tiny_next
    handle = apply_method(model, processor, "random", 64, 0)
    image = make_image(672, 672, seed=4)
    try:

        def run(seed):
            with handle.use(seed=seed) as call:
                _, [features] = reduced_features(model, processor, image, "<image>")
            return features, [tile.kept.tolist() for tile in call.selection[0].tiles], call.selection[0].budget

        first, again, other = run(3), run(3), run(4)
        assert torch.equal(first[0], again[0]) and first[1] == again[1]
        assert first[1] != other[1] and not torch.equal(first[0], other[0])
        assert first[2] == "Random 64/tile, seed 3" and other[2] == "Random 64/tile, seed 4"
        assert len({tuple(kept) for kept in first[1]}) == len(first[1])  # the tiles draw in turn, not the same
    finally:
        handle.remove()


def test_video_frames_draw_in_turn_whatever_the_chunk_size(tiny_next, make_image):
    """A clip's frames are the tiles of one call: frame k gets the call's k-th draw, whether the frames
    reach the tower 16, 7 or 20 at a time (frames k and k + 16 must not repeat a chunk's draws)."""
    model, processor = tiny_next
    handle = apply_method(model, processor, "random", 64, 5)
    pixels = frame_pixel_values(processor, [make_image(240, 320, seed=k) for k in range(20)])
    expected = random_reference(20, 64, 5)
    try:
        with handle.use(enabled=False), torch.no_grad():
            stock = frame_features(handle, pixels)  # (20, 576, E): every patch of every frame
        for batch_size in (16, 7, 20):
            with handle.use(seed=5) as call, torch.no_grad():
                features = frame_features(handle, pixels, batch_size=batch_size)
            assert [image.tiles[0].kept.tolist() for image in call.selection] == expected
            for frame, patches in enumerate(expected):
                torch.testing.assert_close(features[frame], stock[frame, patches])
    finally:
        handle.remove()
    assert expected[0] != expected[16]
