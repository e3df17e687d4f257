"""A video in a real browser: upload a clip, see each side's count and the filmstrip before asking,
hold a two-turn conversation on both sides, then give the VisionZip side the same budget.

The screenshot goes to artifacts/browser_video.png (gitignored) for a human to look at.
"""

import re
from pathlib import Path

import av  # before anything loads decord (see app/media.py)
import numpy as np
import pytest
from app_helpers import ARTIFACTS

from visionzip import preset_budget

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]

STATS = re.compile(r"(\d+) frames · ([\d,]+) visual \+ ([\d,]+) text = ([\d,]+) tokens")
PATCHES_PER_FRAME = 24 * 24  # CLIP-L/14-336: a 336x336 tile is 24x24 patches, CLS dropped
PER_FRAME_320 = preset_budget("llava_next", 320).per_tile  # the right side's default mode


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A ball crossing a sky-blue field: 48 frames, more than the same-budget mode takes."""
    path = tmp_path_factory.mktemp("clips") / "ball.mp4"
    height, width = 180, 320
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for number in range(48):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = (135, 206, 235)
            pixels[y > 140] = (60, 160, 60)
            ball = (x - 20 - number * 6) ** 2 + (y - 90) ** 2 < 30**2
            pixels[ball] = (220, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def answered_turns(page, side: str) -> list[tuple[int, int, int, int]]:
    """(frames, visual, text, context) of each finished answer in a column."""
    texts = page.locator(f"#{side}-chat [data-testid='bot']").all_inner_texts()
    found = [STATS.search(" ".join(text.split())) for text in texts]
    return [tuple(int(g.replace(",", "")) for g in match.groups()) for match in found if match]


def ask(page, question: str, turns: int) -> None:
    page.fill("#message textarea", question)
    page.keyboard.press("Enter")
    page.wait_for_function(
        """n => ['left', 'right'].every(side => [...document.querySelectorAll(`#${side}-chat [data-testid='bot']`)]
              .filter(m => m.innerText.includes(' visual + ')).length >= n)""",
        arg=turns,
    )


def wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => document.querySelector(s).innerText.includes(t)", arg=[selector, text])


def test_a_two_turn_conversation_over_a_clip(page, clip):
    full, reduced = 4 * PATCHES_PER_FRAME, 4 * PER_FRAME_320
    page.set_input_files("#video input[type=file]", str(clip))
    wait_for_text(page, "#media-info", "4 sampled, decoded with")
    # before anything runs: each side's count and whether it fits, and the frames with what VisionZip keeps
    wait_for_text(page, "#left-header", f"{full:,} visual tokens")
    wait_for_text(page, "#right-header", f"{reduced:,} visual tokens")
    assert "fits" in page.locator("#left-header").inner_text()
    page.locator("#filmstrip img").first.wait_for()
    assert page.locator("#filmstrip img").count() == 4
    assert not page.locator("#overlay").is_visible()  # the image views give way to the filmstrip

    ask(page, "What happens in the video?", 1)
    ask(page, "Which way does the ball go?", 2)
    for side, visual in (("left", full), ("right", reduced)):
        turns = answered_turns(page, side)
        assert len(turns) == 2, f"{side} column answered {len(turns)} turns"
        for frames, seen, text, context in turns:
            assert (frames, seen, context) == (4, visual, seen + text)
        assert turns[1][2] > turns[0][2]  # the second turn re-reads the first question and answer
    assert f"{full} -> {reduced} visual tokens" in page.locator("#summary").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_video.png"), full_page=True)

    # same budget: the VisionZip side gets the frames that fit in the full side's tokens
    more = full // PER_FRAME_320
    page.locator("#same-budget input").check()
    wait_for_text(page, "#right-header", f"{more} frames × {PER_FRAME_320}")
    page.wait_for_function(f"document.querySelectorAll('#filmstrip img').length === {more}")
    ask(page, "And now?", 3)
    assert answered_turns(page, "right")[2][:2] == (more, more * PER_FRAME_320)
    assert answered_turns(page, "left")[2][:2] == (4, full)
    page.screenshot(path=str(ARTIFACTS / "browser_video_same_budget.png"), full_page=True)

    # more frames than the full side's context window holds: refused there before anything runs
    page.fill("#frames input[type=number]", "8")
    page.keyboard.press("Enter")
    wait_for_text(
        page, "#left-header", f"refused: Tiny LLaVA-NeXT (random weights) (full): 8 frames x {PATCHES_PER_FRAME}"
    )


def test_an_image_after_a_video_and_back(page, clip):
    """The two upload boxes take turns: the box not in use empties, and the conversation follows."""
    image = ROOT / "assets" / "house_and_car.png"  # 672x672
    page.set_input_files("#media input[type=file]", str(image))
    wait_for_text(page, "#media-info", "672x672 image")
    page.wait_for_function("!document.querySelector('#video').innerText.includes('ball.mp4')")
    wait_for_text(page, "#left-header", "2,928 visual tokens")
    page.locator("#overlay img").wait_for()
    assert not page.locator("#filmstrip").is_visible()

    page.locator("#same-budget input").uncheck()
    page.fill("#frames input[type=number]", "2")
    page.keyboard.press("Enter")
    page.set_input_files("#video input[type=file]", str(clip))
    wait_for_text(page, "#media-info", "2 sampled, decoded with")
    page.wait_for_function("!document.querySelector('#media img')")
    page.wait_for_function("document.querySelectorAll('#filmstrip img').length === 2")
    ask(page, "What happens in the video?", 1)
    turns = answered_turns(page, "left")  # a new conversation, over the clip's 2 frames
    assert len(turns) == 1 and turns[0][:2] == (2, 2 * PATCHES_PER_FRAME)
