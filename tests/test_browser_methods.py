"""Every method's choice drawn on the picture in a real browser, and the difference view when both
sides reduce.  Screenshots go to artifacts/ for a human to look at."""

import re
from pathlib import Path

import pytest
from app_helpers import ARTIFACTS

import visionzip

pytestmark = pytest.mark.browser
IMAGE = Path(__file__).resolve().parents[1] / "assets" / "house_and_car.png"  # 672x672: 5 tiles


def choose(page, element_id: str, option: str) -> None:
    """Pick `option`; again if an update of the dropdown (its choices are re-sent after every mode
    change) swallowed the click, which a loaded machine makes likelier."""
    box = page.locator(f"#{element_id} input")
    for _ in range(3):
        box.click()
        page.locator(f"#{element_id} li[role=option][aria-label='{option}']").click()
        try:
            page.wait_for_function(
                "([id, v]) => document.querySelector(id).value === v",
                arg=[f"#{element_id} input", option],
                timeout=5000,
            )
            return
        except Exception:
            continue
    raise AssertionError(f"{element_id} did not take {option!r}")


def wait_for_text(page, element_id: str, text: str) -> None:
    page.wait_for_function(
        "([id, text]) => document.querySelector(id).innerText.includes(text)", arg=[f"#{element_id}", text]
    )


def ask_turns(page, questions: list[str]) -> None:
    """Ask each question in turn, waiting until both sides have answered it (their stats are shown)."""
    for turn, question in enumerate(questions, start=1):
        page.fill("#message textarea", question)
        page.keyboard.press("Enter")
        page.wait_for_function(
            """n => ['left', 'right'].every(side => [...document.querySelectorAll(`#${side}-chat [data-testid='bot']`)]
                  .filter(m => m.innerText.includes(' visual + ')).length >= n)""",
            arg=turn,
        )


def test_each_methods_overlay_and_where_two_methods_differ(page):
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "left-header", "2,928 visual tokens")
    page.get_by_role("tab", name="What the method keeps").click()
    for method in visionzip.METHODS.values():
        choose(page, "right-method", method.title)
        wait_for_text(page, "right-header", f"With {method.title}\n")
        if method.reads_text:  # it chooses for a question: nothing to draw before one is asked
            wait_for_text(page, "overlay-legend", f"{method.title} chooses by the question")
            continue
        wait_for_text(page, "overlay-legend", f"under {method.title}")
        page.locator("#overlay img").wait_for()
        page.locator("#overlay").screenshot(path=str(ARTIFACTS / f"overlay_{method.name}.png"))

    choose(page, "right-method", "VisionZip")
    wait_for_text(page, "right-header", "With VisionZip\n")
    choose(page, "left-method", "DivPrune")
    wait_for_text(page, "left-header", "320 visual tokens")
    page.get_by_role("tab", name="Where the sides differ").click()
    wait_for_text(page, "difference-table", "Jaccard")
    page.locator("#difference img").wait_for()
    assert "all" in page.locator("#difference-table").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_difference.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors


def test_three_cached_turns_freeze_cdpruners_choice_on_the_page(page):
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "left-method", "VisionZip")
    wait_for_text(page, "left-header", "With VisionZip\n")
    choose(page, "right-method", "CDPruner")
    wait_for_text(page, "right-header", "With CDPruner\n")
    page.locator("#keep-cache input").check()
    questions = ["Is there a car in this picture?", "What is in the top-left corner?", "And the bottom right?"]
    ask_turns(page, questions)
    for side in ("left", "right"):
        answers = page.locator(f"#{side}-chat [data-testid='bot']").all_inner_texts()
        assert "reused from the KV cache" not in answers[-3]
        for later in answers[-2:]:
            prefilled = int(re.search(r"prefilled ([\d,]+) tokens, ([\d,]+) reused", later).group(1).replace(",", ""))
            assert prefilled < 60  # only the new text: the image and the first turns come from the cache
    assert "frozen in the KV cache" in page.locator("#right-chat [data-testid='bot']").all_inner_texts()[-1]
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "frozen in the KV cache")
    page.screenshot(path=str(ARTIFACTS / "browser_cached_turns.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()  # no handler along the way failed
    assert not errors, errors
