"""DivPrune against the spec's greedy max-min cosine distance, run on the stock model's own packed
projector output (LLaVA-NeXT: base tile, unpadded grid, newlines; LLaVA-1.5: the 576 patches)."""

import pytest
import torch
from method_refs import (
    apply_method,
    count_placeholders,
    divprune_reference,
    image_tiles,
    models64,
    reduced_features,
    stock_signals,
)

from visionzip.methods import get_method
from visionzip.methods.divprune import dense_order, divprune_order, divprune_select, screened_order
from visionzip.similarity import bfloat16_matmul_pays, screening_products


def features(rows, width, seed):
    return torch.randn(rows, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows, width", [(1, 8), (7, 4), (50, 16), (300, 32)])
def test_selection_matches_reference(rows, width):
    x = features(rows, width, rows)
    for tokens in sorted({1, 2, rows // 3, rows - 1, rows} & set(range(1, rows + 1))):
        ours = divprune_select(x, tokens)
        assert ours.tolist() == divprune_reference(x, tokens), tokens
        assert ours.dtype == torch.long and ours.shape == (tokens,)


def test_one_order_gives_the_choice_at_every_budget():
    """What a budget slider reads: the first k of the method's order, ascending, is its choice at k."""
    x = features(60, 8, 4)
    x[[3, 17, 40]] = x[3].clone()
    order = get_method("divprune").image_order(x)
    assert sorted(order.tolist()) == list(range(60))
    for tokens in range(1, 61):
        assert order[:tokens].sort().values.tolist() == divprune_reference(x, tokens), tokens


def test_duplicate_rows_like_newlines_survive_once_and_never_first():
    x = features(40, 8, 1)
    x[[5, 13, 21, 29, 37]] = x[5].clone()  # five identical rows, as the newline vectors of one image
    distinct = 36
    first = divprune_select(x, 1).item()
    assert first not in (5, 13, 21, 29, 37)  # its nearest neighbour is a copy: distance 0
    ours = divprune_select(x, distinct)
    assert ours.tolist() == divprune_reference(x, distinct)
    assert len(set(ours.tolist()) & {5, 13, 21, 29, 37}) == 1
    # Past the distinct rows every row is still picked once: the official loop could re-pick one.
    assert divprune_select(x, 40).tolist() == list(range(40)) == divprune_reference(x, 40)


def test_half_precision_distances_are_float32():
    x = features(120, 16, 2).bfloat16()
    assert torch.equal(divprune_select(x, 30), divprune_select(x.float(), 30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_bfloat16_screen_changes_no_choice(dtype):
    """The screened way (a bfloat16 product decides only which float32 rows to compute) keeps what the
    float64 spec keeps, on the model's own dtype: at every budget, whether its guesses are short or long."""
    x = features(300, 64, 5).to(dtype)  # no row within float32 rounding of a tie (width 32 has one)
    for tokens in (1, 2, 40, 150, 300):
        expected = divprune_reference(x, tokens)
        for lookahead in (1, 64):
            order = screened_order(x, tokens, lookahead)
            assert order.sort().values.tolist() == expected, (tokens, lookahead)
        assert torch.equal(screened_order(x, tokens), dense_order(x, tokens))


def near_tie_rows():
    """30 pairs of rows, each pair on its own two axes, at lengths 0.5 to 3.5; the first pick is a row of
    the pair whose cosine is lowest.  The pairs' cosines differ by 2e-5, far below bfloat16's resolution
    (2^-8), and a bfloat16 product rounds them out of order: only float32 rows can tell which is first."""
    generator = torch.Generator().manual_seed(21)
    axes = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=generator)).Q.T  # orthonormal
    rows = []
    for k, rank in enumerate(torch.randperm(30, generator=generator).tolist()):
        angle = torch.tensor(1.2 - 2e-5 * rank, dtype=torch.float64)  # cos(a, b) = cos(angle)
        length = 0.5 + 3 * torch.rand((), generator=generator, dtype=torch.float64)
        rows += [axes[2 * k] * length, (axes[2 * k] * angle.cos() + axes[2 * k + 1] * angle.sin()) * length]
    return torch.stack(rows).bfloat16()


def test_the_first_pick_is_decided_in_float32_when_the_screen_cannot_tell():
    x = near_tie_rows()
    [first] = divprune_reference(x, 1)
    assert screened_order(x, 1).tolist() == [first] == dense_order(x, 1).tolist()
    assert screened_order(x, 20).sort().values.tolist() == divprune_reference(x, 20)
    # the screen alone would have chosen another pair: its nearest-neighbour cosines misorder them
    products, norms, _ = screening_products(x)
    screened = (products.float() / norms[:, None] / norms[None, :]).fill_diagonal_(-2.0).amax(dim=1)
    assert screened[first] - screened.min() > 1e-3


def test_large_images_on_this_cpu_take_the_screened_way():
    """What a LLaVA-NeXT image (2,928 rows at 672x672) gets on a CPU with bfloat16 matrix units."""
    x = features(1100, 48, 9).bfloat16()
    chosen = divprune_order(x, 200)
    assert torch.equal(chosen, dense_order(x, 200))
    assert chosen.sort().values.tolist() == divprune_reference(x, 200)
    if not bfloat16_matmul_pays(x.device):
        pytest.skip("this CPU has no bfloat16 matrix units (AMX or AVX512-BF16): the dense way ran")
    assert torch.equal(chosen, screened_order(x, 200))


def test_out_of_range_budget_is_refused():
    with pytest.raises(ValueError, match="1 to 5"):
        divprune_select(features(5, 4, 0), 6)


def stock_image_features(oracle, inputs, index=0):
    """The unpatched model's own image features: one image's packed rows, and its per-tile features."""
    with torch.no_grad():
        kwargs = {"pixel_values": inputs.pixel_values[index : index + 1]}
        if "image_sizes" in inputs:
            kwargs["image_sizes"] = inputs.image_sizes[index : index + 1]
        packed = oracle.model.get_image_features(**kwargs).pooler_output[0]
        tiles, _ = image_tiles(oracle, inputs, index)
        hidden, _ = stock_signals(oracle, tiles)
        return packed, oracle.model.multi_modal_projector(hidden[:, 1:])  # (N, E), (tiles, 576, E)


def recorded_patches_match_rows(selection, rows, tile_features, newline):
    """Every kept row that is no newline is the stock feature of one (tile, patch) the record lists."""
    flat = tile_features.reshape(-1, tile_features.shape[-1])
    is_newline = (rows - newline).abs().amax(dim=1) < 1e-12
    nearest = torch.cdist(rows[~is_newline], flat, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert float(nearest.values.max()) < 1e-6  # the eager and SDPA towers differ by ~1e-9
    side_sq = tile_features.shape[1]
    found = sorted((int(i) // side_sq, int(i) % side_sq) for i in nearest.indices)
    recorded = sorted((t, p) for t, tile in enumerate(selection.tiles) for p in tile.kept.tolist())
    assert found == recorded
    return int(is_newline.sum())


@pytest.mark.parametrize("size, tokens", [((336, 672), 200), ((672, 672), 320), ((480, 640), 1), ((1008, 336), 640)])
def test_llava_next_matches_reference_on_the_stock_packed_sequence(make_image, size, tokens):
    model, oracle, processor = models64("llava_next")
    handle = apply_method(model, processor, "divprune", tokens)
    try:
        inputs, [ours] = reduced_features(model, processor, make_image(*size, seed=tokens), "<image>\nhi")
        stock, tile_features = stock_image_features(oracle, inputs)
        kept = divprune_reference(stock, tokens)
        torch.testing.assert_close(ours, stock[kept], rtol=1e-7, atol=1e-7)
        assert count_placeholders(inputs, model) == ours.shape[0] == handle.num_image_tokens(size) == tokens
        newlines = recorded_patches_match_rows(handle.last_selection[0], ours, tile_features, model.model.image_newline)
        assert newlines <= 1 and handle.last_selection[0].num_tokens == tokens
    finally:
        handle.remove()


def test_llava_15_matches_reference(make_image):
    model, oracle, processor = models64("llava")
    handle = apply_method(model, processor, "divprune", 64)
    try:
        images = [make_image(480, 640, seed=12), make_image(700, 300, seed=13)]
        inputs, ours = reduced_features(model, processor, images, ["<image>\na", "<image>\nb"])
        for b in range(2):
            stock, _ = stock_image_features(oracle, inputs, b)
            kept = divprune_reference(stock, 64)
            torch.testing.assert_close(ours[b], stock[kept], rtol=1e-7, atol=1e-7)
            assert handle.last_selection[b].tiles[0].kept.tolist() == kept  # rows are patches here
        assert count_placeholders(inputs, model) == 2 * 64
    finally:
        handle.remove()


def test_more_tokens_than_the_image_has_is_refused_naming_its_count(tiny_next, tiny_llava, make_image):
    model, processor = tiny_next
    handle = apply_method(model, processor, "divprune", 2929)
    try:
        with pytest.raises(ValueError, match=r"tokens=2929 is more than this image's 2928 stock tokens"):
            processor(images=make_image(672, 672), text="<image>", return_tensors="pt")
        with pytest.raises(ValueError, match="2928"):
            handle.num_image_tokens((672, 672))
        with handle.use(tokens=2928):
            assert handle.num_image_tokens((672, 672)) == 2928
    finally:
        handle.remove()
    model, processor = tiny_llava
    handle = apply_method(model, processor, "divprune", 577)
    try:
        with pytest.raises(ValueError, match="need 1 <= tokens <= 576"):
            processor(images=make_image(336, 336), text="<image>", return_tensors="pt")
    finally:
        handle.remove()
