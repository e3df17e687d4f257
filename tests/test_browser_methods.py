"""Every method's choice drawn on the picture in a real browser, and the difference view when both
sides reduce.  Screenshots go to artifacts/ for a human to look at."""

from pathlib import Path

import pytest
from app_helpers import ARTIFACTS

import visionzip

pytestmark = pytest.mark.browser
IMAGE = Path(__file__).resolve().parents[1] / "assets" / "house_and_car.png"  # 672x672: 5 tiles


def choose(page, element_id: str, option: str) -> None:
    page.locator(f"#{element_id} input").click()
    page.locator(f"#{element_id} li[role=option][aria-label='{option}']").click()


def wait_for_text(page, element_id: str, text: str) -> None:
    page.wait_for_function(
        "([id, text]) => document.querySelector(id).innerText.includes(text)", arg=[f"#{element_id}", text]
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
