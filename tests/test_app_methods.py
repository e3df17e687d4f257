"""Two methods side by side through the API, on the tiny offline LLaVA-NeXT: DivPrune against
VisionZip at one count over three turns, the difference view and the quality signal, each checked
against a computation written here from the two sides' own outputs (never from the app's helpers)."""

import math

import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from app.models import TINY_LABEL

QUESTIONS = ["Is there a car in the picture?", "What does the sign say?", "And the top left corner?"]


@pytest.fixture(scope="module")
def max_new_tokens():
    return 4


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(672, 672, seed=5).save(path)
    return path


def by_side(stats: list[dict], turn: int) -> dict[str, dict]:
    return {record["side"]: record for record in stats if record["turn"] == turn}


def selection(handle, processor, image: Image.Image, **use):
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(), handle.use(**use) as call:
        handle.base.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[image.height, image.width]]))
    return call.selection[0]


def test_divprune_and_visionzip_at_one_count_over_three_turns(client, picture, registry):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    client.predict(left_mode="DivPrune 320", left_method="DivPrune", right_mode="VisionZip 320", api_name="/set_mode")
    for number, question in enumerate(QUESTIONS, start=1):
        left, right, stats, summary = client.predict(question, api_name="/ask")
        sides = by_side(stats, number)
        assert sides["left"]["error"] is None and sides["right"]["error"] is None
        assert sides["left"]["mode"] == "DivPrune 320/image" and sides["right"]["mode"] == "VisionZip 54+10/tile"
        assert sides["left"]["visual_tokens"] == sides["right"]["visual_tokens"] == 5 * 64
        assert len(left) == len(right) == 2 * number
        assert "320 vs 320 visual tokens (equal counts)" in summary

    # the difference view, recomputed from the two methods' own selections on the same model
    table, _, rows = client.predict(api_name="/compare")
    loaded = registry.get(TINY_LABEL)
    image = Image.open(picture).convert("RGB")
    left = selection(loaded.handle, loaded.processor, image, enabled=True, method="divprune", tokens=320)
    right = selection(loaded.handle, loaded.processor, image, enabled=True, dominant=54, contextual=10)
    total_both = total_union = 0
    for tile, row in enumerate(rows[:-1]):
        kept_left, kept_right = set(left.tiles[tile].kept.tolist()), set(right.tiles[tile].kept.tolist())
        assert (row["left_only"], row["right_only"], row["both"]) == (
            len(kept_left - kept_right),
            len(kept_right - kept_left),
            len(kept_left & kept_right),
        )
        total_both, total_union = total_both + len(kept_left & kept_right), total_union + len(kept_left | kept_right)
    assert len(rows) == len(left.tiles) + 1 and rows[-1]["tile"] == "all"
    assert rows[-1]["jaccard"] == pytest.approx(total_both / total_union)
    assert f"{rows[-1]['jaccard']:.2f}" in table


def test_match_sets_one_side_to_the_other_sides_count(client, picture):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    client.predict(left_mode="Random 320", left_method="Random", right_mode="VisionZip 160", api_name="/set_mode")
    client.predict(api_name="/match_left")
    _, _, stats, summary = client.predict("What is in the picture?", api_name="/ask")
    sides = by_side(stats, 1)
    assert sides["left"]["visual_tokens"] == sides["right"]["visual_tokens"] == 5 * 32
    assert sides["left"]["mode"].startswith("Random 32/tile")


def test_kl_to_the_full_model_equals_a_direct_computation(client, picture, registry):
    client.predict(handle_file(str(picture)), api_name="/set_media")
    client.predict(left_mode="Full", left_method="Full", right_mode="VisionZip 160", api_name="/set_mode")
    _, _, stats, _ = client.predict(QUESTIONS[0], api_name="/ask")
    sides = by_side(stats, 1)
    assert sides["left"]["kl_to_full"] is None and sides["right"]["quality_reference"] == "the full side, same prompt"

    loaded = registry.get(TINY_LABEL)
    processor, model, handle = loaded.processor, loaded.model, loaded.handle
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(picture).convert("RGB")
    logprobs = {}
    for name, use in (("full", dict(enabled=False)), ("reduced", dict(enabled=True, dominant=27, contextual=5))):
        with torch.inference_mode(), handle.use(**use):
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            logits = model(**inputs).logits[0, -1].double()
        logprobs[name] = logits.log_softmax(-1)
    expected = sum(
        math.exp(p) * (p - q) for p, q in zip(logprobs["full"].tolist(), logprobs["reduced"].tolist(), strict=True)
    )
    assert sides["right"]["kl_to_full"] == pytest.approx(expected, rel=1e-3, abs=1e-6)

    # the quality check: on turn 2 the histories differ, so a reference prefill gives the KL
    client.predict(True, api_name="/set_quality")
    _, _, stats, _ = client.predict(QUESTIONS[1], api_name="/ask")
    right = by_side(stats, 2)["right"]
    assert right["kl_to_full"] is not None and right["kl_to_full"] >= 0
    assert right["full_answer_logprob"] < 0 and right["full_answer_ppl"] == pytest.approx(
        math.exp(-right["full_answer_logprob"])
    )
