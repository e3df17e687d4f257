"""The app on the tiny Qwen2.5-VL, through its handlers (no server): turns on both sides, a cached later
turn equal to a re-prefill, the overlay on the merged cells, the difference view, Match, the quality
signal (video: tests/test_qwen_video_app.py)."""

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from app.conversation import Conversation, SideConfig
from app.handlers import Handlers, new_conversation
from app.models import TINY_QWEN_LABEL, ModelRegistry
from app.modes import FULL, make_mode, use_mode
from app.overlay import grid_cell_boxes
from app.quality import first_token_logprobs, prompt_logits
from app.turn import prepare_sides, run_turn, stream_side

QWEN = "qwen2_5_vl"
QUESTIONS = ["Is there a car in the picture?", "What is in the top-left corner?"]


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry()


@pytest.fixture(scope="module")
def handlers(registry, tmp_path_factory):
    return Handlers(registry, max_new_tokens=3, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(480, 640, seed=9).save(path)
    return str(path)


def qwen_conversation(handlers, picture, left: str, right: str, **options) -> Conversation:
    conversation = handlers.set_model(new_conversation(handlers.registry), TINY_QWEN_LABEL, TINY_QWEN_LABEL)["state"]
    conversation = replace(conversation, **options)
    conversation = handlers.set_media({"path": picture}, conversation)["state"]
    titles = [make_mode(name, QWEN).method_title for name in (left, right)]
    return handlers.set_mode(conversation, left, 54, 10, right, 54, 10, False, False, *titles)["state"]


@pytest.mark.parametrize("name", ["Full", "VisionZip 128", "DivPrune 128", "Pool 64", "VisPruner 128"])
def test_a_cached_turn_equals_a_whole_reprefill(registry, picture, name):
    """As tests/test_cache.py on LLaVA-NeXT: with the other side on the same model in between (the model
    keeps one M-RoPE delta for every chat), the second turn on the cache gives the re-prefill's logits."""
    registry.get(TINY_QWEN_LABEL)
    sides = {
        "left": SideConfig(TINY_QWEN_LABEL, make_mode(name, QWEN)),
        "right": SideConfig(TINY_QWEN_LABEL, make_mode(FULL, QWEN)),
    }
    conversation = Conversation(sides, media_path=picture, keep_cache=True)
    list(run_turn(registry, conversation, QUESTIONS[0], 4, threading.Event()))
    prepared, errors = prepare_sides(registry, conversation, QUESTIONS[1], 4)
    this = prepared["left"]
    assert not errors and this.reuse is not None and this.prefilled_tokens < 40
    for _ in stream_side(this, 2, "left", 4, threading.Event(), keep_cache=True):
        pass
    whole = replace(this, reuse=None)
    expected = first_token_logprobs(prompt_logits(whole)[-1])
    torch.testing.assert_close(this.output.first_logprobs, expected, atol=2e-4, rtol=1e-4)


def test_two_turns_with_overlay_difference_match_and_quality(handlers, picture):
    conversation = qwen_conversation(
        handlers, picture, "DivPrune 128", "VisionZip 128", keep_cache=True, quality_check=True
    )
    for question in QUESTIONS:
        conversation = list(handlers.ask(question, conversation))[-1]["state"]
    loaded = handlers.registry.get(TINY_QWEN_LABEL)
    with use_mode(loaded, conversation.sides["right"].mode):
        right_count = loaded.handle.num_image_tokens((480, 640))
    first, second = conversation.turns
    for side in ("left", "right"):
        assert first.stats[side].error is None and second.stats[side].error is None
        assert first.stats[side].visual_tokens == 128
        assert first.stats[side].kl_to_full is not None and first.stats[side].kl_to_full >= 0
        assert second.stats[side].cached_tokens > 128 and second.stats[side].prefilled_tokens < 40

    # the overlay: VisionZip's choice on the picture's 17x23 merged cells, with its attention heatmap
    results = handlers.refresh_overlay(conversation, "all")
    selection = results["selection_state"].selection
    tile = selection.tiles[0]
    assert selection.grid == (17, 23) and tile.groups().shape == (17, 23)
    assert len(tile.kept) + len(tile.targets) == right_count
    assert results["overlay"] is not None and results["heatmap"] is not None
    boxes = grid_cell_boxes((480, 640), *selection.grid)  # the cells tile the whole picture
    assert np.isclose(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum(), 480 * 640)
    assert f"| 17x23 merged cells | {len(tile.kept)} | {len(tile.targets)} |" in results["legend"]  # no CLS

    # where the two sides' choices differ
    difference = handlers.compare_sides(conversation)
    assert difference["difference_image"] is not None and difference["difference_json"][-1]["tile"] == "all"

    # Match: the left side (DivPrune) at the right side's count for this image, then Pool (nearest below)
    conversation = handlers.match_left(conversation)["state"]
    with use_mode(loaded, conversation.sides["left"].mode):
        assert loaded.handle.num_image_tokens((480, 640)) == right_count
    conversation = handlers.set_mode(conversation, "Pool 64", 54, 10, "VisionZip 128", 54, 10, False, False, "Pool")
    conversation = handlers.match_left(conversation["state"])["state"]
    with use_mode(loaded, conversation.sides["left"].mode):
        pooled = loaded.handle.num_image_tokens((480, 640))
    assert 0 < pooled <= right_count


def test_a_qwen_conversation_records_and_replays_with_its_merged_cells(handlers, picture, tmp_path):
    """A recording of a Qwen2.5-VL turn keeps each choice on its rows x cols merged grid (no image size: the
    cells cover the picture as drawn) and reads back as the same cells."""
    from app import recording

    conversation = qwen_conversation(handlers, picture, "Full", "VisionZip 128")
    conversation = list(handlers.ask(QUESTIONS[0], conversation))[-1]["state"]
    where = recording.measured_on("test CPU", "wall clock", "tests", {"left": True, "right": True})
    back = recording.read(recording.save(conversation, tmp_path / "qwen.vzrec.json", where), tmp_path / "media")
    (got,), (want,) = back.turns[0].selections["right"], conversation.turns[0].selections["right"]
    assert got.image_size is None and got.grid == want.grid == (17, 23)
    tile, expected = got.tiles[0], want.tiles[0]
    assert (tile.rows, tile.side) == (17, 23) and tile.groups().shape == (17, 23)
    assert torch.equal(tile.groups(), expected.groups())
