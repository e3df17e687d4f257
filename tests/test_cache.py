"""Multi-turn chat as a chat server runs it: each side's KV cache kept between turns, later turns
prefilling only their new text.  A cached turn must equal a whole re-prefill of the same tokens (with
the visual tokens chosen on turn 1 for a text-dependent method), and the stats must say what ran."""

import threading
from dataclasses import replace

import pytest
import torch
from gradio_client import handle_file
from method_refs import fastv_masked_logits

from app.conversation import Conversation, SideConfig
from app.models import TINY_LABEL
from app.modes import FULL, FULL_MODE, make_mode
from app.quality import first_token_logprobs, prompt_logits
from app.turn import prepare_sides, run_turn, stream_side
from visionzip.tiny import load_tiny

QUESTIONS = ["Is there a car in the picture?", "What is in the top-left corner?", "And the bottom right?"]
MODES = ["Full", "VisionZip 320", "DivPrune 320", "Pool 320", "CDPruner 320"]


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(672, 672, seed=9).save(path)
    return str(path)


@pytest.mark.parametrize("name", MODES)
def test_a_cached_turn_equals_a_whole_reprefill(registry, picture, name):
    registry.get(TINY_LABEL)
    mode = make_mode(name, "llava_next")
    sides = {"left": SideConfig(TINY_LABEL, mode), "right": SideConfig(TINY_LABEL, make_mode(FULL, "llava_next"))}
    conversation = Conversation(sides, media_path=picture, keep_cache=True)
    list(run_turn(registry, conversation, QUESTIONS[0], 4, threading.Event()))
    assert "left" in conversation.caches

    prepared, errors = prepare_sides(registry, conversation, QUESTIONS[1], 4)
    this = prepared["left"]
    assert not errors and this.reuse is not None and this.prefilled_tokens < 40
    assert this.text == QUESTIONS[0]  # a text-dependent method keeps the tokens it chose for turn 1
    for _ in stream_side(this, 2, "left", 4, threading.Event(), keep_cache=True):
        pass
    whole = replace(this, reuse=None)  # the same token ids, prefilled from scratch
    expected = first_token_logprobs(prompt_logits(whole)[-1])
    torch.testing.assert_close(this.output.first_logprobs, expected, atol=2e-4, rtol=1e-4)


def test_a_cached_fastv_turn_equals_the_turn_1_choice_forced_by_masking(registry, picture):
    """FastV's cache holds, from layer K on, only the image tokens turn 1 kept: a later cached turn must equal
    an independent float64 reference, the whole prompt run by a stock model in which, from layer K on, no
    query sees the image tokens turn 1 dropped (the spec's mask variant).  Turn 3 builds on a cache that a
    cached turn 2 extended."""
    loaded = registry.get(TINY_LABEL)
    sides = {
        "left": SideConfig(TINY_LABEL, make_mode("FastV 320", "llava_next")),
        "right": SideConfig(TINY_LABEL, FULL_MODE),
    }
    conversation = Conversation(sides, media_path=picture, keep_cache=True)
    for question in QUESTIONS[:2]:
        list(run_turn(registry, conversation, question, 4, threading.Event()))
    first, second = (turn.stats["left"] for turn in conversation.turns)
    layer = next(k for k, count in enumerate(first.layer_tokens) if count != first.layer_tokens[0])  # FastV's K
    assert first.layer_tokens[layer:] == [320] * (len(first.layer_tokens) - layer) and second.cached_tokens > 2928

    prepared, errors = prepare_sides(registry, conversation, QUESTIONS[2], 4)
    this = prepared["left"]
    assert not errors and this.reuse is not None and this.prefilled_tokens < 40 and this.text == QUESTIONS[0]
    for _ in stream_side(this, 3, "left", 4, threading.Event(), keep_cache=True):
        pass
    ids = this.inputs["input_ids"][0]
    span = (ids == loaded.model.config.image_token_id).nonzero().squeeze(1)  # (2928,) the image's positions
    kept = span[conversation.turns[0].selections["left"][0].tiles.choice.rows]  # what turn 1 kept
    dropped = sorted(set(span.tolist()) - set(kept.tolist()))
    reference, _ = load_tiny("llava_next", dtype=torch.float64)
    inputs = {**this.inputs, "pixel_values": this.inputs["pixel_values"].double()}
    expected = first_token_logprobs(fastv_masked_logits(reference, layer, dropped, **inputs)[0, -1])
    torch.testing.assert_close(this.output.first_logprobs, expected.float(), atol=2e-4, rtol=1e-4)


def test_three_cached_turns_through_the_api_with_a_frozen_cdpruner(client, picture):
    client.predict(handle_file(picture), api_name="/set_media")
    client.predict(left_mode="VisionZip 320", right_mode="CDPruner 320", right_method="CDPruner", api_name="/set_mode")
    client.predict(True, api_name="/set_cache")
    for question in QUESTIONS:
        _, _, stats, _ = client.predict(question, api_name="/ask")
    by_turn = {(r["turn"], r["side"]): r for r in stats}
    for side in ("left", "right"):
        first, later = by_turn[(1, side)], [by_turn[(n, side)] for n in (2, 3)]
        assert first["error"] is None and first["cached_tokens"] == 0
        assert first["prefilled_tokens"] == first["context_tokens"]
        for record in later:
            assert record["error"] is None and record["cached_tokens"] > first["visual_tokens"]
            assert record["prefilled_tokens"] * 10 < first["prefilled_tokens"]  # only the new text
            assert record["vision_ms"] * 10 < first["vision_ms"]  # the image is in the cache: no vision tower
    assert by_turn[(1, "right")]["chosen_for"] == "this question"
    assert by_turn[(1, "right")]["text_tower"] == "tiny random CLIP (offline)"  # the page says which scored it
    assert [by_turn[(n, "right")]["chosen_for"] for n in (2, 3)] == ["turn 1's question (frozen in the KV cache)"] * 2
    assert by_turn[(2, "left")]["chosen_for"] is None  # VisionZip reads no question: nothing to freeze

    client.predict(False, api_name="/set_cache")  # re-select every turn: the whole conversation again
    _, _, stats, _ = client.predict("Once more?", api_name="/ask")
    fourth = {r["side"]: r for r in stats if r["turn"] == 4}
    assert fourth["right"]["cached_tokens"] == 0 and fourth["right"]["chosen_for"] == "this question"
    assert fourth["right"]["prefilled_tokens"] == fourth["right"]["context_tokens"]


def test_new_media_clear_and_regenerate_never_build_on_an_old_cache(handlers_for_cache, picture, tmp_path, make_image):
    handlers = handlers_for_cache
    conversation = handlers.set_media({"path": picture}, handlers.set_cache(new(handlers), True)["state"])["state"]
    conversation = list(handlers.ask("What is it?", conversation))[-1]["state"]
    assert set(conversation.caches) == {"left", "right"}
    other = tmp_path / "other.png"
    make_image(672, 672, seed=10).save(other)  # the same size: the same placeholder ids as the first image
    assert handlers.set_media({"path": str(other)}, conversation)["state"].caches == {}
    assert handlers.clear_conversation(conversation)["state"].caches == {}
    assert handlers.pop_last_turn(conversation)["state"].caches == {}


@pytest.fixture(scope="module")
def handlers_for_cache(registry, tmp_path_factory):
    from app.handlers import Handlers

    return Handlers(registry, max_new_tokens=3, stops=tmp_path_factory.mktemp("stops"))


def new(handlers):
    from app.handlers import new_conversation

    return new_conversation(handlers.registry)


def test_a_turn_that_cannot_build_on_the_cache_says_why(handlers_for_cache, picture):
    handlers = handlers_for_cache
    conversation = handlers.set_media({"path": picture}, handlers.set_cache(new(handlers), True)["state"])["state"]
    conversation = list(handlers.ask("What is it?", conversation))[-1]["state"]
    conversation = handlers.set_mode(conversation, "Full", 54, 10, "VisionZip 160", 54, 10)["state"]
    final = list(handlers.ask("And now?", conversation))[-1]
    right, left = final["state"].turns[-1].stats["right"], final["state"].turns[-1].stats["left"]
    assert right.cached_tokens == 0 and right.cache_note == "the model or method changed since the cache was filled"
    assert left.cached_tokens > 0 and left.cache_note is None
    assert "KV cache not reused: the model or method changed" in final["right_chat"][-1]["content"]


def test_the_summary_gives_a_speed_up_only_for_turns_that_prefilled_the_image(handlers_for_cache, picture):
    """With the cache kept a later turn prefills only its new text on both sides: the summary says so and
    gives no speed-up for it (a ratio of two text prefills is not the method's), while turn 1's stays."""
    handlers = handlers_for_cache
    conversation = handlers.set_media({"path": picture}, handlers.set_cache(new(handlers), True)["state"])["state"]
    for question in QUESTIONS[:2]:
        final = list(handlers.ask(question, conversation))[-1]
        conversation = final["state"]
    latest, first = final["summary"].split("<br>")
    full, reduced = (conversation.turns[1].stats[side] for side in ("left", "right"))
    assert latest == (
        f"**Turn 2: 2928 -> 320 visual tokens, both in the KV cache; new text only: {full.prefilled_tokens:,} vs "
        f"{reduced.prefilled_tokens:,} tokens prefilled (no speed-up: neither side prefilled its visual tokens)**"
    )
    assert first.startswith("<small>Turn 1: 2928 -> 320 visual tokens, time to first token ")
    assert first.endswith(("faster</small>", "slower</small>"))


def test_fastv_builds_on_its_cache_too(handlers_for_cache, picture):
    """FastV's pruned layers hold fewer positions, yet cutting the cache back to the shared prefix (after
    the image) removes the same trailing text positions from every layer: later turns reuse it."""
    handlers = handlers_for_cache
    conversation = handlers.set_media({"path": picture}, handlers.set_cache(new(handlers), True)["state"])["state"]
    conversation = handlers.set_mode(conversation, "Full", 54, 10, "FastV 320", 54, 10, False, False, "Full", "FastV")[
        "state"
    ]
    for question in QUESTIONS:
        conversation = list(handlers.ask(question, conversation))[-1]["state"]
    first, *later = [turn.stats["right"] for turn in conversation.turns]
    assert first.layer_tokens[-1] == 320 and first.cached_tokens == 0
    for stats in later:
        assert stats.error is None and stats.cache_note is None
        assert stats.cached_tokens > 2928 and stats.prefilled_tokens < 40
