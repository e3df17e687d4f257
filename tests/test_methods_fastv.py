"""FastV checked against independent computations on the tiny models, in float64.

Selection: a stock model on eager attention returns every attention map (output_attentions=True);
layer K-1's map, averaged over heads, last row, image span, top T is the oracle's choice.
Logits: the spec's attention-mask variant, a stock full-length run in which, from layer K on, no
query sees the dropped image tokens' keys (positions unchanged), must give FastV's logits for the
prompt's last position, for the greedy tokens after it and for a continuation on its cache.
"""

import pytest
import torch
from method_refs import fastv_masked_logits

import visionzip
from visionzip.tiny import LM_LAYERS, load_tiny

PROMPT = "<image>\nWhat is in the top left corner? ASSISTANT:"


@pytest.fixture(scope="module")
def models64():
    """Per family: (FastV model on SDPA, stock oracle on eager attention, processor)."""
    pairs = {}
    for family in ("llava_next", "llava", "llava_onevision"):
        model, processor = load_tiny(family, dtype=torch.float64)
        oracle, _ = load_tiny(family, dtype=torch.float64)
        oracle.set_attn_implementation("eager")
        pairs[family] = (model, oracle, processor)
    return pairs


@pytest.fixture
def fastv(models64):
    handles = []

    def make(family):
        model, oracle, processor = models64[family]
        handles.append(visionzip.apply(model, processor))
        return handles[-1], model, oracle, processor

    yield make
    for handle in handles:
        handle.remove()


def stock_prompt(handle, processor, images, text=PROMPT, **options):
    """Model inputs with the stock placeholder count, which is FastV's."""
    with handle.use(enabled=False):
        return processor(images=images, text=text, return_tensors="pt", **options)


def oracle_kept(oracle, inputs, layer, tokens):
    """(image positions, dropped positions) from the eager attention maps of a stock prefill."""
    with torch.no_grad():
        out = oracle(**inputs, output_attentions=True)
    row = out.attentions[layer - 1][0].mean(dim=0)[-1]  # (S,) layer K-1, head mean, last query
    span = (inputs.input_ids[0] == oracle.config.image_token_id).nonzero().squeeze(1)
    top = set(span[row[span].topk(tokens).indices].tolist())
    return span, sorted(set(span.tolist()) - top)


def masked_forward(handle, layer, dropped, **inputs):
    """The spec's mask variant on the handle's model, run stock (method_refs.fastv_masked_logits)."""
    with handle.use(enabled=False):
        return fastv_masked_logits(handle.model, layer, dropped, **inputs)


@pytest.mark.parametrize(
    "family, size, layer, tokens",
    [
        ("llava", (480, 640), 2, 64),
        ("llava_next", (480, 640), 2, 160),
        ("llava_next", (336, 1008), 1, 300),
        ("llava_onevision", (500, 700), 2, 200),  # Qwen2 layers (grouped-query attention), SigLIP anyres
    ],
)
def test_selection_logits_and_cache_match_the_oracle(fastv, make_image, family, size, layer, tokens):
    handle, model, oracle, processor = fastv(family)
    inputs = stock_prompt(handle, processor, make_image(*size, seed=sum(size)))
    span, dropped = oracle_kept(oracle, inputs, layer, tokens)
    with handle.use(method="fastv", tokens=tokens, fastv_layer=layer) as call, torch.no_grad():
        assert int((inputs.input_ids == model.config.image_token_id).sum()) == handle.num_image_tokens(size)
        out = model(**inputs)
    length, images = inputs.input_ids.shape[1], len(span)

    # the kept set, per image span row, equals the eager oracle's top T
    [image] = call.selection
    rows = image.tiles.choice.rows
    assert sorted(span[rows].tolist()) == sorted(set(span.tolist()) - set(dropped))
    assert image.budget == f"FastV K={layer}, {tokens} kept/image of its {images}" and image.num_tokens == images
    # real per-layer counts and cache lengths: full below K, reduced from K on
    assert call.layer_tokens == [images] * layer + [tokens] * (LM_LAYERS - layer)
    cached = [out.cache.layers[i].keys.shape[-2] for i in range(LM_LAYERS)]
    assert cached == [length] * layer + [length - images + tokens] * (LM_LAYERS - layer)
    assert out.logits.shape[1] == length - images + tokens

    expected = masked_forward(handle, layer, dropped, **inputs)
    torch.testing.assert_close(out.logits[0, -1], expected[0, -1], rtol=1e-9, atol=1e-9)

    # a continuation on FastV's cache (three new tokens at once, as a later chat turn): the cache
    # lacks the dropped tokens from layer K on, the mask variant hides them there
    more = torch.tensor([[5, 6, 7]])
    with handle.use(method="fastv", tokens=tokens, fastv_layer=layer), torch.no_grad():
        continued = model(input_ids=more, cache=out.cache).logits
    full = {**inputs, "input_ids": torch.cat([inputs.input_ids, more], dim=1)}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    torch.testing.assert_close(
        continued[0], masked_forward(handle, layer, dropped, **full)[0, -3:], rtol=1e-9, atol=1e-9
    )


def test_patch_record_names_the_kept_features(fastv, make_image):
    """Per tile, the recorded patches are the stock tile features whose rows the language model kept."""
    handle, model, _, processor = fastv("llava_next")
    inputs = stock_prompt(handle, processor, make_image(672, 672, seed=4))
    with handle.use(method="fastv", tokens=200) as call, torch.no_grad():
        model(**inputs)
    [image] = call.selection
    kept_rows = image.tiles.choice.rows
    with handle.use(enabled=False), torch.no_grad():
        packed = model.model.get_image_features(inputs.pixel_values, inputs.image_sizes).pooler_output[0]
        tower = model.model.vision_tower(inputs.pixel_values[0], output_hidden_states=True)
        tiles = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])  # (5, 576, E)
    kept_features = packed[kept_rows]
    newline = model.model.image_newline
    recorded = [(t, p) for t, tile in enumerate(image.tiles) for p in tile.kept.tolist()]
    newlines = int(torch.isclose(kept_features, newline).all(dim=1).sum())
    assert len(recorded) + newlines == 200
    for t, p in recorded:
        assert (kept_features - tiles[t, p]).norm(dim=1).min() < 1e-9
    assert all(tile.cls_attention is None and len(tile.targets) == 0 for tile in image.tiles)


def test_generate_matches_the_mask_variant_greedily(fastv, make_image):
    handle, model, oracle, processor = fastv("llava")
    inputs = stock_prompt(handle, processor, make_image(400, 300, seed=9))
    span, dropped = oracle_kept(oracle, inputs, 2, 48)
    with handle.use(method="fastv", tokens=48), torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    ids = inputs.input_ids
    for step, logits in enumerate(out.logits):  # the reference re-runs the whole sequence, masked
        sequence = out.sequences[:, : ids.shape[1] + step]
        step_inputs = {**inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
        expected = masked_forward(handle, 2, dropped, **step_inputs)[0, -1]
        assert int(out.sequences[0, ids.shape[1] + step]) == int(expected.argmax())  # the same greedy token
        torch.testing.assert_close(logits[0], expected.float())  # generate hands logits out in float32
    length = ids.shape[1] + 3  # the last token generated is never fed back
    cached = [out.cache.layers[i].keys.shape[-2] for i in range(LM_LAYERS)]
    assert cached == [length] * 2 + [length - len(span) + 48] * (LM_LAYERS - 2)

    # on eager attention the masks are materialised: FastV cuts them to its rows and keys
    eager = visionzip.apply(oracle, processor)
    try:
        with eager.use(method="fastv", tokens=48), torch.no_grad():
            kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
            eager_out = oracle.generate(**inputs, **kwargs)
    finally:
        eager.remove()
    assert torch.equal(eager_out.sequences, out.sequences)
    for ours, theirs in zip(eager_out.logits, out.logits):
        torch.testing.assert_close(ours, theirs)


def test_stock_logits_are_unchanged_after_a_fastv_call(fastv, make_image):
    handle, model, _, processor = fastv("llava")
    inputs = stock_prompt(handle, processor, make_image(336, 336, seed=2))
    with torch.no_grad():
        with handle.use(enabled=False):
            before = model(**inputs).logits
        with handle.use(method="fastv", tokens=32):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        with handle.use(enabled=False):
            assert torch.equal(model(**inputs).logits, before)
        handle.remove()
        assert torch.equal(model(**inputs).logits, before)


def test_limits_are_refused_with_the_limits_named(fastv, make_image):
    handle, model, _, processor = fastv("llava")
    with pytest.raises(ValueError, match=r"need 1 <= K <= 3"):
        with handle.use(method="fastv", tokens=64, fastv_layer=4):
            pass
    with pytest.raises(ValueError, match=r"K >= 1"):
        with handle.use(method="fastv", tokens=64, fastv_layer=0):
            pass
    with pytest.raises(ValueError, match=r"tokens=0 is out of range"):
        with handle.use(method="fastv", tokens=0):
            pass
    with pytest.raises(ValueError, match=r"needs a budget"):
        with handle.use(method="fastv"):
            pass
    with handle.use(method="fastv", tokens=577):
        with pytest.raises(ValueError, match=r"tokens=577 is out of range; this image has 576 tokens"):
            processor(images=make_image(336, 336), text=PROMPT, return_tensors="pt")
    images = [make_image(336, 336, seed=1), make_image(336, 336, seed=2)]
    batch = stock_prompt(handle, processor, images, text=[PROMPT, "<image>\nhi"], padding=True)
    with handle.use(method="fastv", tokens=64), torch.no_grad():
        with pytest.raises(ValueError, match="batch 1"):
            model(**batch)
        one = processor(images=images[:1], text=PROMPT, return_tensors="pt")
        padded = {**one, "attention_mask": one.attention_mask.clone()}
        padded["attention_mask"][0, 0] = 0
        with pytest.raises(ValueError, match="no padding"):
            model(**padded)
    assert visionzip.Settings(True, handle.budget, method="fastv", tokens=64).describe() == "FastV K=2, 64 kept/image"
