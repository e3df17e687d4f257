"""Video in the library: frames as single tiles, token counts, features, prompt and generation."""

import pytest
import torch

import visionzip
from visionzip.video import (
    frame_features,
    frame_pixel_values,
    tokens_per_frame,
    video_input_ids,
    video_inputs,
    video_prompt,
)

PATCHES_PER_FRAME = 24 * 24  # CLIP-L/14-336: stock LLaVA feeds a tile's patches, CLS dropped


@pytest.fixture(params=["llava_next", "llava"])
def video_model(request):
    """(model, processor, handle) with VisionZip 54+10 applied, removed after the test."""
    model, processor = request.getfixturevalue("tiny_next" if request.param == "llava_next" else "tiny_llava")
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        yield model, processor, handle
    finally:
        handle.remove()


def clip_frames(make_image, count):
    return [make_image(360, 640, seed) for seed in range(count)]


def question(text="What happens in the video?"):
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def test_frame_pixel_values_are_the_processors_single_tile(video_model, make_image):
    _, processor, _ = video_model
    frames = clip_frames(make_image, 3)
    pixel_values = frame_pixel_values(processor, frames)
    assert pixel_values.shape == (3, 3, 336, 336)
    stock = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    base_tiles = stock[:, 0] if stock.dim() == 5 else stock  # LLaVA-NeXT: tile 0 is the whole frame
    torch.testing.assert_close(pixel_values, base_tiles)


@pytest.mark.parametrize("num_frames", [1, 3])
@pytest.mark.parametrize("budget", [(54, 10), (27, 5)])
@pytest.mark.parametrize("enabled", [False, True])
def test_token_counts_match_the_features_produced(video_model, make_image, num_frames, budget, enabled):
    model, processor, handle = video_model
    pixel_values = frame_pixel_values(processor, clip_frames(make_image, num_frames))
    timestamps = [0.5 * k for k in range(num_frames)]
    with torch.inference_mode(), handle.use(enabled=enabled, dominant=budget[0], contextual=budget[1]) as call:
        per_frame = tokens_per_frame(handle)
        features = frame_features(handle, pixel_values)
        input_ids = video_input_ids(processor, video_prompt(processor, question(), timestamps), per_frame)

    assert per_frame == (sum(budget) if enabled else PATCHES_PER_FRAME)
    assert features.shape == (num_frames, per_frame, model.config.text_config.hidden_size)
    assert int((input_ids == model.config.image_token_id).sum()) == num_frames * per_frame
    if enabled:
        assert len(call.selection) == num_frames
        for frame in call.selection:
            assert frame.grid == (0, 0) and frame.num_tokens == per_frame
            [tile] = frame.tiles
            assert len(tile.kept) == budget[0] - 1 and len(tile.targets) == budget[1]
            assert (tile.groups() == -1).sum() == budget[0] - 1
    else:
        assert call.selection is None


def test_frames_without_visionzip_are_stock_tower_and_projector(video_model, make_image):
    model, processor, handle = video_model
    base = model.model
    pixel_values = frame_pixel_values(processor, clip_frames(make_image, 2))
    with torch.inference_mode():
        with handle.use(enabled=False):
            features = frame_features(handle, pixel_values)
        hidden = base.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        expected = base.multi_modal_projector(hidden[base.config.vision_feature_layer][:, 1:])
    torch.testing.assert_close(features, expected)


def test_frames_with_visionzip_equal_the_image_path_on_the_same_tile(video_model, make_image):
    """A frame is reduced exactly as VisionZip reduces LLaVA-1.5's image, or LLaVA-NeXT's base tile
    (whose D+C tokens come first in the packed image)."""
    model, processor, handle = video_model
    frames = clip_frames(make_image, 2)
    per_tile = 54 + 10
    with torch.inference_mode():
        features = frame_features(handle, frame_pixel_values(processor, frames))
        images = processor.image_processor(frames, return_tensors="pt")
        packed = model.model.get_image_features(**images).pooler_output
    for frame, image in zip(features, packed):
        torch.testing.assert_close(frame, image[:per_tile])


def test_prompt_marks_frames_in_time_order(video_model):
    _, processor, _ = video_model
    text = video_prompt(processor, question("Where does the ball go?"), [0.0, 1.5, 3.0])
    image = processor.image_token
    labels = [f"Frame 1 (0.0 s): {image}", f"Frame 2 (1.5 s): {image}", f"Frame 3 (3.0 s): {image}"]
    positions = [text.index(label) for label in labels]
    assert positions == sorted(positions)
    assert text.count(image) == 3
    assert text.index("Where does the ball go?") > positions[-1]
    assert text.rstrip().endswith("ASSISTANT:")


def test_prompt_refuses_messages_without_exactly_one_video(video_model):
    _, processor, _ = video_model
    text_only = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="exactly one"):
        video_prompt(processor, text_only, [0.0])
    with pytest.raises(ValueError, match="at least one frame"):
        video_prompt(processor, question(), [])


def test_inputs_embeds_hold_the_frame_features_at_the_placeholders(video_model, make_image):
    model, processor, handle = video_model
    with torch.inference_mode():
        features = frame_features(handle, frame_pixel_values(processor, clip_frames(make_image, 2)))
        text = video_prompt(processor, question(), [0.0, 1.0])
        input_ids = video_input_ids(processor, text, tokens_per_frame(handle))
        inputs = video_inputs(model, input_ids, features)
        text_embeds = model.get_input_embeddings()(input_ids)
        logits = model(**inputs).logits

    placeholders = input_ids[0] == model.config.image_token_id
    embeds = inputs["inputs_embeds"][0]
    torch.testing.assert_close(embeds[placeholders], features.reshape(-1, features.shape[-1]))
    torch.testing.assert_close(embeds[~placeholders], text_embeds[0][~placeholders])
    assert logits.shape == (1, input_ids.shape[1], model.config.text_config.vocab_size)


def test_inputs_refuse_features_built_under_other_settings(video_model, make_image):
    model, processor, handle = video_model
    with torch.inference_mode():
        with handle.use(enabled=False):
            features = frame_features(handle, frame_pixel_values(processor, clip_frames(make_image, 1)))
        input_ids = video_input_ids(processor, video_prompt(processor, question(), [0.0]), tokens_per_frame(handle))
        with pytest.raises(ValueError, match="same VisionZip settings"):
            video_inputs(model, input_ids, features)


@pytest.mark.parametrize("enabled", [False, True])
def test_generate_runs_on_frames(video_model, make_image, enabled):
    model, processor, handle = video_model
    frames = clip_frames(make_image, 3)
    with torch.inference_mode(), handle.use(enabled=enabled):
        features = frame_features(handle, frame_pixel_values(processor, frames))
        text = video_prompt(processor, question(), [0.0, 1.0, 2.0])
        inputs = video_inputs(model, video_input_ids(processor, text, tokens_per_frame(handle)), features)
        new_tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert new_tokens.shape == (1, 4)


def test_two_turn_conversation_over_the_same_frames(video_model, make_image):
    model, processor, handle = video_model
    timestamps = [0.0, 0.5, 1.0]
    messages = question("What moves?")
    with torch.inference_mode():
        features = frame_features(handle, frame_pixel_values(processor, clip_frames(make_image, 3)))
        per_frame = tokens_per_frame(handle)
        first_text = video_prompt(processor, messages, timestamps)
        first_ids = video_input_ids(processor, first_text, per_frame)
        answer = model.generate(**video_inputs(model, first_ids, features), max_new_tokens=3, do_sample=False)
        assert answer.shape[1] >= 1

        messages += [
            {"role": "assistant", "content": [{"type": "text", "text": "A red ball."}]},
            {"role": "user", "content": [{"type": "text", "text": "Where does it go?"}]},
        ]
        second_text = video_prompt(processor, messages, timestamps)
        second_ids = video_input_ids(processor, second_text, per_frame)
        second_inputs = video_inputs(model, second_ids, features)  # the same frame features, reused
        reply = model.generate(**second_inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)

    assert second_text.startswith(first_text)  # the clip and turn 1 are a prefix of turn 2
    assert second_text.index("A red ball.") < second_text.index("Where does it go?")
    torch.testing.assert_close(second_ids[:, : first_ids.shape[1]], first_ids)
    assert int((second_ids == model.config.image_token_id).sum()) == 3 * per_frame  # frames only once
    assert reply.shape == (1, 3)
