"""Every budget label says what the budget counts on the side's model family: per tile on LLaVA-NeXT's and
LLaVA-OneVision's anyres for a per-tile method, per image otherwise (LLaVA-1.5's one tile is the whole image;
Qwen2.5-VL has no tiles).  Checked for every registered method x family in the mode's label (headers,
legends, stats), the Budget presets' tooltip and the custom boxes, then on the page's handlers with a Qwen2.5-VL
side beside a LLaVA-NeXT one (the controls, the headers and the budget slider)."""

import pytest

import visionzip
from app.handlers import Handlers, new_conversation
from app.models import TINY_LABEL, TINY_QWEN_LABEL, ModelRegistry
from app.modes import CUSTOM, CUSTOM_TOKENS, budget_labels, make_mode, mode_choices, translate_mode

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl"]
TILED = {"llava_next", "llava_onevision"}  # anyres: an image is a base tile and its crops
CLIP = {"llava", "llava_next"}  # CLIP-L/14-336 tiles hold a CLS token, which VisionZip's dominant count includes
METHODS = list(visionzip.METHODS.values())


def expected_unit(method: visionzip.Method, family: str) -> str:
    return "per tile" if family in TILED and method.budget_rule == "per tile" else "per image"


def family_modes(method: visionzip.Method, family: str) -> list:
    """The method's presets on `family` and a custom budget, as the page's controls make them."""
    presets = [name for name in mode_choices(family, method.name) if name not in (CUSTOM, CUSTOM_TOKENS)]
    modes = [make_mode(name, family) for name in presets]
    if method.budget_kind == "dominant+contextual":
        modes.append(make_mode(CUSTOM, family, 20, 4))
    else:
        modes.append(make_mode(CUSTOM_TOKENS, family, tokens=modes[-1].tokens, method=method.name))
    return modes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_every_label_says_what_the_budget_counts_on_the_family(method, family):
    unit = expected_unit(method, family)
    suffix, wrong = ("/tile", "/image") if unit == "per tile" else ("/image", "/tile")
    for mode in family_modes(method, family):
        assert suffix in mode.label and wrong not in mode.label, (mode.name, mode.label)
        labels = budget_labels(family, mode)
        assert f"budget is {unit}" in labels["info"] and labels["tokens"] == f"Visual tokens {unit}"
        visionzip_unit = expected_unit(visionzip.get_method("visionzip"), family)
        cls = ", counts CLS" if family in CLIP else ""
        assert labels["dominant"] == f"Dominant tokens {visionzip_unit} (D{cls})"
        assert labels["contextual"] == f"Contextual tokens {visionzip_unit} (C)"
    for other in FAMILIES:  # a side that switches model: its mode's label follows the new family
        moved = translate_mode(family_modes(method, family)[0], other)
        other_suffix = "/tile" if expected_unit(method, other) == "per tile" else "/image"
        assert other_suffix in moved.label, (family, other, moved.label)


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    return Handlers(ModelRegistry(device="cpu"), max_new_tokens=2, stops=tmp_path_factory.mktemp("stops"))


def test_a_qwen_side_says_per_image_beside_a_llava_next_side_per_tile(handlers, tmp_path, make_image):
    conversation = new_conversation(handlers.registry)  # both sides on the tiny LLaVA-NeXT; right: VisionZip 320
    results = handlers.set_model(conversation, TINY_LABEL, TINY_QWEN_LABEL)
    conversation = results["state"]
    assert conversation.sides["right"].mode.label == "VisionZip 108+20/image"  # Qwen's preset of the same rank
    assert "VisionZip 108+20/image" in results["right_header"]
    assert "per image" in results["right_mode"].info and "per tile" not in results["right_mode"].info
    assert results["right_dominant"].label == "Dominant tokens per image (D)"
    assert results["left_dominant"].label == "Dominant tokens per tile (D, counts CLS)"
    switched = handlers.set_mode(
        conversation, "DivPrune 320", 54, 10, "Pool 64", 54, 10, False, False, "DivPrune", "Pool"
    )
    conversation = switched["state"]
    assert conversation.sides["right"].mode.label.startswith("Pool 64/image")
    assert switched["left_tokens"].label == "Visual tokens per image"  # DivPrune counts the whole image everywhere
    assert switched["right_tokens"].label == "Visual tokens per image"
    path = tmp_path / "picture.png"
    make_image(480, 640, seed=3).save(path)
    conversation = handlers.set_media({"path": str(path)}, conversation)["state"]
    shown = handlers.refresh_overlay(conversation, "all")  # the right side (Qwen, Pool) is the reducing one
    assert shown["scrub"].visible and "tokens per image" in shown["scrub"].label
    assert "not covered" not in shown["scrub_info"]
    redrawn = handlers.scrub_overlay(conversation, shown["scrub"].minimum, "all")
    assert "Preview at Pool 1/image" in redrawn["legend"] and "**1 visual tokens**" in redrawn["scrub_info"]
