"""Qwen2.5-VL video under reduction (`visionzip/patch/qwen2_5_vl.py`) on the tiny offline checkpoint: the tower
pairs frames into temporal slices and every method chooses per slice on the merger's cells, budget per slice.
Checked here: off equals stock bit for bit; counts predicted = placeholders = features for several clip lengths
(odd ones included) and sizes; every method that runs against a float64 reference written from the spec in plain
loops per slice; the kept tokens' (t, h, w) M-RoPE positions equal the rows gathered from a full run's; a cached
later turn equals a re-prefill; FastV refuses video; the frame-pair video processor pairs the frames as
Qwen2-VL's video processor does."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_qwen import (
    BUDGETS,
    QWEN,
    assert_choice_matches,
    assert_off_equals_stock,
    expected_choice,
    patched_tiny,
    reference_signal,
    use,
)
from transformers import DynamicCache

from visionzip.tiny import load_tiny

QUESTION = "What happens in the clip?"
CLIPS = [(1, 100, 150), (3, 200, 300), (4, 64, 900), (5, 333, 517), (8, 120, 90)]  # (frames, height, width)
VIDEO_METHODS = [method for method in sorted(BUDGETS) if method != "fastv"]  # FastV refuses video
applied_fixture = pytest.fixture(name="applied")(patched_tiny)


def clip_frames(make_image, frames: int, height: int, width: int, seed: int = 0) -> list:
    return [make_image(height, width, seed=seed * 100 + k) for k in range(frames)]


def video_prompt(processor, question: str = QUESTION) -> str:
    content = [{"type": "video"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def video_inputs(processor, frames: list, text: str | None = None):
    """The processor's inputs for one clip sampled every 10th frame of a 10 fps video (2 s per slice, so the
    temporal positions advance by tokens_per_second x 2 per slice)."""
    metadata = {
        "total_num_frames": 10 * len(frames),
        "fps": 10.0,
        "frames_indices": list(range(0, 10 * len(frames), 10)),
    }
    return processor(
        text=text or video_prompt(processor), videos=[frames], video_metadata=metadata, return_tensors="pt"
    )


# -- off == stock ---------------------------------------------------------------------------------
def test_off_equals_stock_bit_for_bit(make_image):
    frames = clip_frames(make_image, 5, 200, 300, seed=1)
    assert_off_equals_stock(lambda processor: video_inputs(processor, frames))


# -- counts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_counts_predicted_equal_placeholders_equal_features(applied, make_image, method):
    handle, model, _, processor = applied
    for index, (frames, height, width) in enumerate(CLIPS):
        with use(handle, method, **BUDGETS[method]) as call:
            predicted = handle.family.num_video_tokens(handle, (frames, height, width), handle.settings)
            counted = processor._get_num_multimodal_tokens(video_sizes=[(frames, height, width)]).num_video_tokens[0]
            inputs = video_inputs(processor, clip_frames(make_image, frames, height, width, seed=index))
            placeholders = int((inputs.input_ids == model.config.video_token_id).sum())
            output = model.model.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw)
        produced = output.pooler_output[0].shape[0]
        slices, rows, cols = inputs.video_grid_thw[0].tolist()
        rows, cols = rows // 2, cols // 2
        assert slices == math.ceil(frames / 2), (frames, slices)  # an odd last frame is repeated into a pair
        assert predicted == counted == placeholders == produced == sum(call.visual_tokens), (method, frames)
        assert len(call.selection) == slices and all(image.grid == (rows, cols) for image in call.selection)
        if method == "pool":
            window = next(s for s in range(1, rows * cols + 1) if math.ceil(rows / s) * math.ceil(cols / s) <= 30)
            per_slice = math.ceil(rows / window) * math.ceil(cols / window)
        else:
            per_slice = min(30 if method != "visionzip" else 25, rows * cols)
        assert call.visual_tokens == [per_slice] * slices, (method, frames, height, width)


# -- references ---------------------------------------------------------------------------------------
def slice_references(method: str, stock, inputs, budget: dict):
    """Per temporal slice, the reference (anchors, tokens, kept cells) and its signal, all float64; Random's
    slice k keeps the first cells of the k-th permutation of one generator seeded once per clip."""
    full = SimpleNamespace(pixel_values=inputs.pixel_values_videos, image_grid_thw=inputs.video_grid_thw)
    [features], [scores], [keys] = reference_signal(stock, full)
    slices, rows, cols = (int(n) for n in inputs.video_grid_thw[0])
    rows, cols = rows // 2, cols // 2
    cells = rows * cols
    generator = torch.Generator().manual_seed(budget.get("seed", 0))
    references = []
    for t in range(slices):
        part = slice(t * cells, (t + 1) * cells)
        if method == "random":
            kept = sorted(torch.randperm(cells, generator=generator)[: budget["tokens"]].tolist())
            choice = (kept, features[part][kept], kept)
        else:
            choice = expected_choice(method, features[part], scores[part], keys[part], (rows, cols), budget)
        references.append((choice, scores[part]))
    return references, cells


def gathered_inputs(stock, full, references, cells: int):
    """The stock model's text embeddings and M-RoPE positions of a full (unreduced) run, with the clip's block
    replaced by the reference tokens at the columns of their anchor cells: (1, L', E) embeddings and
    (3, 1, L') positions gathered, not renumbered, and the gathered token ids."""
    video_token = stock.config.video_token_id
    ids = full.input_ids[0]
    positions, _ = stock.model.get_rope_index(
        full.input_ids,
        full.mm_token_type_ids,
        video_grid_thw=full.video_grid_thw,
        second_per_grid_ts=full.second_per_grid_ts,
    )
    embeds = stock.model.get_input_embeddings()(ids).double()
    start = int((ids == video_token).nonzero()[0])
    columns, rows = list(range(start)), list(embeds[:start])
    for t, ((anchors, tokens, _), _) in enumerate(references):
        columns += [start + t * cells + a for a in anchors]
        rows += list(tokens)
    end = start + len(references) * cells
    columns += list(range(end, len(ids)))
    rows += list(embeds[end:])
    return torch.stack(rows)[None], positions[:, :, columns], ids[columns]


def language_model_positions(model) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    """What the language model is called with (its position_ids), captured by a pre-hook."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"]), with_kwargs=True
    )
    return seen, hook


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_method_matches_its_float64_reference_per_slice(applied, make_image, method):
    """A clip of 5 frames (3 slices, the last frame repeated): per slice the choice and the signal; the kept
    tokens' positions = the full run's rows at their anchor cells; logits = the stock LM on the gathered rows."""
    handle, model, stock, processor = applied
    frames = clip_frames(make_image, 5, 200, 300, seed=4)
    with handle.use(enabled=False):
        full = video_inputs(processor, frames)
    budget = BUDGETS[method]
    references, cells = slice_references(method, stock, full, budget)
    seen, hook = language_model_positions(model)
    try:
        with use(handle, method, **budget) as call:
            reduced = video_inputs(processor, frames)
            with torch.no_grad():
                logits = model(**reduced).logits
    finally:
        hook.remove()
    assert len(call.selection) == len(references) == 3
    for image, ((anchors, _, kept), signal) in zip(call.selection, references):
        assert_choice_matches(image, anchors, kept, signal, method)
    embeds, positions, ids = gathered_inputs(stock, full, references, cells)
    assert torch.equal(ids, reduced.input_ids[0])  # the processor made the same sequence
    assert torch.equal(seen["positions"], positions)  # kept tokens at their own cells' (t, h, w), text as stock
    with torch.no_grad():
        expected = stock(inputs_embeds=embeds, position_ids=positions).logits
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_an_image_and_a_clip_in_one_prompt_keep_their_own_positions(applied, make_image):
    """An image, then a clip: the image's tokens and the clip's slices each chosen on their own cells, both at
    their stock positions (the clip's after the image's), and the selections recorded in prompt order."""
    handle, model, _, processor = applied
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image, frames = make_image(150, 200, seed=8), clip_frames(make_image, 3, 120, 160, seed=9)

    def inputs_for():
        metadata = {"total_num_frames": 30, "fps": 10.0, "frames_indices": [0, 10, 20]}
        return processor(text=text, images=[image], videos=[frames], video_metadata=metadata, return_tensors="pt")

    with handle.use(enabled=False):
        full = inputs_for()
    positions, _ = model.model.get_rope_index(
        full.input_ids, full.mm_token_type_ids, full.image_grid_thw, full.video_grid_thw, full.second_per_grid_ts
    )
    seen, hook = language_model_positions(model)
    try:
        with handle.use(method="visionzip_dominant", tokens=7) as call, torch.no_grad():
            model(**inputs_for())
    finally:
        hook.remove()
    assert call.visual_tokens == [7, 7, 7]  # the image, then the clip's two slices
    ids = full.input_ids[0]
    columns, cursor = [], 0
    for kind, grid in ((model.config.image_token_id, full.image_grid_thw[0]), (None, full.video_grid_thw[0])):
        token = kind if kind is not None else model.config.video_token_id
        start = int((ids == token).nonzero()[0])
        columns += list(range(cursor, start))
        t, h, w = grid.tolist()
        cells = h * w // 4
        slices = call.selection[:1] if kind is not None else call.selection[1:]
        for k, selection in enumerate(slices):
            columns += [start + k * cells + a for a in selection.tiles[0].kept.tolist()]
        cursor = start + t * cells
    columns += list(range(cursor, len(ids)))
    assert torch.equal(seen["positions"], positions[:, :, columns])


# -- the cache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["visionzip", "pool", "random"])
def test_a_cached_later_turn_equals_a_re_prefill(applied, make_image, method):
    """A first turn over the clip on a cache, then more text on that cache: the same logits as one prefill of
    the whole text under the same reduction (positions continue at the prefill's M-RoPE delta)."""
    handle, model, _, processor = applied
    frames = clip_frames(make_image, 3, 200, 300, seed=11)
    first = video_prompt(processor)
    later = "<|im_start|>assistant\nA ball.<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
    with use(handle, method, **BUDGETS[method]), torch.no_grad():
        prefill = video_inputs(processor, frames, first)
        cache = DynamicCache(config=model.config)
        model(**prefill, cache=cache, use_cache=True)
        more = processor.tokenizer(later, return_tensors="pt").input_ids
        continued = model(input_ids=more, cache=cache, use_cache=True).logits
        whole = model(**video_inputs(processor, frames, first + later)).logits
    torch.testing.assert_close(continued[0], whole[0, -more.shape[1] :], rtol=1e-9, atol=1e-9)


# -- refusals ---------------------------------------------------------------------------------------
def test_fastv_refuses_video_with_a_reason(applied, make_image):
    handle, model, _, processor = applied
    frames = clip_frames(make_image, 2, 100, 150)
    with handle.use(enabled=False):
        inputs = video_inputs(processor, frames)
    with handle.use(method="fastv", tokens=30):
        with pytest.raises(ValueError, match="FastV chooses among the image placeholders"):
            video_inputs(processor, frames)  # before any pixel: the placeholder count
        with pytest.raises(ValueError, match="on Qwen2.5-VL it runs on images, not video"), torch.no_grad():
            model(**inputs)


# -- the frame-pair video processor -------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 4, 5])
def test_frame_pairs_fill_the_temporal_slots_as_the_video_processor_does(make_image, frames):
    """Row (t, n) of the clip holds frame 2t's pixels in temporal slot 0 and frame 2t+1's in slot 1 (an odd
    last frame in both), each as the image processor lays that frame's patch n out."""
    _, processor = load_tiny(QWEN)
    clip = clip_frames(make_image, frames, 100, 150, seed=frames)
    video = processor.video_processor(clip)
    stills = [processor.image_processor([frame], return_tensors="pt") for frame in clip]
    grid = stills[0]["image_grid_thw"][0].tolist()
    assert video["video_grid_thw"].tolist() == [[math.ceil(frames / 2), grid[1], grid[2]]]
    cells = grid[1] * grid[2]
    rows = video["pixel_values_videos"].view(-1, 3, 2, 14 * 14)
    for t in range(math.ceil(frames / 2)):
        for n in range(cells):
            for slot in range(2):
                frame = min(2 * t + slot, frames - 1)
                expected = stills[frame]["pixel_values"][n].view(3, 2, 14 * 14)[:, 0]
                assert torch.equal(rows[t * cells + n, :, slot], expected), (t, n, slot)


def test_features_encoded_without_the_reduction_are_refused_under_it(applied, make_image):
    """Stock video features handed to a reducing forward would sit at the wrong positions: refused, not placed."""
    handle, model, _, processor = applied
    with handle.use(enabled=False):
        inputs = video_inputs(processor, clip_frames(make_image, 2, 100, 150))
        features = model.model.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw)
    text = {key: value for key, value in inputs.items() if key != "pixel_values_videos"}
    with handle.use(method="pool", tokens=30), torch.no_grad():
        with pytest.raises(ValueError, match="not encoded under the reduction"):
            model(**text, mm_encoder_outputs={"video": features})
