"""The demo driven through its named endpoints with gradio_client, on the tiny offline LLaVA-NeXT,
and one turn's mechanics (alternation, stop, per-side refusal) through app.chat directly."""

import json
import threading
from collections.abc import Iterator

import pytest
from gradio_client import Client, handle_file
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from app.conversation import Conversation, SideConfig
from app.models import TINY_15_LABEL, TINY_LABEL, ModelRegistry
from app.modes import FULL, make_mode
from app.turn import TurnRefused, load_side_models, run_turn
from visionzip import preset_budget
from visionzip.tiny import tiny_checkpoint

BROKEN = "Broken checkpoint"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    registry = ModelRegistry()
    broken = tmp_path_factory.mktemp("broken-checkpoint")
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    registry.choices[BROKEN] = str(broken)
    return registry


@pytest.fixture(scope="module")
def max_new_tokens():
    return 6


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(672, 672, seed=3).save(path)
    return path


@pytest.fixture
def expected(tiny_next, picture):
    """Visual tokens for the 672x672 picture, from the processor and the budget arithmetic
    (never from the app): stock, and tiles x (D + C) per LLaVA-NeXT preset."""
    from PIL import Image

    _, processor = tiny_next
    image = Image.open(picture)
    inputs = processor(images=image, text="<image>", return_tensors="pt")
    stock = int((inputs["input_ids"] == processor.image_token_id).sum())
    tiles = image_size_to_num_patches([672, 672], processor.image_processor.image_grid_pinpoints, 336)
    reduced = {name: tiles * preset_budget("llava_next", name).per_tile for name in (640, 320, 160)}
    return {"full": stock, "tiles": tiles, **reduced}


def ask(client: Client, question: str) -> tuple[list, list, list[dict], str]:
    return client.predict(question, api_name="/ask")


def by_side(stats: list[dict], turn: int) -> dict[str, dict]:
    return {record["side"]: record for record in stats if record["turn"] == turn}


def assert_answered(record: dict, visual_tokens: int) -> None:
    assert record["error"] is None
    assert record["visual_tokens"] == visual_tokens
    assert record["context_tokens"] == record["visual_tokens"] + record["text_tokens"]
    assert record["vision_ms"] > 0 and record["ttft_ms"] >= record["vision_ms"]
    assert record["llm_prefill_ms"] == pytest.approx(record["ttft_ms"] - record["vision_ms"])
    assert record["new_tokens"] > 0 and record["kv_cache_bytes"] > 0


def test_three_turn_conversation(client, picture, expected):
    assert (expected["full"], expected[320]) == (2928, 5 * (54 + 10))
    client.predict(handle_file(str(picture)), api_name="/set_media")
    text_tokens = []
    for number, question in enumerate(["What is in the picture?", "What colour is it?", "Is there a car?"], start=1):
        left, right, stats, summary = ask(client, question)
        for history in (left, right):
            assert len(history) == 2 * number
            assert [message["role"] for message in history[-2:]] == ["user", "assistant"]
        sides = by_side(stats, number)
        assert_answered(sides["left"], expected["full"])
        assert_answered(sides["right"], expected[320])
        assert f"{expected['full']} -> {expected[320]} visual tokens" in summary
        text_tokens.append(sides["left"]["text_tokens"])
    # every turn re-reads the whole conversation: the text grows, the image stays
    assert text_tokens[0] < text_tokens[1] < text_tokens[2]
    assert len(stats) == 6


def test_clear_starts_the_conversation_over(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    _, _, first, _ = ask(client, "What is in the picture?")
    ask(client, "And then?")
    left, right, stats, summary = client.predict(api_name="/clear")
    assert (left, right, stats, summary) == ([], [], [], "")
    left, right, stats, _ = ask(client, "What is in the picture?")  # the image stays with the conversation
    assert len(left) == len(right) == 2
    assert {record["turn"] for record in stats} == {1}
    assert by_side(stats, 1)["left"]["text_tokens"] == by_side(first, 1)["left"]["text_tokens"]


def test_switching_budgets_between_turns(client, picture, expected):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    _, _, stats, _ = ask(client, "What is in the picture?")
    assert by_side(stats, 1)["right"]["visual_tokens"] == expected[320]

    client.predict(right_mode="VisionZip 160", api_name="/set_mode")
    _, _, stats, _ = ask(client, "Look again.")
    assert by_side(stats, 2)["right"]["visual_tokens"] == expected[160]
    assert by_side(stats, 2)["left"]["visual_tokens"] == expected["full"]

    client.predict("VisionZip 640", 54, 10, "Custom D/C", 20, 4, api_name="/set_mode")
    _, _, stats, _ = ask(client, "Once more.")
    assert by_side(stats, 3)["left"]["visual_tokens"] == expected[640]
    assert by_side(stats, 3)["right"]["visual_tokens"] == expected["tiles"] * (20 + 4)
    assert by_side(stats, 3)["right"]["mode"] == "VisionZip 20+4/tile"


def test_impossible_budget_is_refused_and_history_kept(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    ask(client, "What is in the picture?")
    with pytest.raises(Exception, match="out of range"):
        client.predict(right_mode="Custom D/C", right_dominant=600, right_contextual=10, api_name="/set_mode")
    left, right, stats, _ = ask(client, "Still there?")
    assert len(left) == len(right) == 4
    assert by_side(stats, 2)["right"]["mode"] == "VisionZip 54+10/tile"  # the refused budget never applied


def test_questions_need_an_image(client):
    with pytest.raises(Exception, match="Upload an image first"):
        ask(client, "What is in the picture?")


def test_llava_15_side_uses_its_own_presets(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    client.predict(TINY_LABEL, TINY_15_LABEL, api_name="/set_model")
    _, _, stats, _ = ask(client, "What is in the picture?")
    # VisionZip 320 on LLaVA-NeXT maps to the middle LLaVA-1.5 preset, 128 = 108 + 20 on its one tile
    assert by_side(stats, 1)["right"]["visual_tokens"] == preset_budget("llava", 128).per_tile
    assert by_side(stats, 1)["right"]["model"] == TINY_15_LABEL


def test_a_model_that_fails_to_load_leaves_the_previous_one_serving(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    with pytest.raises(Exception, match="bert"):
        client.predict(BROKEN, TINY_LABEL, api_name="/set_model")
    _, _, stats, _ = ask(client, "What is in the picture?")
    assert by_side(stats, 1)["left"]["model"] == TINY_LABEL
    assert by_side(stats, 1)["left"]["error"] is None


# -- one turn's mechanics, without the server ------------------------------------------------------
def turn_states(
    registry: ModelRegistry, chat: Conversation, question: str, max_new_tokens: int, stop
) -> Iterator[Conversation]:
    """One turn as the app runs it: the models loaded first (outside any GPU call), then the turn."""
    load_side_models(registry, chat)
    return run_turn(registry, chat, question, max_new_tokens, stop)


def test_a_turn_never_loads_a_model_and_names_the_one_it_lacks(picture):
    """On ZeroGPU a turn runs in a worker process: a model it loaded there would be lost, so it
    runs only what was loaded before and says which side lacks its model and why."""
    registry = ModelRegistry()
    chat = conversation(picture)
    with pytest.raises(TurnRefused, match="not loaded"):
        for _ in run_turn(registry, chat, "What is it?", 2, threading.Event()):
            pass
    assert registry.loaded() == [] and chat.turns == []

    registry.choices[BROKEN] = registry.choices[TINY_LABEL] + "-missing"  # a tiny family that does not exist
    chat.sides["left"].model = BROKEN
    load_side_models(registry, chat)  # the broken one fails quietly here, and is reported by the turn
    for _ in run_turn(registry, chat, "What is it?", 2, threading.Event()):
        pass
    turn = chat.turns[-1]
    assert "missing" in turn.stats["left"].error and "not loaded" not in turn.stats["left"].error
    assert turn.stats["right"].ok and [model.label for model in registry.loaded()] == [TINY_LABEL]


def conversation(picture, left: str = FULL, right: str = "VisionZip 320") -> Conversation:
    sides = {
        "left": SideConfig(TINY_LABEL, make_mode(left, "llava_next")),
        "right": SideConfig(TINY_LABEL, make_mode(right, "llava_next")),
    }
    return Conversation(sides, media_path=str(picture))


def test_the_side_that_goes_first_alternates(registry, picture):
    chat = conversation(picture)
    first = []
    for question in ("one", "two", "three"):
        states = turn_states(registry, chat, question, 2, threading.Event())
        first.append(next(states).turns[-1].running)
        for _ in states:
            pass
    assert first == ["left", "right", "left"]


def test_a_side_over_its_context_window_is_refused_while_the_other_answers(registry, picture, expected):
    # the full side's 2928 visual tokens + this many new ones exceed the 4096-token window; 320 do not
    max_new_tokens = 4096 - expected["full"]
    chat, stop = conversation(picture), threading.Event()
    for state in turn_states(registry, chat, "Describe it.", max_new_tokens, stop):
        if state.turns[-1].running == "right":
            stop.set()  # the Stop button: generation ends at the next token, what it made is kept
    turn = chat.turns[-1]
    assert "context window" in turn.stats["left"].error
    assert turn.stats["right"].ok and 0 < turn.stats["right"].new_tokens < max_new_tokens


def test_a_turn_no_side_can_run_leaves_the_conversation_unchanged(registry, picture):
    chat = conversation(picture)
    for _ in turn_states(registry, chat, "First.", 2, threading.Event()):
        pass
    with pytest.raises(TurnRefused, match="context window"):
        for _ in turn_states(registry, chat, "Too long.", 5000, threading.Event()):
            pass
    assert [turn.question for turn in chat.turns] == ["First."]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_local_checkpoint_loads_through_the_registry(dtype, picture):
    path = str(tiny_checkpoint("llava_next"))
    registry = ModelRegistry(path, dtype=dtype)
    loaded = registry.get(registry.default)
    assert loaded.source == path and str(loaded.dtype) == f"torch.{dtype}"
    chat = conversation(picture)
    for side in chat.sides.values():
        side.model = registry.default
    for _ in turn_states(registry, chat, "What is it?", 2, threading.Event()):
        pass
    assert all(stats.ok for stats in chat.turns[0].stats.values())


def test_a_listed_checkpoint_named_with_model_keeps_one_label():
    """--model naming a checkpoint the app already lists must not add a second label for it:
    each label loads its own copy of the weights."""
    registry = ModelRegistry("llava-hf/llava-v1.6-vicuna-7b-hf")
    sources = list(registry.choices.values())
    assert sources.count("llava-hf/llava-v1.6-vicuna-7b-hf") == 1
    assert registry.choices[registry.default] == "llava-hf/llava-v1.6-vicuna-7b-hf"


def test_every_endpoint_names_its_parameters_and_results(app_url):
    """gradio_client users read the API page: no result is an anonymous `value_N`."""
    endpoints = Client(app_url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/set_media", "/set_frames", "/ask", "/clear", "/set_mode", "/set_model"} <= set(endpoints)
    for name, endpoint in endpoints.items():
        labels = [result["label"] for result in endpoint["returns"]]
        assert not [label for label in labels if label.startswith("value_")], (name, labels)
    assert [p["parameter_name"] for p in endpoints["/set_model"]["parameters"]] == ["left_model", "right_model"]
