"""Budget scrubbing (issue 19, item 4): the choice at each budget, from one tower run per image, is
the choice a fresh full overlay run makes at that budget, and the tower runs once per image."""

import pytest
import torch

import visionzip
from app import scrub
from app.handlers import Handlers, new_conversation
from app.models import TINY_15_LABEL, TINY_LABEL, TINY_QWEN_LABEL, ModelRegistry
from app.modes import default_mode, use_mode
from app.ui import OVERLAY, SCRUB
from visionzip.cost import prefill_flops

AGNOSTIC = [method for method in visionzip.METHODS.values() if not method.reads_text]
ONEVISION = "Tiny LLaVA-OneVision (random weights)"  # SigLIP tiles of 27x27 patches, no CLS token


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(device="cpu")


@pytest.fixture(scope="module")
def handlers(registry, tmp_path_factory):
    return Handlers(registry, max_new_tokens=2, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture(scope="module")
def image():
    from conftest import random_image

    return random_image(480, 640, seed=11)  # a 2x2 grid with padding: 5 tiles


class TowerCalls(list):
    """Each forward of the model's vision tower (Qwen2.5-VL's `visual`) appends to this list, until `remove_hook()`."""

    def __init__(self, loaded) -> None:
        super().__init__()
        base = loaded.model.model
        tower = base.visual if hasattr(base, "visual") else base.vision_tower
        self.remove_hook = tower.register_forward_hook(lambda *args: self.append(1)).remove


def fresh_selection(loaded, image, mode) -> visionzip.ImageSelection:
    """The full route, written here: the model's get_image_features under the mode, tower included."""
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(), use_mode(loaded, mode) as call:
        loaded.model.model.get_image_features(
            pixel_values=pixels, image_sizes=torch.tensor([[image.height, image.width]])
        )
    return call.selection[0]


def generated_selection(loaded, image, mode) -> visionzip.ImageSelection:
    """What a real generate() keeps under `mode`: the processor's prompt, the tower, the method and one new
    token; the call's own record (Qwen2.5-VL: its cells, whose M-RoPE positions the kept tokens keep)."""
    content = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    with torch.inference_mode(), use_mode(loaded, mode) as call:
        inputs = loaded.processor(images=[image], text=text, return_tensors="pt")
        loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    placeholders = int((inputs["input_ids"] == loaded.model.config.image_token_id).sum())
    [selection] = call.selection
    assert placeholders == selection.num_tokens  # the prompt held as many tokens as the method produced
    return selection


def same_choice(one: visionzip.ImageSelection, other: visionzip.ImageSelection) -> bool:
    fields = ("kept", "targets", "merged", "merged_into")
    return (
        len(one.tiles) == len(other.tiles)
        and (one.num_tokens, one.method, one.budget, one.grid)
        == (other.num_tokens, other.method, other.budget, other.grid)
        and all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in zip(one.tiles, other.tiles) for f in fields)
    )


@pytest.mark.parametrize("label", [TINY_LABEL, TINY_15_LABEL, ONEVISION, TINY_QWEN_LABEL])
@pytest.mark.parametrize("method", AGNOSTIC, ids=[m.name for m in AGNOSTIC])
def test_each_budget_keeps_what_a_full_run_keeps_and_the_tower_runs_once(registry, image, label, method):
    """At several budgets the slider's choice, from one tower run, is what a full run at that budget keeps (on
    Qwen2.5-VL, whose budgets count an image's merged cells, a real generate())."""
    loaded = registry.get(label)
    qwen = label == TINY_QWEN_LABEL
    mode = default_mode(method.name, loaded.family)
    size = (image.height, image.width)
    values = scrub.budget_values(loaded, mode, size)
    picks = sorted({values[0], values[1], values[len(values) // 3], values[len(values) // 2], values[-1]})
    calls = TowerCalls(loaded)
    try:
        cache = scrub.run_tower(loaded, image)
        results = [scrub.scrub(loaded, cache, mode, value, text_tokens=20) for value in picks]
        assert len(calls) == 1  # once for the image, whatever the budgets
    finally:
        calls.remove_hook()
    if qwen:
        with loaded.handle.use(enabled=False):
            assert values[0] == 1 and values[-1] == loaded.handle.num_image_tokens(size)  # 1 cell to every cell
    for value, result in zip(picks, results):
        assert scrub.budget_value(loaded, result.mode) == value  # every value offered is one the method allows
        real = (generated_selection if qwen else fresh_selection)(loaded, image, result.mode)
        assert same_choice(result.selection, real), (method.name, value)
        with use_mode(loaded, result.mode):
            assert result.visual_tokens == loaded.handle.num_image_tokens(size)
        text = loaded.model.config.text_config
        assert result.prefill_gflop == pytest.approx(prefill_flops(text, result.visual_tokens + 20) / 1e9)
        assert result.stock_prefill_gflop == pytest.approx(prefill_flops(text, result.stock_tokens + 20) / 1e9)
        if qwen:  # per image, no tiles; pooling offers only the counts its square windows make
            assert "/image" in result.mode.label and "/tile" not in result.mode.label
            assert result.selection.budget == result.mode.label  # the library's record says what the page says
            assert method.name != "pool" or result.visual_tokens == value


def test_pool_offers_only_the_window_sizes(registry, image):
    loaded = registry.get(TINY_LABEL)
    mode = default_mode("pool", loaded.family)
    assert scrub.budget_values(loaded, mode, (image.height, image.width)) == [1, 4, 9, 16, 36, 64, 144, 576]
    assert scrub.mode_at(loaded, mode, (image.height, image.width), 55).tokens == 64  # the nearest it allows


def test_a_siglip_tile_offers_every_budget_up_to_its_729_patches(registry, image):
    """No CLS token on a SigLIP tile: a per-tile budget runs 1..729 patches, pooling every window that
    divides 27, and a per-image one every row of the stock packed image."""
    loaded = registry.get(ONEVISION)
    size = (image.height, image.width)
    assert scrub.budget_values(loaded, default_mode("visionzip", loaded.family), size) == list(range(1, 730))
    assert scrub.budget_values(loaded, default_mode("pool", loaded.family), size) == [1, 9, 81, 729]
    with loaded.handle.use(enabled=False):
        stock = loaded.handle.num_image_tokens(size)
    assert scrub.budget_values(loaded, default_mode("divprune", loaded.family), size)[-1] == stock


def test_slider_redraws_through_the_handler_with_one_tower_run(handlers, tmp_path):
    from conftest import random_image

    path = tmp_path / "picture.png"
    random_image(672, 672, seed=4).save(path)  # 2,928 stock visual tokens
    conversation = handlers.set_media({"path": str(path)}, new_conversation(handlers.registry))["state"]
    loaded = handlers.registry.get(TINY_LABEL)
    calls = TowerCalls(loaded)
    try:
        shown = handlers.refresh_overlay(conversation, "all")  # the right side: VisionZip 320
        assert set(shown) <= set(OVERLAY) and shown["scrub"].visible and shown["scrub"].value == 64
        for value in (12, 200, 64):
            redrawn = handlers.scrub_overlay(conversation, value, "all")
            assert set(redrawn) <= set(SCRUB)
        switched = handlers.set_mode(
            conversation, "Full", 54, 10, "DivPrune 320", 54, 10, False, False, None, "DivPrune"
        )
        divprune = handlers.refresh_overlay(switched["state"], "all")
        assert divprune["scrub"].maximum == 2928 and divprune["scrub"].value == 320
        redrawn = handlers.scrub_overlay(switched["state"], 100, "all")
        assert len(calls) == 1  # one image, one model: one tower run for every method and budget
    finally:
        calls.remove_hook()
    assert "**100 visual tokens**" in redrawn["scrub_info"] and "of 2,928" in redrawn["scrub_info"]
    assert "Preview at DivPrune 100/image" in redrawn["legend"] and redrawn["overlay"] is not None

    fastv = handlers.set_mode(conversation, "Full", 54, 10, "FastV 320", 54, 10, False, False, None, "FastV")
    waiting = handlers.refresh_overlay(fastv["state"], "all")
    assert not waiting["scrub"].visible and "needs a question" in waiting["scrub_info"]


def test_the_slider_endpoint_previews_a_budget(client, tmp_path):
    from conftest import random_image
    from gradio_client import handle_file

    path = tmp_path / "picture.png"
    random_image(672, 672, seed=6).save(path)
    client.predict(handle_file(str(path)), api_name="/set_media")  # the right side: VisionZip 320
    legend, picture, info = client.predict(100, "all", api_name="/scrub")
    assert "Preview at VisionZip 84+16/tile" in legend and "under VisionZip 84+16/tile" in legend
    assert picture is not None and "**500 visual tokens**" in info and "of 2,928" in info
