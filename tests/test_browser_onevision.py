"""LLaVA-OneVision in a real browser: the right side on the tiny OneVision (VisionZip), the left on the
tiny LLaVA-NeXT (DivPrune), two turns, and what each keeps drawn on SigLIP's and CLIP's own grids.
Screenshots go to artifacts/ for a human to look at."""

from pathlib import Path

import pytest
from app_helpers import ARTIFACTS
from test_browser_methods import ask_turns, choose, wait_for_text

pytestmark = pytest.mark.browser
IMAGE = Path(__file__).resolve().parents[1] / "assets" / "house_and_car.png"  # 672x672: 5 tiles on either family
ONEVISION = "Tiny LLaVA-OneVision (random weights)"


def test_a_onevision_side_against_a_next_side_for_two_turns(page):
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "right-model", ONEVISION)
    wait_for_text(page, "right-header", "With VisionZip\n")
    wait_for_text(page, "right-header", "320 visual tokens")  # 5 SigLIP tiles x (54 + 10)
    choose(page, "left-method", "DivPrune")
    wait_for_text(page, "left-header", "320 visual tokens")
    ask_turns(page, ["Is there a car in this picture?", "What is in the top-left corner?"])
    page.get_by_role("tab", name="What the method keeps").click()  # the right side (VisionZip) is drawn
    wait_for_text(page, "overlay-legend", f"Right side: {ONEVISION}")
    wait_for_text(page, "overlay-legend", "under VisionZip")
    page.locator("#overlay img").wait_for()
    page.locator("#overlay").screenshot(path=str(ARTIFACTS / "onevision_overlay.png"))
    page.screenshot(path=str(ARTIFACTS / "browser_onevision_vs_next.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
