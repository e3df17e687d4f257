"""The presenter view's overlays and budget sliders, through its handlers with no server.

Issue 23 in the presenter view: a side switched from CDPruner to FastV (or to another CDPruner budget)
without a new turn must not show the turn's CDPruner choice as if the new settings had made it.
Issue 19, item 4 in the presenter view: each side's slider redraws that side's overlay, count and
predicted prefill from one tower run, without the chat; the keys keep stepping presets."""

import numpy as np
import pytest
from test_overlay_provenance import fresh_selection
from test_scrub import TowerCalls, generated_selection

from app import overlay
from app.conversation import load_media
from app.handlers import Handlers, new_conversation
from app.models import TINY_LABEL, TINY_QWEN_LABEL, ModelRegistry
from app.modes import use_mode
from app.presenter import OVERLAYS, SIDE_VIEWS, SLIDERS, VIEWS
from app.talk import TalkHandlers

QUESTION = "What colour is the car?"


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    page = Handlers(ModelRegistry(device="cpu"), max_new_tokens=2, stops=tmp_path_factory.mktemp("stops"))
    return TalkHandlers(page, examples=[])


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    random_image(672, 672, seed=8).save(path)  # 2,928 stock visual tokens on the tiny LLaVA-NeXT
    return str(path)


def set_right(talk: TalkHandlers, conversation, method_title: str, budget: str):
    """The right side's method and preset, as the presenter view's dropdowns send them (left: full)."""
    return talk.set_mode(conversation, "Full", "Full", method_title, budget)["state"]


@pytest.fixture(scope="module")
def cdpruner_turn(talk, picture):
    """One turn with the right side on CDPruner 320."""
    start = talk.set_media({"path": picture}, new_conversation(talk.registry))["state"]
    start = set_right(talk, start, "CDPruner", "CDPruner 320")
    turned = list(talk.ask(QUESTION, start))[-1]["state"]
    assert turned.turns[-1].stats["right"].error is None and "right" in turned.turns[-1].selections
    return turned


def drawn(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_the_preview_after_a_switch_to_fastv_shows_no_cdpruner_choice(talk, cdpruner_turn):
    fastv = set_right(talk, cdpruner_turn, "FastV", "FastV 320")
    shown = talk.preview(fastv)
    assert shown["right_overlay"] is None  # FastV chooses inside the language model: nothing before a question
    assert "Ask a question to see FastV's choice" in shown["right_chosen"]
    assert "Settings changed since turn 1, which ran CDPruner 64/tile" in shown["right_chosen"]
    assert shown["left_chosen"].startswith("Full model") and shown["left_overlay"] is not None


def test_the_preview_after_a_budget_change_shows_the_new_budgets_choice(talk, cdpruner_turn):
    smaller = set_right(talk, cdpruner_turn, "CDPruner", "CDPruner 160")
    shown = talk.preview(smaller)
    expected = fresh_selection(talk.page, smaller, "right", QUESTION)  # CDPruner 32/tile for the question
    assert sum(len(tile.kept) for tile in expected.tiles) == 5 * 32
    assert np.array_equal(drawn(shown["right_overlay"]), drawn(overlay.draw_overlay(load_media(smaller), expected)))
    assert "Chosen now by CDPruner 32/tile for turn 1's question" in shown["right_chosen"]
    assert "CDPruner 32/tile." in shown["right_chosen"] and "64/tile." not in shown["right_chosen"]
    assert not shown["right_scrub"].visible and "needs a question" in shown["right_scrub_info"]

    same = talk.preview(cdpruner_turn)  # the settings that chose it: the turn's own choice, said to be
    recorded = cdpruner_turn.turns[-1].selections["right"][0]
    assert np.array_equal(drawn(same["right_overlay"]), drawn(overlay.draw_overlay(load_media(smaller), recorded)))
    assert f"Chosen on turn 1 for **this question**: “{QUESTION}”" in same["right_chosen"]


def test_the_slider_redraws_one_side_from_one_tower_run(talk, picture):
    conversation = talk.set_media({"path": picture}, new_conversation(talk.registry))["state"]
    conversation = set_right(talk, conversation, "VisionZip", "VisionZip 320")
    loaded = talk.registry.get(TINY_LABEL)
    calls = TowerCalls(loaded)
    try:
        shown = talk.preview(conversation)
        assert set(shown) <= {*VIEWS, *OVERLAYS, *SLIDERS}
        slider = shown["right_scrub"]
        assert slider.visible and (slider.minimum, slider.maximum, slider.value) == (1, 576, 64)  # 54 + 10 a tile
        assert not shown["left_scrub"].visible  # the full model: nothing to scrub
        redrawn = {value: talk.scrub_right(conversation, value) for value in (12, 200)}
        assert len(calls) == 1  # the preview's tower run serves every budget
    finally:
        calls.remove_hook()
    for value, results in redrawn.items():
        assert set(results) == {"right_overlay", "right_chosen", "right_scrub_info"}  # no chat, no state
        mode = results_mode(talk, conversation, value)
        with use_mode(loaded, mode):
            count = loaded.handle.num_image_tokens((672, 672))
        assert count == 5 * value and f"**{count:,} visual tokens**" in results["right_scrub_info"]
        assert "of 2,928" in results["right_scrub_info"] and "GFLOP" in results["right_scrub_info"]
        assert f"Preview at {mode.label}: the right side still runs VisionZip 54+10/tile" in results["right_chosen"]
        expected = fresh_selection(talk.page, replace_right(conversation, mode), "right", None)
        image = load_media(conversation)
        assert np.array_equal(drawn(results["right_overlay"]), drawn(overlay.draw_overlay(image, expected)))
    assert talk.scrub_left(conversation, 12) == {}  # the full model has no slider to move


def results_mode(talk: TalkHandlers, conversation, value: int):
    """The VisionZip mode of `value` tokens a tile with the paper's 54:10 split, as a custom budget."""
    dominant = min(value, max(1, round(value * 54 / 64)))
    changed = talk.page.set_mode(
        conversation, "Full", 54, 10, "Custom D/C", dominant, value - dominant, False, False, None, "VisionZip"
    )
    return changed["state"].sides["right"].mode


def replace_right(conversation, mode):
    from dataclasses import replace

    return replace(conversation, sides={**conversation.sides, "right": replace(conversation.sides["right"], mode=mode)})


def test_the_slider_previews_a_qwen_side_on_its_merged_cells(talk, picture):
    """Qwen2.5-VL in the presenter view: the slider runs over the image's merged cells (budgets per image),
    from one tower run, and each redraw is the overlay of the cells a real generate() at that budget keeps."""
    conversation = talk.set_media({"path": picture}, new_conversation(talk.registry))["state"]
    conversation = talk.page.set_model(conversation, TINY_LABEL, TINY_QWEN_LABEL)["state"]
    conversation = set_right(talk, conversation, "VisionZip", "VisionZip 128")
    loaded, image = talk.registry.get(TINY_QWEN_LABEL), load_media(conversation)
    with loaded.handle.use(enabled=False):
        cells = loaded.handle.num_image_tokens((image.height, image.width))  # 24 x 24 cells of 28 px
    calls = TowerCalls(loaded)
    try:
        shown = talk.preview(conversation)
        slider = shown["right_scrub"]
        assert slider.visible and (slider.minimum, slider.maximum, slider.value) == (1, cells, 128)
        assert "tokens per image" in slider.label and "VisionZip 108+20/image" in shown["right_title"]
        redrawn = {value: talk.scrub_right(conversation, value) for value in (30, 300)}
        assert len(calls) == 1  # the preview's tower run serves every budget
    finally:
        calls.remove_hook()
    for value, results in redrawn.items():
        mode = results_mode(talk, conversation, value)  # the same 54:10 split, of the image's budget
        assert f"Preview at {mode.label}: the right side still runs VisionZip 108+20/image" in results["right_chosen"]
        assert (
            f"**{value:,} visual tokens**" in results["right_scrub_info"]
            and f"of {cells:,}" in results["right_scrub_info"]
        )
        expected = generated_selection(loaded, image, mode)
        assert np.array_equal(drawn(results["right_overlay"]), drawn(overlay.draw_overlay(image, expected)))


def test_the_budget_keys_step_presets_and_the_slider_follows(talk, picture):
    conversation = talk.set_media({"path": picture}, new_conversation(talk.registry))["state"]
    conversation = set_right(talk, conversation, "VisionZip", "VisionZip 320")
    stepped = talk.step_budget(conversation, "right", 1)  # `↓`: one preset smaller, what the next turn runs
    assert stepped["right_budget"].value == "VisionZip 160"
    mode = stepped["state"].sides["right"].mode
    shown = talk.preview(stepped["state"])  # what the view runs after a step
    assert shown["right_scrub"].value == mode.dominant + mode.contextual
    expected = fresh_selection(talk.page, stepped["state"], "right", None)
    assert np.array_equal(
        drawn(shown["right_overlay"]), drawn(overlay.draw_overlay(load_media(conversation), expected))
    )
    assert "VisionZip 27+5/tile" in shown["right_chosen"] and set(SIDE_VIEWS) <= set(shown)


def test_a_replayed_turn_is_captioned_by_what_chose_it(talk, cdpruner_turn, tmp_path):
    """A recording saved after the side moved on (CDPruner 320's turn, then VisionZip 160): replayed with
    no model, its overlay is the turn's choice, named after CDPruner, not after the side's new settings."""
    from app import recording

    moved = set_right(talk, cdpruner_turn, "VisionZip", "VisionZip 160")
    path = recording.save(moved, tmp_path / "moved.vzrec.json", cdpruner_turn.turns[-1].measured_on)
    replayed = talk.load_recording(str(path), new_conversation(talk.registry))
    assert replayed["state"].sides["right"].mode.label == "VisionZip 27+5/tile"
    caption = replayed["right_chosen"]
    assert f"Chosen on turn 1 for **this question**: “{QUESTION}”" in caption and "CDPruner 64/tile." in caption
    assert "27+5" not in caption and not replayed["right_scrub"].visible
