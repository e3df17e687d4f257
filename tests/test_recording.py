"""Recorded runs (app/recording.py): every token's time captured where tokens stream, a conversation
saved and read back unchanged, the shipped recordings replayed with no model (the registry never
touched), and damaged or foreign files refused with a plain message while nothing else changes."""

import base64
import copy
import json
import threading
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import pytest
import torch

from app import charts, recording
from app.conversation import Conversation, SideConfig
from app.handlers import Handlers
from app.models import ModelRegistry
from app.modes import make_mode
from app.talk import RECORDINGS, TalkHandlers, speedup_html
from app.turn import load_side_models, run_turn

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "assets" / "house_and_car.png"
WHERE = recording.measured_on("test CPU", "wall clock", "tests", {"left": True, "right": True})


class UntouchableRegistry:
    """A model registry that fails the test on any use: a replay must not need a model."""

    def __getattr__(self, name):
        raise AssertionError(f"the model registry was touched ({name}) during a replay")


@pytest.fixture(scope="module")
def live(tiny_cache):
    """A two-turn conversation held on the tiny model: full on the left, VisionZip 320 on the right."""
    registry = ModelRegistry()
    label = registry.default
    sides = {
        "left": SideConfig(label, make_mode("Full", "llava_next")),
        "right": SideConfig(label, make_mode("VisionZip 320", "llava_next")),
    }
    conversation = Conversation(sides, media_path=str(IMAGE))
    load_side_models(registry, conversation)
    for question in ("What is in this picture?", "What colour is the car?"):
        for _ in run_turn(registry, conversation, question, 6, threading.Event()):
            pass
    return conversation


@pytest.fixture
def replayer(tmp_path, monkeypatch):
    """The presenter view's handlers on a registry that must never be touched; media into tmp_path."""
    monkeypatch.setattr("app.talk.REPLAYS", tmp_path / "replays")
    return TalkHandlers(Handlers(UntouchableRegistry(), 8, tmp_path / "stops"), examples=[])


def test_every_token_has_its_time_and_text(live):
    for turn in live.turns:
        for side, stats in turn.stats.items():
            tokens = turn.tokens[side]
            times = [ms for ms, _ in tokens]
            assert len(tokens) == stats.new_tokens > 0
            assert times[0] == pytest.approx(stats.ttft_ms)  # the first token's time since the side's start is the TTFT
            assert times == sorted(times)
            assert "".join(text for _, text in tokens) == turn.answers[side]


def test_a_recording_reads_back_as_it_was_saved(live, tmp_path):
    path = recording.save(live, tmp_path / "talk.vzrec.json", WHERE)
    back = recording.read(path, tmp_path / "media")
    assert Path(back.media_path).read_bytes() == IMAGE.read_bytes()
    assert back.sides == live.sides
    for turn, original in zip(back.turns, live.turns, strict=True):
        assert turn.question == original.question and turn.answers == original.answers
        assert turn.stats == original.stats
        assert turn.measured_on == WHERE
        for side in original.tokens:
            assert turn.tokens[side] == [(pytest.approx(ms, abs=1e-3), text) for ms, text in original.tokens[side]]
        assert turn.selections.keys() == original.selections.keys() == {"right"}
        assert turn.chosen_by == original.chosen_by and set(turn.chosen_by) == {"right"}  # what chose `kept`
        for got, want in zip(turn.selections["right"], original.selections["right"], strict=True):
            assert (got.image_size, got.grid, got.num_tokens, got.method) == (
                tuple(want.image_size),
                tuple(want.grid),
                want.num_tokens,
                want.method,
            )
            for tile, expected in zip(got.tiles, want.tiles, strict=True):
                assert torch.equal(tile.kept, expected.kept) and torch.equal(tile.merged_into, expected.merged_into)
                assert torch.allclose(tile.cls_attention, expected.cls_attention.float(), rtol=1e-3)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda path: path.name)
def test_shipped_recordings_replay_without_a_model(path, replayer):
    results = replayer.load_recording(str(path), Conversation({}))
    replayed = results["state"]
    assert replayed.turns and all(turn.measured_on["tiny"] == {"left": True, "right": True} for turn in replayed.turns)
    assert "tiny model with random weights" in results["status"].lower()  # labelled as the tiny model where it shows
    latest = replayed.turns[-1]
    for side in ("left", "right"):
        stats = latest.stats[side]
        assert f"{stats.visual_tokens:,}" in results[f"{side}_figures"]
        reduces = replayed.sides[side].mode.enabled
        if replayed.media_kind == "image" and (side in latest.selections or not reduces):
            assert results[f"{side}_overlay"] is not None  # drawn from the recorded choice
    assert "faster" in results["speedup"] or "slower" in results["speedup"]
    stats = replayed.all_stats()
    plotted = {y for trace in charts.tokens_chart(stats).data for y in trace.y}
    assert {s.visual_tokens for s in stats} <= plotted  # the charts draw from the recorded stats alone
    assert {s.vision_ms for s in stats} <= {y for trace in charts.times_chart(stats).data for y in trace.y}
    on_page = replayer.replay_on_page(str(path), Conversation({}))  # the researcher's page, the same record
    assert len(on_page["right_chat"]) == 2 * len(replayed.turns) and on_page["summary"]
    assert on_page["stats_json"] == [asdict(s) for s in stats] and "Replaying a recording" in on_page["media_info"]
    vision = "right" if replayed.sides["right"].mode.enabled else "left"
    if replayed.media_kind == "image" and vision in latest.selections:
        assert on_page["overlay"] is not None and "visual tokens" in on_page["legend"]
    race = list(replayer.play_race(replayed))
    final = race[-2]  # the last frame; the very last result adds the finishing line
    for side in ("left", "right"):
        assert latest.answers[side].strip() in final[f"{side}_answer"]
    assert "Replay of measured timings" in race[-1]["status"] and "finished" in race[-1]["status"]


def document(live, tmp_path) -> dict:
    return json.loads(recording.save(live, tmp_path / "good.vzrec.json", WHERE).read_text())


def damage(doc: dict, how: str) -> dict:
    doc = copy.deepcopy(doc)
    right = doc["turns"][0]["sides"]["right"]
    if how == "version":
        doc["version"] = 99
    elif how == "foreign":
        doc = {"turns": [], "format": "something-else"}
    elif how == "stats type":
        right["stats"]["ttft_ms"] = "fast"
    elif how == "bool as int":
        right["stats"]["new_tokens"] = True
    elif how == "unknown stat":
        right["stats"]["secret"] = 1
    elif how == "times backwards":
        right["tokens"][1][0] = -1.0
    elif how == "tokens vs answer":
        right["tokens"][0][1] += "x"
    elif how == "index out of range":
        right["kept"][0]["tiles"][0]["kept"][0] = 24 * 24
    elif how == "unknown method":
        doc["sides"]["right"]["mode"]["method"] = "magic"
    elif how == "media kind":
        doc["media"]["kind"] = "video"
    elif how == "media bytes":
        doc["media"]["base64"] = base64.b64encode(b"not a picture at all").decode()
    elif how == "missing turns":
        del doc["turns"]
    return doc


DAMAGES = [
    ("version", "version 99"),
    ("foreign", "not a VisionZip Live recording"),
    ("stats type", "ttft_ms is not"),
    ("bool as int", "new_tokens is not"),
    ("unknown stat", "unknown fields"),
    ("times backwards", "token"),
    ("tokens vs answer", "do not spell its answer"),
    ("index out of range", "out of range"),
    ("unknown method", "magic"),
    ("media kind", "not the video it says"),
    ("media bytes", "media"),
    ("missing turns", "no 'turns'"),
]


@pytest.mark.parametrize(("how", "message"), DAMAGES, ids=[how for how, _ in DAMAGES])
def test_damaged_recordings_are_refused_with_a_plain_message(live, tmp_path, replayer, how, message):
    bad = tmp_path / "bad.vzrec.json"
    bad.write_text(json.dumps(damage(document(live, tmp_path), how)))
    refused_and_unchanged(replayer, bad, message, tmp_path)


def test_truncated_nan_and_huge_files_are_refused(live, tmp_path, replayer):
    text = recording.save(live, tmp_path / "good.vzrec.json", WHERE).read_text()
    cut = tmp_path / "cut.vzrec.json"
    cut.write_text(text[: len(text) // 2])
    refused_and_unchanged(replayer, cut, "cut short", tmp_path)
    nan = tmp_path / "nan.vzrec.json"
    nan.write_text(text.replace('"ttft_ms":', '"ttft_ms":NaN,"x":', 1))
    refused_and_unchanged(replayer, nan, "finite numbers", tmp_path)
    huge = tmp_path / "huge.vzrec.json"
    with huge.open("wb") as sink:  # sparse: its size is refused before a byte is read
        sink.truncate(recording.MAX_FILE_BYTES + 1)
    refused_and_unchanged(replayer, huge, "at most 24 MiB", tmp_path)
    deep = tmp_path / "deep.vzrec.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused_and_unchanged(replayer, deep, "not a recording", tmp_path)


def refused_and_unchanged(replayer: TalkHandlers, path: Path, message: str, tmp_path: Path) -> None:
    """Loading `path` raises gr.Error containing `message` and no path; the session's conversation is
    untouched and no media file is left behind."""
    conversation = Conversation({}, media_path="kept.png", turns=[])
    before = copy.deepcopy(conversation)
    with pytest.raises(gr.Error) as refused:
        replayer.load_recording(str(path), conversation)
    text = str(refused.value.message)
    assert message in text, text
    assert str(tmp_path) not in text and ".json" not in text  # no server path, no file name
    assert conversation == before
    replays = tmp_path / "replays"
    assert not replays.exists() or not any(replays.iterdir())


def test_a_headless_run_writes_a_recording(tmp_path, tiny_cache, capsys):
    from bench import conversation as bench

    target = tmp_path / "bench.vzrec.json"
    bench.main(["--budgets", "320", "--turns", "1", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "4",
                "--record", str(target), "--record-media", str(IMAGE)])  # fmt: skip
    replayed = recording.read(target, tmp_path / "media")
    turn = replayed.turns[0]
    assert [replayed.sides[side].mode.label for side in ("left", "right")] == ["full", "VisionZip 54+10/tile"]
    assert turn.stats["left"].visual_tokens == 2928 and turn.stats["right"].visual_tokens == 320
    assert turn.measured_on["where"] == "python -m bench.conversation" and turn.measured_on["tiny"]["left"]
    assert all(len(turn.tokens[side]) == turn.stats[side].new_tokens for side in ("left", "right"))


def test_a_replayed_gpu_model_gives_way_to_a_served_one_for_live_turns(live, tmp_path, monkeypatch):
    """A recording made on a model this app does not serve (the GPU check's 7B-shaped one) replays; the
    next live action (new media, a budget) puts that side on the served default model."""
    doc = document(live, tmp_path)
    for side in ("left", "right"):
        doc["sides"][side]["model"] = "wide-llava_next-32L-bfloat16"
    path = tmp_path / "gpu.vzrec.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr("app.talk.REPLAYS", tmp_path / "replays")
    registry = ModelRegistry()
    talk = TalkHandlers(Handlers(registry, 8, tmp_path / "stops"))
    replayed = talk.load_recording(str(path), Conversation({}))["state"]
    assert replayed.sides["right"].model == "wide-llava_next-32L-bfloat16"
    picked = talk.pick_example(0, replayed)["state"]
    assert {config.model for config in picked.sides.values()} == {registry.default}
    assert [picked.sides[side].mode.label for side in ("left", "right")] == ["full", "VisionZip 54+10/tile"]


def test_the_speed_up_is_claimed_only_when_both_sides_prefilled_their_image(live):
    turn = live.turns[-1]
    assert "faster" in speedup_html(turn) or "slower" in speedup_html(turn)
    cached = copy.deepcopy(turn)
    cached.stats["right"].cached_tokens = 400  # built on its KV cache: its TTFT is a text prefill
    assert "no speed-up" in speedup_html(cached) and "×" not in speedup_html(cached)
