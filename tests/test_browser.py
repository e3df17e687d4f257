"""The page in a real browser: upload, two questions, both columns answer with the processor's counts.

Screenshots go to artifacts/ (gitignored) for a human to look at.
"""

import json
import re
from pathlib import Path

import pytest
from app_helpers import ARTIFACTS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]

IMAGE = ROOT / "assets" / "house_and_car.png"  # 672x672
STATS = re.compile(
    r"([\d,]+) visual \+ ([\d,]+) text = ([\d,]+) tokens · vision ([\d.,]+) ms \+ LLM prefill [\d.,]+ ms = TTFT ([\d.,]+) ms"
)


def answered_turns(page, side: str) -> list[tuple[int, int, int, float, float]]:
    """(visual, text, context, vision ms, prefill ms) of each finished answer in a column."""
    texts = page.locator(f"#{side}-chat [data-testid='bot']").all_inner_texts()
    found = [STATS.search(" ".join(text.split())) for text in texts]
    return [
        tuple(int(g.replace(",", "")) for g in match.groups()[:3])
        + tuple(float(g.replace(",", "")) for g in match.groups()[3:])
        for match in found
        if match
    ]


def ask(page, question: str, turns: int) -> None:
    page.fill("#message textarea", question)
    page.keyboard.press("Enter")
    page.wait_for_function(
        """n => ['left', 'right'].every(side => [...document.querySelectorAll(`#${side}-chat [data-testid='bot']`)]
              .filter(m => m.innerText.includes(' visual + ')).length >= n)""",
        arg=turns,
    )


def test_two_questions_in_the_browser(page, tiny_next):
    _, processor = tiny_next  # stock counts straight from the processor, not from the app
    from PIL import Image
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from visionzip import preset_budget

    picture = Image.open(IMAGE).convert("RGB")
    stock = int(
        (processor(images=picture, text="<image>", return_tensors="pt")["input_ids"] == processor.image_token_id).sum()
    )
    tiles = image_size_to_num_patches(
        [picture.height, picture.width], processor.image_processor.image_grid_pinpoints, 336
    )
    reduced = tiles * preset_budget("llava_next", 320).per_tile
    assert (stock, reduced) == (2928, 5 * (54 + 10))

    assert page.locator("#banner").is_visible()  # the tiny model's answers are noise: the page says so
    page.set_input_files("#media input[type=file]", str(IMAGE))
    page.wait_for_function("document.querySelector('#media-info').innerText.includes('672x672')")
    page.wait_for_function("document.querySelector('#left-header').innerText.includes('2,928 visual tokens')")

    ask(page, "What is in this picture?", 1)
    ask(page, "What colour is the car?", 2)
    page.screenshot(path=str(ARTIFACTS / "browser_chat.png"), full_page=True)

    for side, expected in (("left", stock), ("right", reduced)):
        turns = answered_turns(page, side)
        assert len(turns) == 2, f"{side} column answered {len(turns)} turns"
        for visual, text, context, vision_ms, ttft_ms in turns:
            assert visual == expected
            assert context == visual + text
            assert vision_ms > 0 and ttft_ms > vision_ms
        assert turns[1][1] > turns[0][1]  # the second turn re-reads the first question and answer
    assert "2928 -> 320 visual tokens" in page.locator("#summary").inner_text()

    page.get_by_role("tab", name="What the method keeps").click()
    page.locator("#overlay img").wait_for()
    assert "320 visual tokens" in page.locator("#overlay-legend").inner_text()
    # a smaller budget redraws the overlay from the vision tower alone; the chat is not re-run
    page.locator("#right-mode input").click()
    page.get_by_role("option", name="VisionZip 160").click()
    reduced_160 = tiles * preset_budget("llava_next", 160).per_tile
    page.wait_for_function(
        f"document.querySelector('#overlay-legend').innerText.includes('{reduced_160} visual tokens')"
    )
    assert len(answered_turns(page, "right")) == 2
    page.locator("#overlay").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "browser_overlay.png"), full_page=True)

    page.get_by_role("tab", name="Charts").click()
    page.locator("#tokens-chart .js-plotly-plot").wait_for()
    page.wait_for_function("document.querySelector('#tokens-chart').innerText.includes('turn 2')")
    page.screenshot(path=str(ARTIFACTS / "browser_charts.png"), full_page=True)

    page.get_by_role("tab", name="Export").click()
    with page.expect_download() as download:
        page.click("#export-json")
    records = json.loads(Path(download.value.path()).read_text())
    assert sorted((r["turn"], r["side"], r["visual_tokens"]) for r in records) == [
        (1, "left", stock),
        (1, "right", reduced),
        (2, "left", stock),
        (2, "right", reduced),
    ]
