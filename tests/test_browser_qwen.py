"""Qwen2.5-VL in a real browser: on both sides (two different methods, two turns on the KV cache, the
overlay on its merged cells and the difference view), and against LLaVA-OneVision.  Screenshots go to
artifacts/."""

import re
from pathlib import Path

import pytest
from app_helpers import ARTIFACTS
from test_browser_methods import ask_turns, choose, wait_for_text

from app.models import TINY_QWEN_LABEL

pytestmark = pytest.mark.browser
IMAGE = Path(__file__).resolve().parents[1] / "assets" / "house_and_car.png"  # 672x672: 24x24 merged cells
ONEVISION = "Tiny LLaVA-OneVision (random weights)"


def test_two_qwen_sides_two_methods_two_turns(page):
    for side in ("left", "right"):
        choose(page, f"{side}-model", TINY_QWEN_LABEL)
        wait_for_text(page, f"{side}-header", "Qwen2.5-VL")
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "left-method", "DivPrune")
    wait_for_text(page, "left-header", "With DivPrune\n")
    choose(page, "right-method", "VisionZip")
    wait_for_text(page, "right-header", "With VisionZip\n")
    wait_for_text(page, "right-header", "128 visual tokens")
    page.locator("#keep-cache input").check()
    ask_turns(page, ["Is there a car in this picture?", "What is in the top-left corner?"])
    for side in ("left", "right"):
        later = page.locator(f"#{side}-chat [data-testid='bot']").all_inner_texts()[-1]
        prefilled = int(re.search(r"prefilled ([\d,]+) tokens, ([\d,]+) reused", later).group(1).replace(",", ""))
        assert prefilled < 60  # the second turn built on the side's cache
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "24x24 merged cells")
    page.locator("#overlay img").wait_for()
    page.locator("#heatmap img").wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser_qwen_overlay.png"), full_page=True)
    page.get_by_role("tab", name="Where the sides differ").click()
    page.locator("#compare").click()
    wait_for_text(page, "difference-table", "Jaccard")
    page.locator("#difference img").wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser_qwen_difference.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors


def test_a_qwen_side_against_a_onevision_side_for_two_turns(page):
    """Qwen2.5-VL (VisionZip, on its merged cells) on the right, LLaVA-OneVision (DivPrune, on SigLIP's
    tiles) on the left: two turns, each side's overlay drawn on its own grid, screenshots."""
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "left-model", ONEVISION)
    wait_for_text(page, "left-header", "LLaVA-OneVision")
    choose(page, "left-method", "DivPrune")
    wait_for_text(page, "left-header", "With DivPrune\n")
    wait_for_text(page, "left-header", "320 visual tokens")  # per image, on OneVision's stock packing
    choose(page, "right-model", TINY_QWEN_LABEL)
    wait_for_text(page, "right-header", "Qwen2.5-VL")
    choose(page, "right-method", "VisionZip")
    wait_for_text(page, "right-header", "With VisionZip\n")
    wait_for_text(page, "right-header", "128 visual tokens")  # of the picture's 24x24 merged cells
    ask_turns(page, ["Is there a car in this picture?", "What is in the top-left corner?"])
    page.get_by_role("tab", name="What the method keeps").click()  # the right side (Qwen2.5-VL) is drawn
    wait_for_text(page, "overlay-legend", f"Right side: {TINY_QWEN_LABEL}")
    wait_for_text(page, "overlay-legend", "24x24 merged cells")
    page.locator("#overlay img").wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser_qwen_vs_onevision_qwen_overlay.png"), full_page=True)
    assert "highest attention received" in page.locator("#overlay-legend").inner_text()  # no CLS to name
    drawn = page.locator("#overlay img").get_attribute("src")
    choose(page, "right-method", "Full")  # the overlay then draws the left side's choice on SigLIP's tiles
    wait_for_text(page, "overlay-legend", f"Left side: {ONEVISION}")
    wait_for_text(page, "overlay-legend", "crop 1")
    page.wait_for_function("old => document.querySelector('#overlay img')?.src !== old", arg=drawn)
    page.screenshot(path=str(ARTIFACTS / "browser_qwen_vs_onevision_onevision_overlay.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
