"""Independent references for the reduction methods, written from METHODS_SPEC.md with plain Python
control flow in float64, and the stock signals they read, taken from a stock model that runs its
tower with eager attention (never the library's hooks or helpers)."""

from __future__ import annotations

import functools

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import visionzip
from visionzip.tiny import load_tiny

SIDE = 24
PATCHES = SIDE * SIDE


@functools.cache
def models64(family: str):
    """(model to patch, stock oracle on eager attention, processor), float64; shared by the test files."""
    model, processor = load_tiny(family, dtype=torch.float64)
    oracle, _ = load_tiny(family, dtype=torch.float64)
    oracle.set_attn_implementation({"vision_config": "eager"})
    return model, oracle, processor


def count_placeholders(inputs, model) -> int:
    return int((inputs.input_ids == model.config.image_token_id).sum())


# -- stock signals ------------------------------------------------------------------------------------
def stock_signals(oracle, pixel_values):
    """(T, 577, C) feature-layer states and (T, 577) CLS rows (summed over heads) from the eager maps."""
    out = oracle.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    layer = oracle.config.vision_feature_layer
    hidden = out.hidden_states[layer]
    # hidden_states holds the embeddings and then each layer's output: one entry more than attentions
    position = layer if layer >= 0 else len(out.attentions) + 1 + layer
    attention = out.attentions[position - 1]
    return hidden, attention[:, :, 0, :].sum(dim=1)


def image_tiles(oracle, inputs, index: int = 0):
    """One image's real tiles (1 + n, 3, 336, 336), its (rows, cols) grid ((0, 0) for LLaVA-1.5)."""
    pixels = inputs.pixel_values[index]
    if pixels.dim() == 3:
        return pixels[None], (0, 0)
    size = inputs.image_sizes[index].tolist()
    rows, cols = get_anyres_image_grid_shape(size, oracle.config.image_grid_pinpoints, 336)
    return pixels[: 1 + rows * cols], (rows, cols)


def pack_per_tile(tile_tokens, tile_patches, grid):
    """The spec's per-tile packing: the base tile's tokens as they are, then the crops' tokens in
    raster order over the stitched (rows*24) x (cols*24) grid, by each token's patch; no newline."""
    rows, cols = grid
    packed = list(tile_tokens[0])
    if rows == 0:
        return packed
    stitched = []
    for crop, (tokens, patches) in enumerate(zip(tile_tokens[1:], tile_patches[1:])):
        r, c = divmod(crop, cols)
        for token, patch in zip(tokens, patches):
            i, j = divmod(patch, SIDE)
            stitched.append(((r * SIDE + i) * cols * SIDE + c * SIDE + j, token))
    return packed + [token for _, token in sorted(stitched, key=lambda pair: pair[0])]


# -- the methods ------------------------------------------------------------------------------------
def random_reference(num_tiles: int, tokens: int, seed: int) -> list[list[int]]:
    """Per tile, the first `tokens` of a randperm(576) from one CPU generator, tiles in order, sorted."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(PATCHES, generator=generator)[:tokens].tolist()) for _ in range(num_tiles)]


def pool_reference(patches: torch.Tensor, window: int) -> list[torch.Tensor]:
    """(576, C) one tile's patches -> its window means, row-major over the (24/s) x (24/s) grid."""
    means = []
    for wi in range(SIDE // window):
        for wj in range(SIDE // window):
            cells = [patches[(wi * window + a) * SIDE + wj * window + b] for a in range(window) for b in range(window)]
            means.append(sum(cells) / len(cells))
    return means


def divprune_reference(features: torch.Tensor, tokens: int) -> list[int]:
    """Greedy max-min cosine distance, straight from the spec's two rules, in float64.

    First pick: the 2nd-smallest value of each column of D (the official formulation: the smallest
    is the self-distance); next picks: the unpicked row whose minimum distance to the picked rows is
    largest; ties to the first index."""
    x = features.double()
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    num_rows = x.shape[0]
    if num_rows == 1:
        return [0]
    nearest = distance.sort(dim=0).values[1].tolist()
    picked = [max(range(num_rows), key=lambda j: nearest[j])]
    closest = distance[picked[0]]  # (N,) min over the picked rows, one row folded in per pick
    while len(picked) < tokens:
        scores = closest.tolist()
        taken = set(picked)
        picked.append(max((j for j in range(num_rows) if j not in taken), key=lambda j: scores[j]))
        closest = torch.minimum(closest, distance[picked[-1]])
    return sorted(picked)


def vispruner_reference(cls_row: torch.Tensor, patches: torch.Tensor, tokens: int) -> list[int]:
    """One tile: cls_row (576,) the CLS attention of each patch, patches (576, C) -> kept, ascending.

    Important: the int(T/2) highest attention; residual: the rest in descending-attention order.
    Diverse: rounds of even/odd split, each even entry scored by its largest cosine to an odd entry,
    up to 8 top scorers dropped, list = [kept evens by descending score] + [odds in order]."""
    scores = cls_row.double().tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    important = tokens // 2
    diverse = tokens - important
    kept, residual = order[:important], order[important:]
    if diverse > 0:
        x = patches.double()
        unit = x / x.norm(dim=1, keepdim=True)
        cosine = unit @ unit.T
        while True:
            evens, odds = residual[0::2], residual[1::2]
            drop = min(8, len(residual) - diverse, len(evens))
            if drop <= 0:
                break
            best = cosine[torch.tensor(evens)][:, torch.tensor(odds)].max(dim=1).values.tolist()
            by_score = sorted(range(len(evens)), key=lambda k: -best[k])
            residual = [evens[k] for k in by_score[drop:]] + odds
        kept = kept + residual
    return sorted(kept)


def fastv_masked_logits(model, layer: int, dropped: list[int], **inputs) -> torch.Tensor:
    """FastV's spec as a mask: a stock full-length forward of `model` (float64, SDPA) in which layers
    >= `layer` hide the `dropped` positions' keys from every query, positions unchanged; (1, S, V) logits.
    SDPA, not eager: eager attention takes its softmax in float32, too coarse for a float64 check."""

    def hide(module, args, kwargs):
        length = args[0].shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        causal[:, dropped] = False
        causal[dropped, dropped] = True  # a dropped query still sees itself (its row is never read)
        mask = torch.zeros(1, 1, length, length, dtype=torch.float64)
        kwargs["attention_mask"] = mask.masked_fill(~causal, torch.finfo(torch.float64).min)
        return args, kwargs

    layers = model.model.language_model.layers
    hooks = [layer_.register_forward_pre_hook(hide, with_kwargs=True) for layer_ in layers[layer:]]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def apply_method(model, processor, method: str, tokens: int, seed: int = 0):
    return visionzip.apply(model, processor, method=method, tokens=tokens, seed=seed)


# -- running both sides ---------------------------------------------------------------------------
def reduced_features(model, processor, images, texts):
    """(processor inputs, list of per-image features) of the patched model's get_image_features."""
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    kwargs = {"pixel_values": inputs.pixel_values}
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs.image_sizes
    with torch.no_grad():
        features = model.model.get_image_features(**kwargs).pooler_output
    return inputs, list(features)


def per_tile_expected(oracle, inputs, tile_reference):
    """Per image: (expected packed features (k, E), the per-tile reference results).

    tile_reference(tile index over the whole call, hidden (577, C), cls_row (577,)) returns one
    tile's (tokens list, patch position of each token)."""
    images, start = [], 0
    with torch.no_grad():
        for index in range(len(inputs.pixel_values)):
            tiles, grid = image_tiles(oracle, inputs, index)
            hidden, cls_rows = stock_signals(oracle, tiles)
            results = [tile_reference(start + t, hidden[t], cls_rows[t]) for t in range(len(tiles))]
            packed = pack_per_tile([tokens for tokens, _ in results], [patches for _, patches in results], grid)
            images.append((oracle.model.multi_modal_projector(torch.stack(packed)), results))
            start += len(tiles)
    return images
