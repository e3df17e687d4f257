"""LLaVA-OneVision (SigLIP-384/14, 27x27 patches, no CLS token) on the tiny offline checkpoint.

Off is stock bit for bit; every method's count is known before any pixel and equals the placeholders
and the features; every method that runs matches an independent float64 reference written here from
the spec (plain loops) on an unpatched stock copy's hidden states: the signal on a CLS-free tower is
the attention each patch receives, averaged over queries, summed over heads, from the feature layer's
whole attention map computed by hand in float64 (not eager attention's maps: it takes its softmax in
float32, which blurs the near-ties VisPruner's full ranking depends on).
"""

import pytest
import torch
from method_refs import divprune_reference, vispruner_reference
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

import visionzip
from visionzip.layout import packed_patch_map
from visionzip.patch.llava_onevision import MULTI_IMAGE, OnevisionPacking, interpolated_patch_map
from visionzip.tiny import load_tiny

FAMILY = "llava_onevision"
SIDE = 27
PATCHES = SIDE * SIDE
PROMPT = "<|im_start|>user <image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
SIZES = [(384, 384), (500, 700), (1000, 300)]  # grids 1x1, 2x2, 3x1
MERGED = "merged"


@pytest.fixture(scope="module")
def models():
    """(model to patch, an unpatched stock copy, processor), float64."""
    model, processor = load_tiny(FAMILY, dtype=torch.float64)
    oracle, _ = load_tiny(FAMILY, dtype=torch.float64)
    return model, oracle, processor


@pytest.fixture
def handle(models):
    model, _, processor = models
    made = visionzip.apply(model, processor)
    yield made
    made.remove()


def placeholders(inputs, model) -> int:
    return int((inputs.input_ids == model.config.image_token_id).sum())


# -- the oracle's signals and the spec's per-tile layout ------------------------------------------------
def oracle_signals(oracle, tiles):
    """Per tile: the feature layer's states (729, C), the attention each token receives (729,) (mean over
    queries, sum over heads) and the keys averaged over heads (729, d), recomputed by hand."""
    tower = oracle.model.vision_tower
    out = tower(tiles, output_hidden_states=True)
    layer_index = len(out.hidden_states) - 2  # vision_feature_layer -1: the last layer
    layer = [m for m in tower.modules() if type(m).__name__ == "SiglipEncoderLayer"][layer_index]
    attention = layer.self_attn
    normed = layer.layer_norm1(out.hidden_states[layer_index])
    heads = attention.num_heads

    def by_head(states):  # (T, S, C) -> (T, H, S, d)
        return states.view(*states.shape[:2], heads, -1).transpose(1, 2)

    queries, keys = by_head(attention.q_proj(normed)), by_head(attention.k_proj(normed))
    weights = (queries @ keys.transpose(-1, -2) * attention.head_dim**-0.5).softmax(dim=-1)  # (T, H, S, S)
    received = weights.mean(dim=2).sum(dim=1)  # (T, S): mean over queries, sum over heads
    return out.hidden_states[-1], received, keys.mean(dim=1)


def image_tiles(oracle, inputs):
    size = inputs.image_sizes[0].tolist()
    rows, cols = get_anyres_image_grid_shape(size, oracle.config.image_grid_pinpoints, 384)
    return inputs.pixel_values[0][: 1 + rows * cols], (rows, cols)


def pack(tile_tokens, tile_positions, grid):
    """Base tile as it is; then the crops' positioned tokens in raster order over the stitched grid,
    then their merged tokens crop by crop; no newline."""
    rows, cols = grid
    stitched, merged = [], []
    for crop, (tokens, positions) in enumerate(zip(tile_tokens[1:], tile_positions[1:])):
        r, c = divmod(crop, cols)
        for token, patch in zip(tokens, positions):
            if patch == MERGED:
                merged.append(token)
            else:
                i, j = divmod(patch, SIDE)
                stitched.append(((r * SIDE + i) * cols * SIDE + c * SIDE + j, token))
    return list(tile_tokens[0]) + [token for _, token in sorted(stitched, key=lambda pair: pair[0])] + merged


def visionzip_tile(hidden, received, keys, dominant, contextual):
    """One tile, from the rule in visionzip/methods/visionzip.py: the `dominant` patches most attended,
    ascending; then `contextual` targets every step-th remaining patch, each remaining patch joining
    the target of highest key cosine (first on ties), merged as target + mean(members)."""
    scores = received.tolist()
    kept = sorted(sorted(range(PATCHES), key=lambda i: -scores[i])[:dominant])
    remaining = [i for i in range(PATCHES) if i not in set(kept)]
    tokens, positions = [hidden[i] for i in kept], list(kept)
    if contextual:
        step = max(1, len(remaining) // contextual)
        targets = [remaining[k * step] for k in range(contextual)]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        groups = {t: [] for t in targets}
        for patch in remaining:
            if patch not in groups:
                sims = [float(unit[patch] @ unit[t]) for t in targets]
                groups[targets[sims.index(max(sims))]].append(patch)
        for t in targets:
            members = groups[t]
            tokens.append(hidden[t] + torch.stack([hidden[m] for m in members]).mean(0) if members else hidden[t])
            positions.append(MERGED)
    return tokens, positions, kept


def expected_per_tile(oracle, inputs, tile_rule):
    """(packed projected features, per tile kept patches, per tile received attention)."""
    tiles, grid = image_tiles(oracle, inputs)
    with torch.no_grad():
        hidden, received, keys = oracle_signals(oracle, tiles)
        results = [tile_rule(t, hidden[t], received[t], keys[t]) for t in range(len(tiles))]
        packed = pack([r[0] for r in results], [r[1] for r in results], grid)
        return oracle.model.multi_modal_projector(torch.stack(packed)), [r[2] for r in results], received


def run(handle, model, processor, image, **use):
    with handle.use(**use) as call, torch.no_grad():
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        [features] = model.model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)[
            "pooler_output"
        ]
    return inputs, features, call


# -- off, counts ------------------------------------------------------------------------------------------
def test_off_is_stock_bit_for_bit(models, make_image):
    model, _, processor = models
    image = make_image(500, 700, seed=1)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
    handle = visionzip.apply(model, processor, method="random", tokens=64)
    try:
        with handle.use(enabled=False), torch.no_grad():
            again = processor(images=image, text=PROMPT, return_tensors="pt")
            off = model(**again).logits
        assert torch.equal(again.input_ids, inputs.input_ids) and torch.equal(off, stock)
    finally:
        handle.remove()
    assert "get_image_features" not in model.model.__dict__ and "replace_image_token" not in processor.__dict__


@pytest.mark.parametrize("size", [*SIZES, (2304, 2304), (800, 2000), (333, 1500)])
@pytest.mark.parametrize(
    "use, per_tile",
    [
        (dict(method="visionzip", dominant=54, contextual=10), 64),
        (dict(method="visionzip_dominant", tokens=81), 81),
        (dict(method="random", tokens=30), 30),
        (dict(method="pool", tokens=81), 81),
        (dict(method="vispruner", tokens=64), 64),
        (dict(method="divprune", tokens=200), None),
        (dict(method="fastv", tokens=200), None),
        (dict(enabled=False), None),
    ],
)
def test_counts_predicted_produced_and_placeholders_agree(handle, models, make_image, size, use, per_tile):
    model, _, processor = models
    config = model.config
    grid = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, 384)
    with handle.use(enabled=False):
        stock = placeholders(processor(images=make_image(*size), text=PROMPT, return_tensors="pt"), model)
    inputs, features, call = run(handle, model, processor, make_image(*size), **use)
    with handle.use(**use):
        predicted = handle.num_image_tokens(size)
    if per_tile:
        count = (1 + grid[0] * grid[1]) * per_tile  # every tile keeps k: base + crops, no newline
    else:
        count = 200 if use.get("method") == "divprune" else stock  # FastV prunes inside the LM: stock prompt
    assert predicted == placeholders(inputs, model) == features.shape[0] == count
    if use.get("enabled", True):
        assert call.selection[0].grid == tuple(grid) and len(call.selection[0].tiles) == 1 + grid[0] * grid[1]


def test_several_images_in_one_prompt_are_refused_under_reduction_and_run_stock(handle, models, make_image):
    model, _, processor = models
    images = [[make_image(400, 400, seed=1), make_image(300, 500, seed=2)]]
    text = "<|im_start|>user <image><image>\nCompare<|im_end|>\n"
    with pytest.raises(ValueError, match="several images in one prompt"):
        processor(images=images, text=text, return_tensors="pt")
    with handle.use(enabled=False), torch.no_grad():
        inputs = processor(images=images, text=text, return_tensors="pt")
        model(**inputs)  # stock runs them
    with pytest.raises(ValueError, match="several images"), torch.no_grad():
        model(**inputs)
    assert "several images" in MULTI_IMAGE


def test_cdpruner_is_refused_with_the_reason(models):
    model, _, processor = models
    with pytest.raises(ValueError, match="siglip_vision_model.*no faithful relevance"):
        visionzip.apply(model, processor, method="cdpruner", tokens=64)
    assert "get_image_features" not in model.model.__dict__  # a refused apply leaves the model stock


# -- the methods against the references --------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dominant, contextual", [(54, 10), (81, 0), (1, 20)])
def test_visionzip_on_a_tower_without_cls_matches_the_reference(handle, models, make_image, size, dominant, contextual):
    model, oracle, processor = models
    image = make_image(*size, seed=dominant + contextual)
    method = dict(method="visionzip", dominant=dominant, contextual=contextual)
    if contextual == 0:
        method = dict(method="visionzip_dominant", tokens=dominant)
    inputs, ours, call = run(handle, model, processor, image, **method)

    def rule(t, hidden, received, keys):
        return visionzip_tile(hidden, received, keys, dominant, contextual)

    expected, kept, received = expected_per_tile(oracle, inputs, rule)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    tiles = call.selection[0].tiles
    assert [tile.kept.tolist() for tile in tiles] == kept
    for tile, row in zip(tiles, received):  # the signal itself, as the overlay draws it (float32)
        torch.testing.assert_close(tile.cls_attention.double(), row, rtol=1e-5, atol=1e-7)
        assert len(tile.targets) == contextual


@pytest.mark.parametrize("size, tokens", [((500, 700), 64), ((1000, 300), 20), ((384, 384), 7)])
def test_vispruner_matches_the_reference(handle, models, make_image, size, tokens):
    model, oracle, processor = models
    inputs, ours, call = run(
        handle, model, processor, make_image(*size, seed=tokens), method="vispruner", tokens=tokens
    )

    def rule(t, hidden, received, keys):
        kept = vispruner_reference(received, hidden, tokens)
        return [hidden[p] for p in kept], kept, kept

    expected, kept, _ = expected_per_tile(oracle, inputs, rule)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    assert [tile.kept.tolist() for tile in call.selection[0].tiles] == kept


def test_random_matches_the_seeded_draw(handle, models, make_image):
    model, oracle, processor = models
    inputs, ours, call = run(handle, model, processor, make_image(500, 700, seed=5), method="random", tokens=50, seed=9)
    generator = torch.Generator().manual_seed(9)
    draws = [sorted(torch.randperm(PATCHES, generator=generator)[:50].tolist()) for _ in range(5)]

    def rule(t, hidden, *_):
        return [hidden[p] for p in draws[t]], draws[t], draws[t]

    expected, kept, _ = expected_per_tile(oracle, inputs, rule)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    assert [tile.kept.tolist() for tile in call.selection[0].tiles] == draws


@pytest.mark.parametrize("tokens, window", [(81, 3), (9, 9)])
def test_pool_matches_window_means(handle, models, make_image, tokens, window):
    model, oracle, processor = models
    inputs, ours, _ = run(handle, model, processor, make_image(1000, 300, seed=tokens), method="pool", tokens=tokens)

    def rule(t, hidden, *_):
        means, anchors = [], []
        for wi in range(SIDE // window):
            for wj in range(SIDE // window):
                cells = [(wi * window + a) * SIDE + wj * window + b for a in range(window) for b in range(window)]
                means.append(sum(hidden[c] for c in cells) / len(cells))
                anchors.append(cells[0])
        return means, anchors, anchors

    expected, _, _ = expected_per_tile(oracle, inputs, rule)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="valid counts"):
        with handle.use(method="pool", tokens=144):  # a 24x24 grid's, not a 27x27 one's
            pass


@pytest.mark.parametrize("size, tokens", [((500, 700), 300), ((2304, 2304), 500)])
def test_divprune_matches_the_reference_on_the_stock_packing(handle, models, make_image, size, tokens):
    model, oracle, processor = models
    image = make_image(*size, seed=3)
    _, ours, call = run(handle, model, processor, image, method="divprune", tokens=tokens)
    _, stock, _ = run(handle, model, processor, image, enabled=False)  # the stock packed rows (downscaled at 2304)
    rows = divprune_reference(stock, tokens)
    torch.testing.assert_close(ours, stock[rows], rtol=0, atol=0)
    assert sum(len(tile.kept) for tile in call.selection[0].tiles) <= tokens  # newline rows stand for no patch


@pytest.mark.parametrize("size", SIZES)
def test_patch_map_of_an_undownscaled_image_is_the_exact_index_map(handle, size):
    """Below anyres_max_9's threshold nothing is interpolated: the coordinate map must equal the map
    made by packing the patch indices themselves (layout.packed_patch_map)."""
    base = handle.base
    grid = tuple(get_anyres_image_grid_shape(list(size), base.config.image_grid_pinpoints, 384))
    count = 1 + grid[0] * grid[1]

    def stock_pack(features, newline):
        return OnevisionPacking().pack(base, features, torch.tensor(size), newline)

    assert torch.equal(interpolated_patch_map(stock_pack, count, SIDE, grid), packed_patch_map(stock_pack, count, SIDE))


# -- bench.phases on this family ---------------------------------------------------------------------------
def test_bench_phases_runs_onevision_and_its_flops_match_torchs_counter(make_image, tmp_path):
    """The tiny run's counts (stock 729 + 54x54 + 54 newlines at 672x672; 5 tiles x 64 under VisionZip
    320), and the tower's and VisionZip's FLOP formulas without a CLS token against FlopCounterMode."""
    import contextlib
    import io
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from bench import phases as bench

    argv = ["--family", FAMILY, "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main([*argv, "--new-tokens", "1", "--budgets", "320", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("onevision-tiny-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(row["mode"], row["visual_tokens"]) for row in rows] == [("full", 729 + 54 * 54 + 54), ("320", 5 * 64)]

    model, processor = load_tiny(FAMILY)
    model.set_attn_implementation({"vision_config": "eager"})  # every attention matmul visible to the counter
    inputs = processor(images=make_image(672, 672), text=PROMPT, return_tensors="pt")
    vision = model.config.vision_config

    def counted(run) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    tower = counted(lambda: model.model.vision_tower(inputs.pixel_values.flatten(0, 1)))
    assert tower == pytest.approx(bench.tower_flops(vision, 5), rel=1e-6)
    handle = visionzip.apply(model, processor, 54, 10)
    try:
        reduced = counted(lambda: model.model.get_image_features(inputs.pixel_values, inputs.image_sizes))
    finally:
        handle.remove()
    budget = visionzip.preset_budget(FAMILY, 320)
    expected = bench.tower_flops(vision, 5) + bench.visionzip_flops(vision, 5, budget)
    assert reduced == pytest.approx(expected + bench.projector_flops(model.config, 5 * 64), rel=1e-6)


def test_impossible_budgets_state_siglips_limits(handle):
    with pytest.raises(ValueError, match=r"729 patches, no CLS\): need 1 <= dominant <= 729"):
        handle.set_budget(700, 100)
    with pytest.raises(ValueError, match="729 patches and no CLS token"):
        with handle.use(method="visionzip_dominant", tokens=730):
            pass
    with handle.use(dominant=729, contextual=0):  # every patch is a legal budget: nothing to drop
        assert handle.num_image_tokens((384, 384)) == 2 * 729
