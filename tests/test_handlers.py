"""The page's handlers called directly, as plain methods, with no server: media, ask, clear, mode and
model changes on the tiny offline models.  Expected counts come from the processor and the budget
arithmetic, never from the app."""

import gradio as gr
import pytest
from PIL import Image

from app.handlers import Handlers, new_conversation
from app.models import TINY_15_LABEL, TINY_LABEL, ModelRegistry
from app.ui import AFTER_TURN, MEDIA, MODEL_OUTPUTS, VIEWS, ordered
from visionzip import preset_budget


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    return Handlers(ModelRegistry(device="cpu"), max_new_tokens=4, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(672, 672, seed=3).save(path)
    return str(path)


def stock_tokens(tiny, path: str) -> int:
    _, processor = tiny
    inputs = processor(images=Image.open(path), text="<image>", return_tensors="pt")
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def last(generator):
    return list(generator)[-1]


def test_new_media_starts_a_conversation_and_a_bad_file_keeps_the_old_one(handlers, picture, tmp_path):
    start = new_conversation(handlers.registry)
    results = handlers.set_media({"path": picture}, start)
    conversation = results["state"]
    assert conversation.media_path == picture and conversation.media_kind == "image" and conversation.turns == []
    assert results["media_info"] == "672x672 image"
    assert start.media_path is None  # the conversation the handler was given is not changed in place
    assert set(results) <= set(MEDIA)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(gr.Error) as refused:
        handlers.set_media({"path": str(broken)}, conversation)
    assert "broken.png" in str(refused.value) and str(tmp_path) not in str(refused.value)
    assert handlers.show_media(conversation) == {"media": picture, "video": None}


def test_ask_streams_both_sides_then_clear_empties_the_conversation(handlers, picture, tiny_next):
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    steps = list(handlers.ask("What is in the picture?", conversation))
    assert len(steps) >= 3 and all(set(step) == set(VIEWS) for step in steps)
    final = steps[-1]
    turn = final["state"].turns[-1]
    assert set(turn.stats) == {"left", "right"} and not any(stats.error for stats in turn.stats.values())
    assert turn.stats["left"].visual_tokens == stock_tokens(tiny_next, picture)
    assert turn.stats["right"].visual_tokens == 5 * preset_budget("llava_next", 320).per_tile
    assert len(final["left_chat"]) == 2 and final["left_chat"][0]["content"] == "What is in the picture?"
    assert "Turn 1" in final["summary"] and len(final["stats_json"]) == 2

    second = last(handlers.ask("And the colours?", final["state"]))["state"]
    assert [t.question for t in second.turns] == ["What is in the picture?", "And the colours?"]
    popped = handlers.pop_last_turn(second)
    assert popped["question"] == "And the colours?" and len(popped["state"].turns) == 1

    after = handlers.after_turn(second)
    assert set(after) <= set(AFTER_TURN)
    assert after["export_json"].endswith(".json") and after["export_csv"].endswith(".csv")

    cleared = handlers.clear_conversation(second)
    assert cleared["state"].turns == [] and cleared["left_chat"] == [] and cleared["state"].media_path == picture
    with pytest.raises(gr.Error, match="Nothing to regenerate"):
        handlers.pop_last_turn(cleared["state"])


def test_mode_change_sets_the_budget_and_a_refused_one_changes_nothing(handlers, picture):
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    results = handlers.set_mode(conversation, "VisionZip 160", 54, 10, "Custom D/C", 30, 6)
    left, right = results["state"].sides["left"].mode, results["state"].sides["right"].mode
    assert (left.enabled, left.dominant, left.contextual) == (True, 27, 5)
    assert (right.enabled, right.dominant, right.contextual) == (True, 30, 6)
    assert f"**{5 * 36:,} visual tokens**" in results["right_header"]

    with pytest.raises(gr.Error, match="out of range"):
        handlers.set_mode(conversation, "Full", 54, 10, "Custom D/C", 600, 6)
    restored = handlers.show_modes(conversation)
    assert restored["right_mode"].value == "VisionZip 320"  # the mode in force, not the refused one


def test_model_change_maps_the_preset_and_a_failed_load_keeps_the_models(handlers):
    conversation = new_conversation(handlers.registry)
    shown = []
    results = handlers.set_model(conversation, TINY_LABEL, TINY_15_LABEL, progress=lambda *a, **k: shown.append(k))
    assert {"desc": f"Loading {TINY_15_LABEL}"} in shown  # the page says which model is loading
    assert set(results) <= set(MODEL_OUTPUTS)
    right = results["state"].sides["right"]
    assert right.model == TINY_15_LABEL and right.mode.name == "VisionZip 128"  # 320 <-> 128, as the paper pairs them
    assert ("VisionZip 64", "VisionZip 64") in results["right_mode"].choices

    handlers.registry.choices["Nowhere"] = "/nonexistent/checkpoint"
    with pytest.raises(gr.Error, match="keeps"):
        handlers.set_model(results["state"], "Nowhere", TINY_LABEL)
    assert handlers.show_models(results["state"])["left_model"].value == TINY_LABEL


def test_outputs_are_placed_by_name_and_an_unknown_name_is_a_wiring_error():
    values = ordered({"summary": "s", "state": 1}, VIEWS)
    assert values[0] == 1 and values[-1] == "s" and all(isinstance(v, dict) for v in values[1:4])
    with pytest.raises(KeyError, match="not outputs"):
        ordered({"banner": "x"}, VIEWS)
