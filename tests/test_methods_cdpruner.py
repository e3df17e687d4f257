"""CDPruner checked against independent computations.

Selection: a naive greedy log-det DPP (each step: argmax_j L_jj - L_jS L_SS^-1 L_Sj, in float64 with a
linear solve) must pick what the fast incremental version picks, on synthetic kernels and end to end.
End to end the reference recomputes everything from the stock tower's feature layer, the stock
projector and the tiny CLIP loaded here, in float64, then packs LLaVA-NeXT's tiles with loops.
"""

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import visionzip
from visionzip.clip_text import load_clip_text
from visionzip.methods.cdpruner import dpp_kernel, dpp_select, fast_greedy_map, relevance, screened_greedy_map
from visionzip.similarity import bfloat16_matmul_pays
from visionzip.tiny import TINY_CLIP_LABEL, load_tiny, tiny_clip_checkpoint

SIDE = 24
QUESTION = "What colour is the car on the left?"


def naive_greedy_log_det(kernel, steps):
    """Greedy MAP of a DPP by its definition: each step the item that most raises log det L_SS."""
    chosen = []
    for _ in range(steps):
        gains = torch.diagonal(kernel).clone()
        if chosen:
            block = kernel[chosen][:, chosen]
            cross = kernel[chosen]  # (|S|, N)
            gains -= (cross * torch.linalg.solve(block, cross)).sum(dim=0)
        gains[chosen] = -torch.inf
        chosen.append(int(gains.argmax()))  # first index on ties
    return chosen


def synthetic_kernels(tiles, size, width, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(tiles, size, width, generator=generator, dtype=torch.float64)
    weights = torch.rand(tiles, size, generator=generator, dtype=torch.float64) + 0.05
    return dpp_kernel(features, weights)


@pytest.mark.parametrize("tiles, size, width, steps, seed", [(1, 8, 16, 4, 0), (3, 60, 64, 20, 1), (2, 576, 96, 64, 2)])
def test_fast_greedy_map_picks_what_the_naive_log_det_picks(tiles, size, width, steps, seed):
    kernels = synthetic_kernels(tiles, size, width, seed)
    picks = fast_greedy_map(kernels, steps)
    assert picks.shape == (tiles, steps)
    for tile in range(tiles):
        assert picks[tile].tolist() == naive_greedy_log_det(kernels[tile], steps)


def test_ties_go_to_the_first_index_and_every_pick_is_new():
    assert fast_greedy_map(torch.eye(6, dtype=torch.float64)[None], 6).tolist() == [[0, 1, 2, 3, 4, 5]]
    low_rank = synthetic_kernels(1, 40, 3, 5)  # rank 3: the fourth pick on is past the numerical rank
    picks = fast_greedy_map(low_rank, 40)[0].tolist()
    assert sorted(picks) == list(range(40)) and picks[:3] == naive_greedy_log_det(low_rank[0], 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_bfloat16_screen_changes_no_pick(dtype):
    """The screened way (a bfloat16 kernel only guesses which float32 rows to compute) picks what the
    naive log-det picks on the float64 kernel, in the same order, whether its guesses are short or long."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 150, 96, generator=generator, dtype=torch.float64)
    weights = torch.rand(3, 150, generator=generator, dtype=torch.float64) + 0.05
    kernels = dpp_kernel(features.to(dtype).double(), weights)  # the spec's kernel of what the model holds
    for steps in (1, 2, 37, 90):  # within the kernel's rank (96)
        expected = [naive_greedy_log_det(kernel, steps) for kernel in kernels]
        for lookahead in (1, 32, 90):
            picks = screened_greedy_map(features.to(dtype), weights, steps, lookahead)
            assert picks.tolist() == expected, (steps, lookahead)
        assert torch.equal(dpp_select(features.to(dtype), weights, steps, screen=False), picks)


def test_a_tile_of_576_patches_on_this_cpu_takes_the_screened_way(monkeypatch):
    """What a LLaVA tile gets at the paper's budgets (64 or 128 of 576) on a CPU with bfloat16 matrix units."""
    if not bfloat16_matmul_pays(torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 matrix units (AMX or AVX512-BF16): the dense way runs")
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 576, 160, generator=generator).bfloat16()  # rank 160: past every budget here
    weights = torch.rand(2, 576, generator=generator) + 0.05
    import visionzip.methods.cdpruner as cdpruner

    ran = []
    monkeypatch.setattr(cdpruner, "screened_greedy_map", lambda *a: ran.append(a[2]) or screened_greedy_map(*a))
    for steps in (64, 144, 145):  # up to a quarter of the tile
        picks = dpp_select(features, weights, steps)
        assert torch.equal(picks, fast_greedy_map(dpp_kernel(features, weights), steps))
    assert ran == [64, 144]


def test_relevance_is_minus_cosine_normalised_over_all_tiles_together():
    image = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[-1.0, 0.0], [0.8, 0.6], [0.0, -1.0]]])
    text = torch.tensor([[2.0, 0.0]])  # cosines: tile 0 = 1, 0.6, 0; tile 1 = -1, 0.8, 0
    minus_cos = torch.tensor([[-1.0, -0.6, 0.0], [1.0, -0.8, 0.0]])
    expected = (minus_cos + 1 + 1e-6) / 2  # min -1 and max 1 over both tiles
    torch.testing.assert_close(relevance(image, text), expected)
    # the patch most like the text is the least relevant (the official sign), and tile 0 alone
    # would span a different range than the global one
    assert relevance(image, text)[0].argmin() == 0 and relevance(image, text).argmax() == 3
    per_tile = (minus_cos[0] - minus_cos[0].min() + 1e-6) / (minus_cos[0].max() - minus_cos[0].min())
    assert not torch.allclose(relevance(image, text)[0], per_tile)
    segments = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # two 77-token segments: the mean of the two
    torch.testing.assert_close(relevance(image, segments), _min_max(-(image @ torch.eye(2)).mean(dim=-1)))
    theta = relevance(image, text, theta=0.5)
    torch.testing.assert_close(theta, torch.exp(0.5 * expected))


def _min_max(scores):
    return (scores - scores.min() + 1e-6) / (scores.max() - scores.min())


# -- end to end on the tiny models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def models64():
    pairs = {}
    for family in ("llava_next", "llava"):
        model, processor = load_tiny(family, dtype=torch.float64)
        oracle, _ = load_tiny(family, dtype=torch.float64)
        pairs[family] = (model, oracle, processor)
    return pairs


@pytest.fixture(scope="module")
def tiny_clip():
    path = tiny_clip_checkpoint()
    return (
        AutoTokenizer.from_pretrained(path),
        CLIPTextModelWithProjection.from_pretrained(path).eval(),
        CLIPVisionModelWithProjection.from_pretrained(path).visual_projection,
    )


def reference_picks(oracle, tiny_clip, pixels, question, tokens, sign=-1.0, per_tile=False):
    """Per tile, the kept patches (sorted) and their projected features, from the spec."""
    tokenizer, text_model, visual_projection = tiny_clip
    with torch.no_grad():
        states = oracle.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = oracle.model.multi_modal_projector(states)  # (T, 576, E)
        normed = oracle.model.vision_tower.post_layernorm(states)
        image = normed @ visual_projection.weight.double().T
        ids = tokenizer([question], return_tensors="pt")
        padded = {k: torch.nn.functional.pad(v, (0, 77 - v.shape[1])) for k, v in ids.items()}
        text = text_model(**padded).text_embeds.double()
    cosine = torch.nn.functional.cosine_similarity(image, text[0], dim=-1)  # (T, 576)
    scores = sign * cosine
    if per_tile:
        scores = torch.stack([_min_max(tile) for tile in scores])
    else:
        scores = _min_max(scores)
    unit = features / features.norm(dim=-1, keepdim=True)
    picks = []
    for tile in range(states.shape[0]):
        kernel = scores[tile][:, None] * (unit[tile] @ unit[tile].T) * scores[tile][None, :]
        picks.append(sorted(naive_greedy_log_det(kernel, tokens)))
    return picks, features


def reference_next_packing(picks, features, rows, cols):
    """Base tile's kept tokens, then the crops' kept tokens in raster order over the stitched grid."""
    packed = [features[0, p] for p in picks[0]]
    stitched = []
    for crop, kept in enumerate(picks[1:]):
        r, c = divmod(crop, cols)
        for p in kept:
            i, j = divmod(p, SIDE)
            stitched.append(((r * SIDE + i) * cols * SIDE + c * SIDE + j, features[1 + crop, p]))
    packed += [token for _, token in sorted(stitched, key=lambda pair: pair[0])]
    return torch.stack(packed)


@pytest.mark.parametrize("size, tokens", [((480, 640), 32), ((336, 1008), 64)])
def test_llava_next_picks_and_features_match_the_reference(models64, tiny_clip, make_image, size, tokens):
    model, oracle, processor = models64["llava_next"]
    handle = visionzip.apply(model, processor)
    try:
        with handle.use(method="cdpruner", tokens=tokens, text=QUESTION) as call:
            inputs = processor(images=make_image(*size, seed=size[1]), text=f"<image>\n{QUESTION}", return_tensors="pt")
            with torch.no_grad():
                ours = model.model.get_image_features(inputs.pixel_values, inputs.image_sizes).pooler_output[0]
            predicted = handle.num_image_tokens(size)
        rows, cols = get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, 336)
        pixels = inputs.pixel_values[0, : 1 + rows * cols]
        picks, features = reference_picks(oracle, tiny_clip, pixels, QUESTION, tokens)
        [image] = call.selection
        assert [tile.kept.tolist() for tile in image.tiles] == picks
        assert all(tile.cls_attention is None for tile in image.tiles)
        expected = reference_next_packing(picks, features, rows, cols)
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
        placeholders = int((inputs.input_ids == model.config.image_token_id).sum())
        assert placeholders == ours.shape[0] == predicted == image.num_tokens == (1 + rows * cols) * tokens
        assert call.text_tower == TINY_CLIP_LABEL and image.budget == f"CDPruner {tokens}/tile"
        # the check can tell: a plus sign or a per-tile normalisation would choose otherwise
        assert reference_picks(oracle, tiny_clip, pixels, QUESTION, tokens, sign=1.0)[0] != picks
        assert reference_picks(oracle, tiny_clip, pixels, QUESTION, tokens, per_tile=True)[0] != picks
    finally:
        handle.remove()


def test_video_frames_are_scored_over_the_whole_clip_in_any_batches(models64, tiny_clip, make_image, monkeypatch):
    """A video's frames reach the tower 16 at a time; relevance is normalised over every frame of the call, as
    the official code normalises one batch of tiles, so no frame's choice depends on how frames are batched;
    the question goes through the text tower once per call, and each frame through the image projection once."""
    from visionzip.clip_text import ClipText
    from visionzip.video import frame_features, frame_pixel_values

    model, oracle, processor = models64["llava_next"]
    pixels = frame_pixel_values(processor, [make_image(336, 336, seed=seed) for seed in range(20)])
    embed_text, texts = ClipText.embed_text, []
    monkeypatch.setattr(ClipText, "embed_text", lambda clip, *args: texts.append(args) or embed_text(clip, *args))
    embed_patches, embedded = ClipText.embed_patches, []  # frames through the CLIP image projection
    monkeypatch.setattr(
        ClipText, "embed_patches", lambda clip, states: embedded.append(len(states)) or embed_patches(clip, states)
    )
    handle = visionzip.apply(model, processor)
    try:
        kept = {}
        for batch_size in (16, 20, 7):
            with handle.use(method="cdpruner", tokens=24, text=QUESTION) as call, torch.no_grad():
                assert frame_features(handle, pixels, batch_size=batch_size).shape[:2] == (20, 24)
            kept[batch_size] = [image.tiles[0].kept.tolist() for image in call.selection]
            assert sum(embedded) == 20, batch_size  # each frame once: for the clip's range and to choose
            embedded.clear()
        assert len(texts) == 3  # once per call, not per batch
    finally:
        handle.remove()
    picks, _ = reference_picks(oracle, tiny_clip, pixels, QUESTION, 24)
    assert kept[16] == kept[20] == kept[7] == picks
    # each batch of 16 normalised on its own would have chosen otherwise: the check can tell
    alone = [reference_picks(oracle, tiny_clip, part, QUESTION, 24)[0] for part in (pixels[:16], pixels[16:])]
    assert alone[0] + alone[1] != picks


def test_llava_15_picks_follow_the_question_and_generate_runs(models64, tiny_clip, make_image):
    model, oracle, processor = models64["llava"]
    handle = visionzip.apply(model, processor)
    image = make_image(400, 500, seed=3)
    try:
        chosen = {}
        for question in (QUESTION, "How many dogs are sitting on the grass?"):
            with handle.use(method="cdpruner", tokens=48, text=question) as call:
                inputs = processor(images=image, text=f"<image>\n{question} ASSISTANT:", return_tensors="pt")
                assert int((inputs.input_ids == model.config.image_token_id).sum()) == 48
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert out.shape[1] == inputs.input_ids.shape[1] + 3
            chosen[question] = call.selection[0].tiles[0].kept.tolist()
            picks, _ = reference_picks(oracle, tiny_clip, inputs.pixel_values, question, 48)
            assert chosen[question] == picks[0]
        assert chosen[QUESTION] != chosen["How many dogs are sitting on the grass?"]
    finally:
        handle.remove()


def test_the_question_and_budget_are_required(tiny_llava):
    model, processor = tiny_llava
    handle = visionzip.apply(model, processor)
    try:
        pixels = processor.image_processor(images=[Image.new("RGB", (336, 336))], return_tensors="pt")["pixel_values"]
        with handle.use(method="cdpruner", tokens=64):  # counting needs no question; choosing does
            assert handle.num_image_tokens((336, 336)) == 64
            with pytest.raises(ValueError, match=r"text='\.\.\.'"):
                model.model.get_image_features(pixel_values=pixels)
        with pytest.raises(ValueError, match="tokens=577 is out of range; a tile has 576 patches"):
            with handle.use(method="cdpruner", tokens=577, text=QUESTION):
                pass
        with handle.use(method="cdpruner", tokens=64, text=QUESTION):
            assert handle.settings.describe() == "CDPruner 64/tile"
    finally:
        handle.remove()


def test_loader_reads_a_local_folder_and_splits_long_questions():
    clip = load_clip_text(tiny_clip_checkpoint(), label="tiny")
    assert clip.label == "tiny" and clip.visual_projection.in_features == 64
    assert clip.embed_text(QUESTION, torch.device("cpu")).shape == (1, 64)
    long_question = " ".join(["what is the colour of the big red car"] * 12)  # past 77 tokens
    assert clip.embed_text(long_question, torch.device("cpu")).shape[0] >= 2
    with pytest.raises(ValueError, match="VISIONZIP_CLIP"):
        load_clip_text("/nonexistent/clip-folder")


def test_a_short_question_runs_unpadded_and_embeds_as_the_authors_padded_run():
    """embed_text runs a short question at its own length; the authors pad it to 77 masked positions.
    The real tokens attend causally and the embedding is read at EOS, so both agree to float rounding."""
    clip = load_clip_text(tiny_clip_checkpoint())
    for question in (QUESTION, "dogs?"):
        ids = clip.tokenizer([question], return_tensors="pt")
        padded = {key: torch.nn.functional.pad(value, (0, 77 - value.shape[1])) for key, value in ids.items()}
        with torch.no_grad():
            authors = clip.text_model(**padded).text_embeds  # (1, P)
        torch.testing.assert_close(clip.embed_text(question, torch.device("cpu")), authors, rtol=1e-5, atol=1e-6)
