"""VisPruner against the spec: important patches by the stock eager CLS row of the feature layer,
diverse ones by rounds of even/odd duplicate removal on the stock feature-layer patch states."""

import pytest
import torch
from method_refs import (
    apply_method,
    count_placeholders,
    models64,
    per_tile_expected,
    reduced_features,
    vispruner_reference,
)

from visionzip.methods.vispruner import vispruner_select


@pytest.mark.parametrize(
    "tiles, patches, width, budgets",
    [
        (2, 576, 16, [1, 3, 64, 575, 576]),  # odd T_imp: an odd residual list from the start
        (3, 100, 8, [1, 9, 50, 99]),
        (1, 36, 4, [5, 20, 36]),
    ],
)
def test_selection_matches_reference(tiles, patches, width, budgets):
    generator = torch.Generator().manual_seed(patches)
    attention = torch.rand(tiles, patches, dtype=torch.float64, generator=generator)
    states = torch.randn(tiles, patches, width, dtype=torch.float64, generator=generator)
    for tokens in budgets:
        ours = vispruner_select(attention, states, tokens)
        assert ours.shape == (tiles, tokens)
        for t in range(tiles):
            assert ours[t].tolist() == vispruner_reference(attention[t], states[t], tokens), (tokens, t)


def test_duplicates_are_what_the_diverse_step_removes():
    """Ten exact copies of one patch among the residual: the matching rounds drop copies first."""
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(1, 576, dtype=torch.float64, generator=generator)
    states = torch.randn(1, 576, 32, dtype=torch.float64, generator=generator)
    low = attention[0].argsort()[:10]  # the ten least attended: all in the residual list
    states[0, low] = states[0, low[0]].clone()
    kept = set(vispruner_select(attention, states, 64)[0].tolist())
    assert len(kept & set(low.tolist())) <= 1


def attention_reference(tokens):
    def tile_reference(_tile, hidden, cls_row):
        kept = vispruner_reference(cls_row[1:], hidden[1:], tokens)
        return [hidden[1 + p] for p in kept], kept

    return tile_reference


@pytest.mark.parametrize(
    "size, tokens", [((336, 672), 64), ((672, 672), 128), ((480, 640), 1), ((1008, 336), 33), ((672, 672), 576)]
)
def test_llava_next_matches_reference(make_image, size, tokens):
    model, oracle, processor = models64("llava_next")
    handle = apply_method(model, processor, "vispruner", tokens)
    try:
        inputs, [ours] = reduced_features(model, processor, make_image(*size, seed=tokens), "<image>\nhi")
        [(expected, results)] = per_tile_expected(oracle, inputs, attention_reference(tokens))
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)
        tiles = handle.last_selection[0].tiles
        assert [tile.kept.tolist() for tile in tiles] == [patches for _, patches in results]
        assert all(tile.cls_attention.shape == (576,) and len(tile.targets) == 0 for tile in tiles)
        expected_count = len(results) * tokens
        assert count_placeholders(inputs, model) == ours.shape[0] == handle.num_image_tokens(size) == expected_count
    finally:
        handle.remove()


def test_llava_15_matches_reference_and_records_the_cls_row(make_image):
    model, oracle, processor = models64("llava")
    handle = apply_method(model, processor, "vispruner", 64)
    try:
        images = [make_image(480, 640, seed=12), make_image(700, 300, seed=13)]
        inputs, ours = reduced_features(model, processor, images, ["<image>\na", "<image>\nb"])
        cls_rows = []
        expected = per_tile_expected(
            oracle, inputs, lambda t, h, row: cls_rows.append(row) or attention_reference(64)(t, h, row)
        )
        for b in range(2):
            torch.testing.assert_close(ours[b], expected[b][0], rtol=1e-7, atol=1e-7)
            [tile] = handle.last_selection[b].tiles
            assert tile.kept.tolist() == expected[b][1][0][1]
            torch.testing.assert_close(tile.cls_attention, cls_rows[b][1:].float(), rtol=1e-5, atol=1e-7)
        assert (
            handle.last_selection[0].budget == "VisPruner 64/image (32 important + 32 diverse)"
        )  # one tile: the image
        assert count_placeholders(inputs, model) == 2 * 64
    finally:
        handle.remove()
