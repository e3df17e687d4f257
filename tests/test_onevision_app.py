"""LLaVA-OneVision in the app, through the plain handlers and the turn code (no server): a side on the
tiny OneVision, its overlay on SigLIP's 27x27 grid, Match against a LLaVA-NeXT side, the quality signal,
and a cached later turn equal to a whole re-prefill of the same tokens."""

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from app.conversation import Conversation, SideConfig
from app.handlers import Handlers, new_conversation
from app.models import TINY_LABEL, ModelRegistry
from app.modes import FULL, make_mode, use_mode
from app.overlay import tile_cell_boxes
from app.quality import first_token_logprobs, prompt_logits
from app.turn import prepare_sides, run_turn, stream_side

ONEVISION = "Tiny LLaVA-OneVision (random weights)"
FAMILY = "llava_onevision"


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    return Handlers(ModelRegistry(device="cpu"), max_new_tokens=3, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(500, 700, seed=9).save(path)  # a 2x2 grid: 5 tiles
    return str(path)


@pytest.mark.parametrize("name", ["VisionZip 320", "DivPrune 320", "Pool 405"])  # FastV: test_methods_fastv.py
def test_a_cached_turn_equals_a_whole_reprefill(handlers, picture, name):
    registry = handlers.registry
    registry.get(ONEVISION)
    sides = {
        "left": SideConfig(ONEVISION, make_mode(name, FAMILY)),
        "right": SideConfig(ONEVISION, make_mode(FULL, FAMILY)),
    }
    conversation = Conversation(sides, media_path=picture, keep_cache=True)
    list(run_turn(registry, conversation, "Is there a car?", 3, threading.Event()))
    prepared, errors = prepare_sides(registry, conversation, "And in the corner?", 3)
    this = prepared["left"]
    assert not errors and this.reuse is not None and this.prefilled_tokens < 40
    for _ in stream_side(this, 2, "left", 3, threading.Event(), keep_cache=True):
        pass
    expected = first_token_logprobs(prompt_logits(replace(this, reuse=None))[-1])
    torch.testing.assert_close(this.output.first_logprobs, expected, atol=2e-4, rtol=1e-4)


def test_a_onevision_side_against_a_next_side_with_overlay_match_and_quality(handlers, picture):
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, TINY_LABEL, ONEVISION, progress=lambda *a, **k: None)["state"]
    conversation = handlers.set_mode(conversation, "Full", 54, 10, "VisionZip 320", 54, 10)["state"]
    conversation = handlers.set_quality(conversation, True)["state"]
    final = list(handlers.ask("What is it?", conversation))[-1]
    stats = final["state"].turns[-1].stats
    assert stats["right"].error is None and stats["right"].visual_tokens == 5 * 64  # (1 + 2x2) tiles x 64
    assert stats["right"].kl_to_full is not None  # the quality signal, against the full prefill of its own model

    overlay = handlers.refresh_overlay(final["state"], "all")
    selection = overlay["selection_state"].selection
    assert [tile.side for tile in selection.tiles] == [27] * 5 and selection.grid == (2, 2)
    assert overlay["overlay"] is not None and overlay["heatmap"] is not None  # received attention drawn
    assert "attention received" in overlay["attention_plot"].layout.title.text  # SigLIP has no CLS to name

    conversation = handlers.set_mode(final["state"], "VisionZip 160", 54, 10, "VisionZip 320", 54, 10)["state"]
    matched = handlers.match_left(conversation)["state"]  # LLaVA-NeXT's VisionZip at OneVision's count
    next_model = handlers.registry.get(TINY_LABEL)
    with use_mode(next_model, matched.sides["left"].mode):
        assert next_model.handle.num_image_tokens((500, 700)) == 5 * 64


def test_siglip_cells_are_14_px_of_a_384_px_tile():
    boxes = tile_cell_boxes((384, 384), (1, 1), 0, side=27)  # the base tile of a 384x384 picture
    assert np.allclose(boxes[0], [0, 0, 14, 14]) and np.allclose(boxes[-1], [364, 364, 378, 378])


def test_video_frames_are_one_siglip_tile_each(handlers, tmp_path):
    from test_app_video import write_clip

    path = write_clip(tmp_path / "clip.mp4")
    conversation = handlers.set_media({"path": str(path)}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, ONEVISION, ONEVISION, progress=lambda *a, **k: None)["state"]
    conversation = handlers.set_mode(conversation, "Full", 54, 10, "VisionZip 320", 54, 10)["state"]
    final = list(handlers.ask("What happens?", conversation))[-1]
    turn = final["state"].turns[-1]
    assert turn.stats["left"].error is None and turn.stats["right"].error is None
    assert turn.stats["left"].visual_tokens == turn.frames["left"] * 729  # 27x27 patches, no CLS
    assert turn.stats["right"].visual_tokens == turn.frames["right"] * 64  # VisionZip 54 + 10 per frame
    strip = handlers.refresh_filmstrip(final["state"])
    assert "each one 384x384 tile of 64 tokens" in strip["legend"]
    assert len(strip["filmstrip"].value) == turn.frames["right"]
    captions = [str(item) for item in strip["filmstrip"].value]
    assert all("54 kept + 10 merged tokens" in caption for caption in captions), captions[:1]


def test_the_difference_view_on_two_onevision_sides(handlers, picture):
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, ONEVISION, ONEVISION, progress=lambda *a, **k: None)["state"]
    conversation = handlers.set_mode(
        conversation, "Random 320", 54, 10, "VisionZip 320", 54, 10, False, False, "Random", "VisionZip"
    )["state"]
    compared = handlers.compare_sides(conversation)
    rows = compared["difference_json"]
    assert compared["difference_image"] is not None
    assert [row["tile"] for row in rows] == ["base", "crop 1", "crop 2", "crop 3", "crop 4", "all"]
    for row in rows[:-1]:  # Random keeps 64 patches a tile, VisionZip 54 dominant ones (no CLS on SigLIP)
        assert row["left_only"] + row["both"] == 64 and row["right_only"] + row["both"] == 54
