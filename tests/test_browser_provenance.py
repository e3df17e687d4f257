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


def upload_with_methods(page, methods: dict[str, str]) -> None:
    """The example image, then each side's method (by title), each change seen in the side's header."""
    page.set_input_files("#media input[type=file]", str(IMAGE))
    wait_for_text(page, "media-info", "672x672")
    for side, title in methods.items():
        choose(page, f"{side}-method", title)
        wait_for_text(page, f"{side}-header", f"With {title}\n")


def test_a_switched_side_never_shows_the_old_choice_under_the_new_name(page):
    upload_with_methods(page, {"left": "VisionZip", "right": "CDPruner"})
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


def test_the_budget_slider_previews_a_budget_on_release(page):
    """Issue 19, item 4, in the browser: the slider's release redraws the overlay and the count."""
    upload_with_methods(page, {"right": "VisionZip"})
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "under VisionZip 54+10/tile")
    slider = page.locator("#scrub input[type=range]")
    slider.wait_for()
    slider.evaluate(
        """el => { el.value = 100; el.dispatchEvent(new Event('input', {bubbles: true}));
                   el.dispatchEvent(new PointerEvent('pointerup', {bubbles: true})); }"""
    )
    wait_for_text(page, "overlay-legend", "Preview at VisionZip 84+16/tile")
    wait_for_text(page, "scrub-info", "500 visual tokens")
    assert "under VisionZip 84+16/tile" in page.locator("#overlay-legend").inner_text()
    page.locator("#overlay img").wait_for(state="attached")
    page.screenshot(path=str(ARTIFACTS / "browser_budget_slider.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
