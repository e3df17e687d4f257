"""Issue 23 in a real browser: a turn under CDPruner, then the right side switched to FastV and to
VisionZip without a new turn; the overlay and the difference view name what chose what they show."""

from pathlib import Path

import pytest
from app_helpers import ARTIFACTS
from test_browser_methods import choose, wait_for_text

pytestmark = pytest.mark.browser
IMAGE = Path(__file__).resolve().parents[1] / "assets" / "house_and_car.png"  # 672x672: 5 tiles


def legend_and_table(page) -> tuple[str, str]:
    page.get_by_role("tab", name="What the method keeps").click()
    legend = page.locator("#overlay-legend").inner_text()
    page.get_by_role("tab", name="Where the sides differ").click()
    return legend, page.locator("#difference-table").inner_text()


def test_a_switched_side_never_shows_the_old_choice_under_the_new_name(page):
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "left-method", "VisionZip")
    wait_for_text(page, "left-header", "With VisionZip\n")
    choose(page, "right-method", "CDPruner")
    wait_for_text(page, "right-header", "With CDPruner\n")
    page.fill("#message textarea", "What colour is the car?")
    page.keyboard.press("Enter")
    page.wait_for_function(
        """() => ['left', 'right'].every(side => [...document.querySelectorAll(`#${side}-chat [data-testid='bot']`)]
              .some(m => m.innerText.includes(' visual + ')))"""
    )
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "Chosen on turn 1")
    assert "under CDPruner 64/tile" in page.locator("#overlay-legend").inner_text()

    choose(page, "right-method", "FastV")  # no new turn
    wait_for_text(page, "right-header", "With FastV\n")
    wait_for_text(page, "overlay-legend", "Ask a question to see FastV's choice")
    page.get_by_role("tab", name="Where the sides differ").click()
    wait_for_text(page, "difference-table", "Ask a question to see FastV's choice")
    legend, table = legend_and_table(page)
    for text in (legend, table):
        assert text.count("CDPruner") == 1 and "which ran CDPruner 64/tile" in text  # only as what turn 1 ran
        assert "visual tokens for this image" not in text and "Jaccard" not in text
    assert page.locator("#overlay img").count() == 0 and page.locator("#difference img").count() == 0
    page.screenshot(path=str(ARTIFACTS / "browser_switch_to_fastv.png"), full_page=True)

    choose(page, "right-method", "VisionZip")  # text-agnostic: its own choice now, no question needed
    wait_for_text(page, "right-header", "With VisionZip\n")
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "under VisionZip 54+10/tile")
    page.get_by_role("tab", name="Where the sides differ").click()
    wait_for_text(page, "difference-table", "VisionZip 54+10/tile) only")
    legend, table = legend_and_table(page)
    assert "Right side: Tiny" in legend and "VisionZip 54+10/tile." in legend and "Settings changed" in legend
    assert "CDPruner" not in legend.split("Right side:")[1] and "FastV" not in legend.split("Right side:")[1]
    overlap = table[table.index("Patches each side feeds") :]  # after the note of what turn 1 ran
    assert "Jaccard" in overlap and "CDPruner" not in overlap and "FastV" not in overlap
    page.locator("#overlay img").wait_for(state="attached")
    page.screenshot(path=str(ARTIFACTS / "browser_switch_to_visionzip.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
