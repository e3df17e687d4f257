"""Qwen2.5-VL (`visionzip/patch/qwen2_5_vl.py`) on the tiny offline checkpoint: off equals stock bit for bit,
counts predicted = produced = placeholders for several image sizes, and every method that runs checked
against an independent float64 reference: the signal from an eager attention map written here, the
choice in plain loops, and the logits of the stock language model run on the rows and M-RoPE positions
gathered from a full (unreduced) run."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from method_refs import divprune_reference, vispruner_reference
from transformers.vision_utils import get_vision_window_index

import visionzip
from visionzip.tiny import load_tiny

QWEN = "qwen2_5_vl"
QUESTION = "What is in the picture?"
SIZES = [(200, 300), (333, 517), (64, 900), (30, 40), (1100, 900)]
BUDGETS = {
    "visionzip": dict(dominant=20, contextual=5),
    "visionzip_dominant": dict(tokens=30),
    "random": dict(tokens=30, seed=3),
    "pool": dict(tokens=30),
    "divprune": dict(tokens=30),
    "vispruner": dict(tokens=30),
    "fastv": dict(tokens=30),
}


@functools.cache
def models(dtype: torch.dtype = torch.float64):
    """(model to patch, stock model, processor) of the tiny Qwen2.5-VL, shared by the tests."""
    model, processor = load_tiny(QWEN, dtype=dtype)
    stock, _ = load_tiny(QWEN, dtype=dtype)
    return model, stock, processor


def prompt(processor, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs_for(processor, images):
    return processor(images=images, text=prompt(processor, len(images)), return_tensors="pt")


def use(handle, method: str, **budget):
    if method == "visionzip":
        return handle.use(method=method, dominant=budget["dominant"], contextual=budget["contextual"])
    return handle.use(method=method, **budget)


def patched_tiny():
    """(handle, model, stock, processor): the shared float64 tiny model patched for one test, removed after."""
    model, stock, processor = models()
    handle = visionzip.apply(model, processor)
    yield handle, model, stock, processor
    handle.remove()


applied_fixture = pytest.fixture(name="applied")(patched_tiny)


def assert_choice_matches(image, anchors: list, kept: list, signal, method: str) -> None:
    """One image's (or slice's) recorded choice against its reference: kept cells, the signal the methods
    that read it ranked by, and the anchors of merged tokens."""
    tile = image.tiles[0]
    assert tile.kept.tolist() == sorted(kept)
    if method in ("visionzip", "visionzip_dominant", "vispruner"):
        torch.testing.assert_close(tile.cls_attention.double(), signal, rtol=1e-6, atol=1e-9)
    if method in ("visionzip", "pool"):
        assert sorted(tile.kept.tolist() + tile.targets.tolist()) == anchors


# -- off == stock ---------------------------------------------------------------------------------
def assert_off_equals_stock(make_inputs) -> None:
    """The float32 model (as served) with reduction off, and after `remove()`, gives the stock prompt, logits
    and greedy tokens bit for bit on the inputs `make_inputs(processor)` builds."""
    model, processor = load_tiny(QWEN)
    stock_inputs = make_inputs(processor)
    with torch.no_grad():
        stock_logits = model(**stock_inputs).logits
        stock_ids = model.generate(**stock_inputs, max_new_tokens=5, do_sample=False)
    handle = visionzip.apply(model, processor, dominant=20, contextual=5)
    try:
        with handle.use(enabled=False), torch.no_grad():
            inputs = make_inputs(processor)
            assert torch.equal(inputs.input_ids, stock_inputs.input_ids)
            assert torch.equal(model(**inputs).logits, stock_logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), stock_ids)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**make_inputs(processor)).logits, stock_logits)  # removed: stock again


def test_off_equals_stock_bit_for_bit(make_image):
    images = [make_image(200, 300, seed=1), make_image(333, 517, seed=2)]
    assert_off_equals_stock(lambda processor: inputs_for(processor, images))


# -- counts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_counts_predicted_equal_produced_equal_placeholders(applied, make_image, method):
    handle, model, _, processor = applied
    for index, size in enumerate(SIZES):
        if method == "fastv" and handle.family.stock_count(handle, size) < 30:
            with use(handle, method, **BUDGETS[method]), pytest.raises(ValueError, match="this image has 6 tokens"):
                handle.num_image_tokens(size)  # FastV keeps its own rule: no more than an image holds
            continue
        with use(handle, method, **BUDGETS[method]) as call:
            predicted = handle.num_image_tokens(size)
            counted = processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]
            inputs = inputs_for(processor, [make_image(*size, seed=index)])
            placeholders = int((inputs.input_ids == model.config.image_token_id).sum())
            features = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw).pooler_output
        produced = features[0].shape[0]
        assert predicted == counted == placeholders == produced == call.visual_tokens[0], (method, size)
        rows, cols = call.selection[0].grid
        cells = rows * cols
        assert handle.family.stock_count(handle, size) == cells
        if method == "fastv":
            assert produced == cells  # FastV cuts inside the language model
        elif method == "pool":
            window = next(s for s in range(1, cells + 1) if math.ceil(rows / s) * math.ceil(cols / s) <= 30)
            assert produced == math.ceil(rows / window) * math.ceil(cols / window)
        else:
            assert produced == min(30 if method != "visionzip" else 25, cells)


def test_a_budget_above_the_image_keeps_every_token_as_stock(applied, make_image):
    handle, model, stock, processor = applied
    with handle.use(enabled=False):
        inputs = inputs_for(processor, [make_image(30, 40)])  # 56 x 56 px after the resize: 2 x 2 cells
    with torch.no_grad():
        expected = stock(**inputs).logits
        with handle.use(method="divprune", tokens=50):
            assert torch.equal(model(**inputs).logits, expected)


# -- references ---------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.no_grad()
def reference_signal(stock, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the stock merged features (N, E), the attention each cell receives at the last full-attention
    block (the full S x S map per head, from the block's weights, averaged over queries and heads, then over
    each cell's 4 patches) and the head-mean keys per cell, all float64."""
    visual = stock.model.visual
    config = visual.config
    block = visual.blocks[config.fullatt_block_indexes[-1]]
    seen = {}
    hook = block.attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], **k), with_kwargs=True)
    try:
        with torch.no_grad():
            merged = visual(inputs.pixel_values.double(), grid_thw=inputs.image_grid_thw).pooler_output
    finally:
        hook.remove()
    x, (cos, sin) = seen["x"].double(), seen["position_embeddings"]
    heads = config.num_heads
    qkv = x @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
    q, k, _ = qkv.view(x.shape[0], 3, heads, -1).unbind(1)  # (S, H, d)
    keys_mean = k.mean(dim=1)
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    window_index, _ = get_vision_window_index(
        inputs.image_grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    bounds = seen["cu_seqlens"].tolist()
    received = torch.zeros(x.shape[0], dtype=torch.float64)
    for start, end in zip(bounds, bounds[1:]):
        for h in range(heads):
            logits = q[start:end, h] @ k[start:end, h].T * q.shape[-1] ** -0.5
            received[start:end] += logits.softmax(dim=-1).sum(dim=0) / (heads * (end - start))
    cells = len(window_index)
    scores, keys = torch.zeros(cells, dtype=torch.float64), torch.zeros(cells, keys_mean.shape[1], dtype=torch.float64)
    for j in range(cells):  # window position j holds cell window_index[j]'s 4 patches
        scores[window_index[j]] = received[4 * j : 4 * j + 4].mean()
        keys[window_index[j]] = keys_mean[4 * j : 4 * j + 4].mean(dim=0)
    sizes = (inputs.image_grid_thw.prod(-1) // 4).tolist()
    return list(merged.split(sizes)), list(scores.split(sizes)), list(keys.split(sizes))


def visionzip_reference(features, scores, keys, dominant: int, contextual: int):
    """VisionZip from the spec, without a CLS: top-`dominant` cells; targets every step-th of the rest;
    each other cell to its most key-cosine-similar target (first on ties); target + mean(members)."""
    n = len(scores)
    values = scores.tolist()
    kept = sorted(sorted(range(n), key=lambda i: -values[i])[:dominant])
    rest = [i for i in range(n) if i not in kept]
    step = max(1, len(rest) // contextual)
    targets = [rest[j * step] for j in range(contextual)]
    unit = keys / keys.norm(dim=1, keepdim=True)
    groups = {t: [] for t in targets}
    for cell in rest:
        if cell in groups:
            continue
        similarity = [float(unit[cell] @ unit[t]) for t in targets]
        groups[targets[similarity.index(max(similarity))]].append(cell)
    tokens = {i: features[i] for i in kept}
    for t, members in groups.items():
        tokens[t] = features[t] + (sum(features[m] for m in members) / len(members) if members else 0)
    anchors = sorted(tokens)
    return anchors, torch.stack([tokens[a] for a in anchors]), kept


def pool_reference(features, rows: int, cols: int, budget: int):
    window = 1
    while math.ceil(rows / window) * math.ceil(cols / window) > budget:
        window += 1
    anchors, tokens = [], []
    for top in range(0, rows, window):
        for left in range(0, cols, window):
            cells = [
                r * cols + c for r in range(top, min(top + window, rows)) for c in range(left, min(left + window, cols))
            ]
            anchors.append(top * cols + left)
            tokens.append(sum(features[c] for c in cells) / len(cells))
    return anchors, torch.stack(tokens)


def expected_choice(method: str, features, scores, keys, grid, budget: dict):
    """(anchors, tokens, kept cells) of one image by the reference of `method`."""
    n = features.shape[0]
    if method == "visionzip":
        return visionzip_reference(features, scores, keys, budget["dominant"], budget["contextual"])
    if method == "pool":
        anchors, tokens = pool_reference(features, *grid, budget["tokens"])
        return anchors, tokens, []
    tokens = budget["tokens"]
    if method == "visionzip_dominant":
        values = scores.tolist()
        kept = sorted(sorted(range(n), key=lambda i: -values[i])[:tokens])
    elif method == "random":
        generator = torch.Generator().manual_seed(budget["seed"])
        kept = sorted(torch.randperm(n, generator=generator)[:tokens].tolist())
    elif method == "divprune":
        kept = divprune_reference(features, tokens)
    elif method == "vispruner":
        kept = vispruner_reference(scores, features, tokens)
    return kept, features[kept], kept


def reference_logits(stock, full_inputs, reduced_inputs, choices):
    """The stock language model on the full run's text embeddings and M-RoPE positions, with each image's
    block replaced by the reference tokens at the positions of their anchor cells (gathered, not renumbered)."""
    model = stock.model
    image_token = stock.config.image_token_id
    full_ids = full_inputs.input_ids[0]
    positions, _ = model.get_rope_index(
        full_inputs.input_ids, full_inputs.mm_token_type_ids, image_grid_thw=full_inputs.image_grid_thw
    )
    embeds = model.get_input_embeddings()(full_ids).double()
    columns, rows, start = [], [], 0
    blocks = iter(choices)
    index = 0
    while index < len(full_ids):
        if full_ids[index] != image_token:
            columns.append(index)
            rows.append(embeds[index])
            index += 1
            continue
        anchors, tokens = next(blocks)
        columns += [index + a for a in anchors]
        rows += list(tokens)
        index += int(full_inputs.image_grid_thw[start].prod()) // 4
        start += 1
    reduced_ids = torch.where(full_ids[columns] == image_token, image_token, full_ids[columns])
    assert torch.equal(reduced_ids, reduced_inputs.input_ids[0])  # the processor made the same sequence
    with torch.no_grad():
        return stock(inputs_embeds=torch.stack(rows)[None], position_ids=positions[:, :, columns]).logits


@pytest.mark.parametrize("method", [m for m in sorted(BUDGETS) if m != "fastv"])
def test_method_matches_its_float64_reference(applied, make_image, method):
    """Two images of different sizes in one prompt: choice, tokens, M-RoPE positions and logits."""
    handle, model, stock, processor = applied
    images = [make_image(200, 300, seed=4), make_image(250, 180, seed=5)]
    with handle.use(enabled=False):
        full = inputs_for(processor, images)
    features, scores, keys = reference_signal(stock, full)
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in full.image_grid_thw.tolist()]
    budget = BUDGETS[method]
    expected = [expected_choice(method, *parts, budget) for parts in zip(features, scores, keys, grids)]
    with use(handle, method, **budget) as call:
        reduced = inputs_for(processor, images)
        with torch.no_grad():
            logits = model(**reduced).logits
    for image, (anchors, _, kept), signal in zip(call.selection, expected, scores):
        assert_choice_matches(image, anchors, kept, signal, method)
    expected_logits = reference_logits(stock, full, reduced, [(a, t) for a, t, _ in expected])
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-9)


def test_generate_puts_the_kept_tokens_at_their_positions(applied, make_image):
    """generate() computes positions before the tower runs: its first step must equal a plain forward."""
    handle, model, _, processor = applied
    with handle.use(method="visionzip", dominant=20, contextual=5):
        inputs = inputs_for(processor, [make_image(200, 300, seed=6)])
        with torch.no_grad():
            last = model(**inputs).logits[0, -1]
            out = model.generate(
                **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    torch.testing.assert_close(out.logits[0][0], last.float())  # generate returns float32 logits


def test_cdpruner_is_refused_with_a_reason(applied):
    handle, _, _, _ = applied
    with pytest.raises(ValueError, match="CDPruner scores the question with CLIP's text tower"):
        with handle.use(method="cdpruner", tokens=30):
            pass


# -- FastV: the oracle of tests/test_methods_fastv.py on Qwen2.5-VL's M-RoPE -------------------------------
def test_fastv_matches_the_eager_oracle(applied, make_image):
    """Kept set = layer K-1's eager attention (head mean, last query) top T over the image span; logits = a
    stock full-length run whose layers K.. hide the dropped keys, at every token's stock M-RoPE position;
    and a continuation on FastV's cache."""
    from test_methods_fastv import masked_forward

    handle, model, _, processor = applied
    oracle, _ = load_tiny(QWEN, dtype=torch.float64)
    oracle.set_attn_implementation("eager")
    layer, tokens = 2, 30
    with handle.use(enabled=False):
        inputs = inputs_for(processor, [make_image(200, 300, seed=7)])
    with torch.no_grad():
        row = oracle(**inputs, output_attentions=True).attentions[layer - 1][0].mean(dim=0)[-1]
    span = (inputs.input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    dropped = sorted(set(span.tolist()) - set(span[row[span].topk(tokens).indices].tolist()))
    with handle.use(method="fastv", tokens=tokens, fastv_layer=layer) as call, torch.no_grad():
        assert int((inputs.input_ids == model.config.image_token_id).sum()) == handle.num_image_tokens((200, 300))
        out = model(**inputs)
        more = torch.tensor([[100, 101, 102]])  # ordinary text tokens (Qwen's special ones come first)
        continued = model(input_ids=more, cache=out.cache).logits
    [image] = call.selection
    assert sorted(span[image.tiles.choice.rows].tolist()) == sorted(set(span.tolist()) - set(dropped))
    assert call.layer_tokens == [len(span)] * layer + [tokens] * (len(handle.base.language_model.layers) - layer)
    expected = masked_forward(handle, layer, dropped, **inputs)
    torch.testing.assert_close(out.logits[0, -1], expected[0, -1], rtol=1e-9, atol=1e-9)
    full = {**inputs, "input_ids": torch.cat([inputs.input_ids, more], dim=1)}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([inputs.mm_token_type_ids, torch.zeros_like(more)], dim=1)
    torch.testing.assert_close(
        continued[0], masked_forward(handle, layer, dropped, **full)[0, -3:], rtol=1e-9, atol=1e-9
    )
