"""A tuned projector in the app (issue 9): one side "VisionZip", the other "VisionZip + tuned
projector" at the same budget on the one shared model, driven with gradio_client; and projectors
that fit none of the app's models refused when it starts."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import expected_visual_tokens, served
from gradio_client import handle_file
from PIL import Image, ImageDraw
from transformers import AutoConfig, LlavaNextForConditionalGeneration

import visionzip
from app import charts
from app.models import TINY_15_LABEL, TINY_LABEL
from app.stats import TurnStats
from app.ui import build_demo
from visionzip import tune
from visionzip.tiny import load_tiny, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUDGET = visionzip.preset_budget("llava_next", 320)
QUESTIONS = ["What colour is the box?", "And where is it?"]
MAX_NEW_TOKENS = 6
WIDTH, HEIGHT = 640, 480


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tune.TrainResult:
    """A projector trained for a few steps on boxes drawn here, on an own tiny model copy, saved."""
    root = tmp_path_factory.mktemp("tuning")
    records = []
    for index, colour in enumerate(["red", "green", "blue", "yellow"]):
        image = Image.new("RGB", (336, 336), "white")
        ImageDraw.Draw(image).rectangle([30 + 40 * index, 60, 180 + 40 * index, 220], fill=colour)
        image.save(root / f"{index}.png")
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the box?"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]
        records.append({"id": f"box{index}", "image": f"{index}.png", "conversations": turns})
    (root / "data.json").write_text(json.dumps(records))
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=BUDGET.dominant, contextual=BUDGET.contextual)
    try:
        config = tune.TrainConfig(lr=0.05, max_steps=3, output=root / "run", progress=False)
        result = tune.train(handle, tune.read_dataset(root / "data.json"), config)
    finally:
        handle.remove()
    return result


@pytest.fixture(scope="module")
def tuned_path(trained) -> Path:
    return trained.path


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uploads") / "picture.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return path


def converse(model, processor, handle, projector, picture: Path) -> list[str]:
    """The two answers to QUESTIONS by greedy decoding, each turn re-reading the conversation, with
    the library alone: VisionZip 320 and `projector` (None: the model's own)."""
    image = Image.open(picture).convert("RGB")
    messages, answers = [], []
    for index, question in enumerate(QUESTIONS):
        content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        with torch.inference_mode(), handle.use(enabled=True), tune.use_projector(model, projector):
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(answer)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answers


@pytest.fixture(scope="module")
def reference(tuned_path, picture) -> dict[str, list[str]]:
    """Both conversations computed here on a fresh tiny model: with the tuned projector and without."""
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=BUDGET.dominant, contextual=BUDGET.contextual)
    try:
        tuned = tune.load_projector(model, tuned_path)
        return {
            "plain": converse(model, processor, handle, None, picture),
            "tuned": converse(model, processor, handle, tuned, picture),
        }
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def app_url(app_main, tuned_path):
    """The app as `python app.py --projector PATH` builds it."""
    registry = app_main.make_registry(app_main.parse_args(["--projector", str(tuned_path)]))
    with served(build_demo(registry, max_new_tokens=MAX_NEW_TOKENS)) as url:
        yield url


def by_side(stats: list[dict], turn: int) -> dict[str, dict]:
    return {record["side"]: record for record in stats if record["turn"] == turn}


def answers_and_notes(history: list[dict]) -> list[tuple[str, str]]:
    """(answer, the stats line under it) of each assistant message in a chat column."""
    notes = []
    for message in history:
        if message["role"] == "assistant":
            content = message["content"]
            text = content if isinstance(content, str) else " ".join(block.get("text", "") for block in content)
            notes.append(tuple(text.split("\n\n<small>", 1)))
    return notes


def test_tuned_and_plain_visionzip_side_by_side(client, picture, trained, reference, tiny_next):
    # the test can only tell which projector ran if the two answer differently
    assert reference["tuned"] != reference["plain"]
    client.predict(handle_file(str(picture)), api_name="/set_media")
    outputs = client.predict(
        left_mode="VisionZip 320", right_mode="VisionZip 320", right_tuned=True, api_name="/set_mode"
    )
    left_header, right_header = outputs[-2:]
    assert "tuned" not in left_header and "With VisionZip + tuned projector" in right_header

    plain = f"VisionZip {BUDGET.dominant}+{BUDGET.contextual}/tile"
    tuned = f"{plain} + tuned projector (trained at {BUDGET.dominant}+{BUDGET.contextual}, {trained.steps} steps)"
    _, reduced = expected_visual_tokens(tiny_next[1], WIDTH, HEIGHT)
    for number, question in enumerate(QUESTIONS, start=1):
        left, right, stats, summary = client.predict(question, api_name="/ask")
        sides = by_side(stats, number)
        for side, mode in (("left", plain), ("right", tuned)):
            assert sides[side]["error"] is None and sides[side]["new_tokens"] > 0
            assert sides[side]["visual_tokens"] == reduced
            assert sides[side]["mode"] == mode
        assert f"Turn {number}: {reduced:,} visual tokens on both sides (left: {plain}; right: {tuned})" in summary

    # each side answered as the library does with its projector: the right one tuned, the left one its own
    for history, expected, mode in ((left, reference["plain"], plain), (right, reference["tuned"], tuned)):
        answers = answers_and_notes(history)
        assert [answer for answer, _ in answers] == [text.strip() or "(empty answer)" for text in expected]
        assert all(note.startswith(mode + " · ") for _, note in answers)

    legend = {trace.name for trace in charts.tokens_chart([TurnStats(**record) for record in stats]).data}
    assert f"right: {tuned}: visual tokens" in legend and f"left: {plain}: visual tokens" in legend


def test_tuned_projector_only_where_the_model_has_one(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    client.predict(right_tuned=True, api_name="/set_mode")
    # the right side's new model has no tuned projector: it goes on with the model's own
    client.predict(TINY_LABEL, TINY_15_LABEL, api_name="/set_model")
    _, _, stats, _ = client.predict(QUESTIONS[0], api_name="/ask")
    right = by_side(stats, 1)["right"]
    assert right["error"] is None and right["model"] == TINY_15_LABEL and "tuned" not in right["mode"]
    with pytest.raises(Exception, match=re.escape(f"{TINY_15_LABEL} has no tuned projector")):
        client.predict(right_mode="VisionZip 128", right_tuned=True, api_name="/set_mode")


def test_projectors_that_fit_no_model_are_refused_at_start(tmp_path, app_main, trained):
    # a projector trained on what a local folder held then: a LLaVA-NeXT twice as wide
    folder = tmp_path / "local-llava-next"
    config = AutoConfig.from_pretrained(tiny_checkpoint("llava_next"))
    narrow = config.text_config.hidden_size
    config.text_config.hidden_size = 2 * narrow
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    wide = LlavaNextForConditionalGeneration.from_pretrained(folder)
    path = tune.save_projector(wide, tmp_path / "wide.safetensors", BUDGET, "sum", steps=0)

    def start(*argv: str) -> str:
        with pytest.raises(SystemExit) as refused:
            app_main.make_registry(app_main.parse_args(list(argv)))
        return str(refused.value)

    message = start("--projector", str(path))  # its base model is not among the app's models
    assert str(folder) in message and "none of this app's models" in message and "--model" in message

    shutil.rmtree(folder)  # the folder now holds the usual tiny model
    shutil.copytree(tiny_checkpoint("llava_next"), folder)
    message = start("--model", str(folder), "--projector", str(trained.path), "--projector", str(path))
    assert "wide.safetensors" in message and "hidden sizes" in message
    assert f"{2 * narrow}" in message and f"{narrow}" in message and "cannot run on this model" in message

    weights = next(folder.glob("*.safetensors"))  # a model's weights are no tuned projector
    assert "not a VisionZip tuned projector" in start("--projector", str(weights))
    assert "no such file" in start("--projector", str(tmp_path / "missing.safetensors"))


def test_projector_paths_from_the_environment(monkeypatch, app_main):
    monkeypatch.setenv("VISIONZIP_PROJECTOR", f"runs/a.safetensors, runs/b.safetensors{os.pathsep}runs/c.safetensors")
    assert app_main.parse_args([]).projector == ["runs/a.safetensors", "runs/b.safetensors", "runs/c.safetensors"]
    assert app_main.parse_args(["--projector", "runs/d.safetensors"]).projector == ["runs/d.safetensors"]
    monkeypatch.delenv("VISIONZIP_PROJECTOR")
    assert app_main.parse_args([]).projector == []
