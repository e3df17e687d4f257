"""Issue 23: what the overlay and the difference view show is named by what chose it.  For every pair
(method before, method after) over the registry, through the handlers with no server: the right side
answers a turn under one method, is switched to another without a new turn, and the overlay and the
difference view are opened.  The legend's header, its total line and the side's header must name one
method and budget, and the table's counts (and the overlap with the left side's patches) must be those
of a fresh run of that method at that budget, from the tower, written here."""

import re

import pytest
import torch

import visionzip
from app.conversation import load_media
from app.handlers import Handlers, new_conversation
from app.models import ModelRegistry
from app.modes import mode_choices, use_mode

METHODS = list(visionzip.METHODS.values())
LEFT = ("VisionZip 320", 54, 10)  # the left side reduces too, so the difference view has two choices
QUESTION = "What colour is the car?"
ONEVISION = "Tiny LLaVA-OneVision (random weights)"  # SigLIP tiles: 27x27 patches, no CLS token
# (before, after) on two OneVision sides: the switch (a text-dependent method away and back; CDPruner
# refuses SigLIP towers, so FastV), a method kept, each budget rule (per tile, pooled, per image)
ONEVISION_PAIRS = [
    ("fastv", "visionzip"),
    ("visionzip", "fastv"),
    ("fastv", "fastv"),
    ("fastv", "divprune"),
    ("visionzip", "pool"),
    ("divprune", "vispruner"),
    ("visionzip", "divprune"),
]


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    return Handlers(ModelRegistry(device="cpu"), max_new_tokens=2, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    random_image(672, 672, seed=5).save(path)
    return str(path)


def switch(handlers: Handlers, conversation, method: visionzip.Method, family: str = "llava_next"):
    """The right side to `method`'s second preset (320 on LLaVA-NeXT), as the page's dropdowns send it."""
    preset = mode_choices(family, method.name)[1]
    return handlers.set_mode(conversation, *LEFT, preset, 54, 10, False, False, "VisionZip", method.title)


def turns_by_method(handlers: Handlers, picture: str, model: str | None = None, family: str = "llava_next"):
    """The conversation after one turn with the right side on each method (made on first use), both sides
    on `model` (None: the default model)."""
    made = {}

    def conversation_for(method: visionzip.Method):
        if method.name not in made:
            start = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
            if model is not None:
                start = handlers.set_model(start, model, model, progress=lambda *a, **k: None)["state"]
            start = switch(handlers, start, method, family)["state"]
            made[method.name] = list(handlers.ask(QUESTION, start))[-1]["state"]
            assert not any(stats.error for stats in made[method.name].turns[-1].stats.values())
        return made[method.name]

    return conversation_for


@pytest.fixture(scope="module")
def after_a_turn(handlers, picture):
    return turns_by_method(handlers, picture)


@pytest.fixture(scope="module")
def after_a_onevision_turn(handlers, picture):
    return turns_by_method(handlers, picture, ONEVISION, "llava_onevision")


def fresh_selection(handlers: Handlers, conversation, side: str, text: str | None) -> visionzip.ImageSelection:
    """The side's method at its budget on the picture, from the vision tower alone, run here."""
    config = conversation.sides[side]
    loaded = handlers.registry.get(config.model)
    image = load_media(conversation)
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(), use_mode(loaded, config.mode, text) as call:
        loaded.model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([image.size[::-1]]))
    return call.selection[0]


def kept_column(legend: str) -> dict[str, int]:
    """The legend table's kept-patch count per tile (a "+ 1" for CLS left out)."""
    rows = [line.split("|") for line in legend.splitlines() if re.match(r"\| (base|crop \d+|tile) \| \d", line)]
    return {cells[1].strip(): int(cells[2].strip().split()[0]) for cells in rows}


def overlap_rows(left: visionzip.ImageSelection, right: visionzip.ImageSelection) -> list[tuple[int, int, int]]:
    """(left only, right only, both) kept patches per tile, then over all tiles."""
    rows = []
    for one, other in zip(left.tiles, right.tiles):
        a, b = set(one.kept.tolist()), set(other.kept.tolist())
        rows.append((len(a - b), len(b - a), len(a & b)))
    return rows + [tuple(sum(column) for column in zip(*rows))]


@pytest.mark.parametrize("after", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("before", METHODS, ids=[m.name for m in METHODS])
def test_overlay_and_difference_name_the_method_that_chose(handlers, after_a_turn, before, after):
    assert_named_by_what_chose(handlers, after_a_turn(before), before, after, "llava_next")


@pytest.mark.parametrize(("before", "after"), ONEVISION_PAIRS, ids=["-".join(pair) for pair in ONEVISION_PAIRS])
def test_a_onevision_side_is_named_by_the_method_that_chose(handlers, after_a_onevision_turn, before, after):
    before, after = visionzip.get_method(before), visionzip.get_method(after)
    turned = after_a_onevision_turn(before)
    assert turned.sides["right"].model == ONEVISION and turned.turns[-1].selections["right"][0].tiles[0].side == 27
    assert_named_by_what_chose(handlers, turned, before, after, "llava_onevision")


def assert_named_by_what_chose(handlers: Handlers, turned, before: visionzip.Method, after: visionzip.Method, family):
    """Switch the right side from `before` (its turn) to `after`, open the overlay and the difference view,
    and check that every label names one method and budget, and the counts are that method's."""
    switched = switch(handlers, turned, after, family)
    conversation, mode = switched["state"], switched["state"].sides["right"].mode
    assert mode.method == after.name and mode.label in switched["right_header"]
    shown = handlers.refresh_overlay(conversation, "all")
    difference = handlers.compare_sides(conversation)
    legend, table = shown["legend"], difference["difference_table"]

    if after.reads_text and after.stage == "language model" and before.name != after.name:
        # FastV chooses inside the language model: it cannot choose without a turn, and shows nothing else
        for text in (legend, table):
            assert f"Ask a question to see {after.title}'s choice" in text
            assert "Chosen on turn" not in text and "visual tokens for this image" not in text
        assert shown["overlay"] is None and difference["difference_image"] is None
        return

    header = re.search(r"\*\*Right side\*\*: (.+?), (.+)\.\n", legend)
    total = re.search(r"visual tokens\*\* for this image under (.+?) \(all tiles", legend)
    assert header and total, legend
    assert header.group(2) == mode.label and total.group(1).startswith(mode.settings().describe())
    if after.reads_text and before.name == after.name:  # its own turn's choice, said to be that turn's
        expected = conversation.turns[-1].selections["right"][0]
        assert f"Chosen on turn 1 for **this question**: “{QUESTION}”" in legend
    else:
        expected = fresh_selection(handlers, conversation, "right", QUESTION if after.reads_text else None)
        if after.reads_text:
            assert f"Chosen now by {mode.label} for turn 1's question: “{QUESTION}”" in legend
    if before.name != after.name:
        assert "Settings changed since turn 1" in legend
    names = ["base"] + [f"crop {k}" for k in range(1, len(expected.tiles))]
    assert kept_column(legend) == {name: len(tile.kept) for name, tile in zip(names, expected.tiles)}

    left = fresh_selection(handlers, conversation, "left", None)
    assert f"right ({conversation.sides['right'].model}, {mode.label})" in table
    measured = [(row["left_only"], row["right_only"], row["both"]) for row in difference["difference_json"]]
    assert measured == overlap_rows(left, expected)


def test_a_turn_kept_without_its_record_is_named_by_its_stats(handlers, after_a_turn):
    """A conversation saved before turns recorded what chose (a recording): the turn's stats name it."""
    from dataclasses import replace

    cdpruner = visionzip.get_method("cdpruner")
    turned = after_a_turn(cdpruner)
    saved = replace(turned, turns=[replace(turn, chosen_by={}) for turn in turned.turns])
    legend = handlers.refresh_overlay(saved, "all")["legend"]
    assert f"Chosen on turn 1 for **this question**: “{QUESTION}”" in legend
    bare = handlers.overlay_views(saved.turns[-1].selections["right"][0], saved, "all")[
        "legend"
    ]  # as a replay passes it
    assert f"Chosen on turn 1 for **this question**: “{QUESTION}”" in bare and "CDPruner 64/tile." in bare
    fastv = switch(handlers, saved, visionzip.get_method("fastv"))["state"]
    assert "Ask a question to see FastV's choice" in handlers.refresh_overlay(fastv, "all")["legend"]
