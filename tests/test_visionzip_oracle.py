"""VisionZip checked against an independent computation.

The oracle runs the stock tower with eager attention and `output_attentions=True`, reads the CLS
row from the returned maps, recomputes the keys from the layer input with plain code, and redoes
selection, merging and LLaVA-NeXT packing with Python loops straight from the spec.  Everything
runs in float64 so rankings cannot flip on rounding.
"""

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import visionzip
from visionzip.tiny import load_tiny

SIDE = 24


@pytest.fixture(scope="module")
def models64():
    """(VisionZip model on SDPA, oracle model on eager, processor), LLaVA-NeXT and LLaVA-1.5."""
    pairs = {}
    for family in ("llava_next", "llava"):
        model, processor = load_tiny(family, dtype=torch.float64)
        oracle, _ = load_tiny(family, dtype=torch.float64)
        oracle.set_attn_implementation({"vision_config": "eager"})
        pairs[family] = (model, oracle, processor)
    return pairs


def oracle_tile_tokens(hidden, cls_row, keys_mean, dominant, contextual, merge="sum"):
    """One tile, from the spec, with loops: returns (tokens list, kept, targets, {patch: slot})."""
    seq_len = hidden.shape[0]
    scores = cls_row[1:].tolist()
    top = sorted(range(seq_len - 1), key=lambda i: -scores[i])[: dominant - 1]
    dominant_tokens = sorted([0] + [i + 1 for i in top])
    remaining = [i for i in range(seq_len) if i not in set(dominant_tokens)]
    tokens = [hidden[i] for i in dominant_tokens]
    targets, assignment = [], {}
    if contextual > 0:
        step = max(1, len(remaining) // contextual)
        targets = [remaining[k * step] for k in range(contextual)]
        unit = keys_mean / keys_mean.norm(dim=-1, keepdim=True)
        members = {t: [] for t in targets}
        for token in remaining:
            if token in members:
                continue
            sims = [float(unit[token] @ unit[t]) for t in targets]
            slot = sims.index(max(sims))
            members[targets[slot]].append(token)
            assignment[token - 1] = slot
        for t in targets:
            group = [hidden[m] for m in members[t]]
            if merge == "sum":
                tokens.append(hidden[t] + torch.stack(group).mean(0) if group else hidden[t])
            else:
                tokens.append(torch.stack([hidden[t], *group]).mean(0))
    kept = [i - 1 for i in dominant_tokens[1:]]
    return tokens, kept, [t - 1 for t in targets], assignment


def oracle_signals(oracle, pixel_values, feature_layer):
    """Feature-layer hidden states, CLS attention row (from the eager map) and head-mean keys."""
    tower = oracle.model.vision_tower
    out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    num_layers = len(out.attentions)
    layer_index = (feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer) - 1
    hidden = out.hidden_states[feature_layer]
    cls_rows = out.attentions[layer_index][:, :, 0, :].sum(dim=1)  # (T, S)
    layer = [m for m in tower.modules() if type(m).__name__ == "CLIPEncoderLayer"][layer_index]
    layer_input = out.hidden_states[layer_index]
    attn = layer.self_attn
    keys = attn.k_proj(layer.layer_norm1(layer_input))
    keys = keys.view(*keys.shape[:2], attn.num_heads, attn.head_dim).mean(dim=2)  # (T, S, d)
    return hidden, cls_rows, keys


def oracle_next_features(oracle, inputs, dominant, contextual, feature_layer=-2, merge="sum"):
    """Packed features and selections per image, in the spec's LLaVA-NeXT layout."""
    config = oracle.config
    features, selections = [], []
    for pixels, size in zip(inputs.pixel_values, inputs.image_sizes.tolist()):
        rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, 336)
        count = 1 + rows * cols
        hidden, cls_rows, keys = oracle_signals(oracle, pixels[:count], feature_layer)
        tiles = [oracle_tile_tokens(hidden[t], cls_rows[t], keys[t], dominant, contextual, merge) for t in range(count)]
        project = oracle.model.multi_modal_projector
        base = tiles[0][0]
        stitched = []
        for crop, (tokens, kept, _, _) in enumerate(tiles[1:]):
            r, c = divmod(crop, cols)
            for patch, token in zip(kept, tokens[1:dominant]):
                i, j = divmod(patch, SIDE)
                stitched.append(((r * SIDE + i) * cols * SIDE + c * SIDE + j, token))
        packed = list(base)
        packed += [token for _, token in sorted(stitched, key=lambda pair: pair[0])]
        packed += [tokens[0] for tokens, *_ in tiles[1:]]
        packed += [token for tokens, *_ in tiles[1:] for token in tokens[dominant:]]
        features.append(project(torch.stack(packed)))
        selections.append([tile[1:] for tile in tiles])
    return features, selections


def assert_selection_matches(image_selection, oracle_tiles):
    assert len(image_selection.tiles) == len(oracle_tiles)
    for tile, (kept, targets, assignment) in zip(image_selection.tiles, oracle_tiles):
        assert tile.kept.tolist() == kept
        assert tile.targets.tolist() == targets
        assert dict(zip(tile.merged.tolist(), tile.merged_into.tolist())) == assignment


@pytest.mark.parametrize(
    "size, dominant, contextual, seed",
    [
        ((672, 672), 54, 10, 0),
        ((480, 640), 108, 20, 1),
        ((1080, 1920), 27, 5, 2),
        ((336, 1008), 1, 576, 3),  # every remaining token a target, nothing merged
        ((672, 336), 577, 0, 4),  # keep everything
        ((500, 500), 40, 0, 5),  # drop the rest
    ],
)
def test_llava_next_features_and_selection_match_oracle(models64, make_image, size, dominant, contextual, seed):
    model, oracle, processor = models64["llava_next"]
    image = make_image(*size, seed=seed)
    handle = visionzip.apply(model, processor, dominant, contextual)
    try:
        inputs = processor(images=image, text="<image>\nhi", return_tensors="pt")
        with torch.no_grad():
            ours = model.model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
            expected, oracle_tiles = oracle_next_features(oracle, inputs, dominant, contextual)
        assert len(ours.pooler_output) == 1
        torch.testing.assert_close(ours.pooler_output[0], expected[0], rtol=1e-7, atol=1e-7)
        assert_selection_matches(handle.last_selection[0], oracle_tiles[0])
        placeholders = int((inputs.input_ids == model.config.image_token_id).sum())
        assert placeholders == ours.pooler_output[0].shape[0] == len(oracle_tiles[0]) * (dominant + contextual)
    finally:
        handle.remove()


def test_mean_merge_matches_oracle(models64, make_image):
    model, oracle, processor = models64["llava_next"]
    handle = visionzip.apply(model, processor, 27, 5, merge="mean")
    try:
        inputs = processor(images=make_image(672, 672, seed=7), text="<image>", return_tensors="pt")
        with torch.no_grad():
            ours = model.model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
            expected, _ = oracle_next_features(oracle, inputs, 27, 5, merge="mean")
        torch.testing.assert_close(ours.pooler_output[0], expected[0], rtol=1e-7, atol=1e-7)
    finally:
        handle.remove()


@pytest.mark.parametrize("feature_layer", [-2, -1, 2])
def test_feature_layer_is_found_from_config(models64, make_image, feature_layer):
    """Towers of any depth, any configured layer: signals come from the layer LLaVA feeds."""
    model, oracle, processor = models64["llava_next"]
    saved = model.config.vision_feature_layer
    model.config.vision_feature_layer = oracle.config.vision_feature_layer = feature_layer
    try:
        handle = visionzip.apply(model, processor, 54, 10)
        try:
            inputs = processor(images=make_image(336, 672, seed=11), text="<image>", return_tensors="pt")
            with torch.no_grad():
                ours = model.model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
                expected, oracle_tiles = oracle_next_features(oracle, inputs, 54, 10, feature_layer=feature_layer)
            torch.testing.assert_close(ours.pooler_output[0], expected[0], rtol=1e-7, atol=1e-7)
            assert_selection_matches(handle.last_selection[0], oracle_tiles[0])
        finally:
            handle.remove()
    finally:
        model.config.vision_feature_layer = oracle.config.vision_feature_layer = saved


def test_llava_15_matches_oracle(models64, make_image):
    model, oracle, processor = models64["llava"]
    handle = visionzip.apply(model, processor, 54, 10)
    try:
        images = [make_image(480, 640, seed=12), make_image(700, 300, seed=13)]
        inputs = processor(images=images, text=["<image>\na", "<image>\nb"], return_tensors="pt", padding=True)
        with torch.no_grad():
            ours = model.model.get_image_features(pixel_values=inputs.pixel_values)
            hidden, cls_rows, keys = oracle_signals(oracle, inputs.pixel_values, -2)
        for b in range(2):
            tokens, kept, targets, assignment = oracle_tile_tokens(hidden[b], cls_rows[b], keys[b], 54, 10)
            expected = oracle.model.multi_modal_projector(torch.stack(tokens))
            torch.testing.assert_close(ours.pooler_output[b], expected, rtol=1e-7, atol=1e-7)
            assert_selection_matches(handle.last_selection[b], [(kept, targets, assignment)])
        assert int((inputs.input_ids == model.config.image_token_id).sum()) == 2 * 64
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_tokens_are_taken_by_index_exactly_as_gather_takes_them(dtype):
    """VisionZip's merge, Random, VisPruner and CDPruner take kept rows by index instead of `gather`
    (far quicker on a CPU): the same bits, for repeated indices and an empty choice too."""
    from visionzip.merge import take_tokens

    generator = torch.Generator().manual_seed(7)
    tokens = torch.randn(3, 577, 64, generator=generator).to(dtype)
    for index in (torch.randint(0, 577, (3, 100), generator=generator), torch.zeros(3, 5, dtype=torch.long)):
        expected = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, 64))
        taken = take_tokens(tokens, index)
        assert taken.dtype == dtype and torch.equal(taken, expected)
    assert take_tokens(tokens, torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0, 64)
