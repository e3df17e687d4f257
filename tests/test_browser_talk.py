"""The presenter view in a real browser at 1920x1080 and at 150 % zoom: an example by key, a turn, the
race, a shipped recording, the budget keys; headline figures at least 48 px and nothing important
below 24 px.  Screenshots go to artifacts/ (gitignored)."""

import json
from pathlib import Path

import pytest
from app_helpers import ARTIFACTS, browser_page

pytestmark = pytest.mark.browser

FIGURES = "#talk-view .talk-number"
IMPORTANT = [
    "#talk-left-answer",
    "#talk-right-answer",
    "#talk-status",
    "#talk-keys",
    "#talk-ask",
    "#talk-question textarea",
]
IMPORTANT += ["#talk-view .talk-unit", "#talk-left-title h3", "#talk-right-budget input"]


def talk_page(url: str, width: int, height: int, scale: float):
    """The presenter view with a CSS viewport of width x height at `scale` device pixels per CSS pixel
    (150 % zoom on a 1920x1080 screen: 1280x720 at 1.5)."""
    return browser_page(url.rstrip("/") + "/talk", (width, height), scale, ready="#talk-view #talk-ask")


def font_sizes(page, selector: str) -> list[float]:
    return page.eval_on_selector_all(
        selector, "elements => elements.map(e => parseFloat(getComputedStyle(e).fontSize))"
    )


def assert_readable(page) -> None:
    figures = font_sizes(page, FIGURES)
    assert len(figures) == 5 and min(figures) >= 48, figures  # two per side and the speed-up
    for selector in IMPORTANT:
        sizes = font_sizes(page, selector)
        assert sizes and min(sizes) >= 24, (selector, sizes)


def download(page, selector: str, tries: int = 20) -> str:
    """The file a download button serves, once the event after the turn has given it one."""
    timeout = pytest.importorskip("playwright.sync_api").TimeoutError
    for _ in range(tries):
        try:
            with page.expect_download(timeout=3000) as started:
                page.click(selector)
            return started.value.path()
        except timeout:
            continue
    raise AssertionError(f"{selector} never served a file")


def wait_for_turn(page) -> None:
    page.wait_for_function(
        "['left', 'right'].every(s => /\\d ms/.test(document.querySelector(`#talk-${s}-figures`).innerText))"
    )
    page.wait_for_function("document.querySelector('#talk-speedup').innerText.includes('×')")


def play_race(page) -> None:
    """The race that played itself (after the turn or the load) ends; `R` plays it again, 10x slower so
    that a frame in the middle is seen."""
    status = "document.querySelector('#talk-status').innerText"
    page.wait_for_function(f"{status}.includes('Replay of measured timings') && {status}.includes('🏁')")
    page.locator("#talk-slowdown").get_by_text("10x slower").click()
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("r")
    page.wait_for_function(f"{status}.includes('10x slower than measured')")
    answers = "['left', 'right'].map(s => document.querySelector(`#talk-${s}-answer`).innerText)"
    page.wait_for_function(f"{answers}.some(text => text.includes('⏱'))")  # mid-race: a side still running
    page.wait_for_function(f"{answers}.every(text => text.includes('finished')) && {status}.includes('🏁')")
    page.locator("#talk-slowdown").get_by_text("measured pace").click()
    page.locator("body").click(position={"x": 5, "y": 5})  # keys act outside form fields


def move_the_slider(page) -> None:
    """The right side's slider follows the key's preset (VisionZip 160: 27 + 5 a tile); released at 100
    it previews that budget: the overlay's caption and the count, while the side keeps its preset."""
    slider = page.locator("#talk-right-scrub input[type=range]")
    page.wait_for_function("document.querySelector('#talk-right-scrub input[type=range]')?.value === '32'")
    slider.evaluate(
        """el => { el.value = 100; el.dispatchEvent(new Event('input', {bubbles: true}));
                   el.dispatchEvent(new PointerEvent('pointerup', {bubbles: true})); }"""
    )
    page.wait_for_function(
        "document.querySelector('#talk-right-chosen').innerText.includes('Preview at VisionZip 84+16')"
    )
    page.wait_for_function("document.querySelector('#talk-right-scrub-info').innerText.includes('visual tokens')")
    assert page.locator("#talk-right-budget input").input_value() == "VisionZip 160"  # what the next turn runs
    page.locator("body").click(position={"x": 5, "y": 5})  # keys act outside form fields


@pytest.mark.parametrize(("width", "height", "scale", "name"), [(1920, 1080, 1, "1080p"), (1280, 720, 1.5, "zoom150")])
def test_presenter_view(app_url, width, height, scale, name):
    ARTIFACTS.mkdir(exist_ok=True)
    with talk_page(app_url, width, height, scale) as page:
        assert "N next example" in page.locator("#talk-keys").inner_text()  # the shortcuts are listed
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("n")  # the first example: its picture and question in one key
        page.wait_for_function("document.querySelector('#talk-question textarea').value.length > 0")
        page.wait_for_function("document.querySelector('#talk-status').innerText.includes('Example 1')")
        page.locator("#talk-right-overlay img").wait_for()  # what VisionZip keeps, before anything is asked
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("a")
        wait_for_turn(page)
        assert_readable(page)
        saved = json.loads(Path(download(page, "#talk-save")).read_text())  # the turn, saved as a recording
        assert (saved["format"], saved["version"], len(saved["turns"])) == ("visionzip-live-recording", 1, 1)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / f"talk_{name}_turn.png"))
        play_race(page)
        assert "tiny model with random weights" in page.locator("#talk-status").inner_text().lower()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / f"talk_{name}_race.png"))

        page.keyboard.press("ArrowDown")  # the right side's budget: one preset smaller
        page.wait_for_function("document.querySelector('#talk-right-budget input').value === 'VisionZip 160'")
        page.keyboard.press("Shift+ArrowUp")  # the left side runs the full model: refused with a message
        page.get_by_text("runs the full model").first.wait_for()
        move_the_slider(page)

        page.locator("#talk-shipped input").click()
        page.get_by_role("option", name="tiny-house_and_car.vzrec.json").click()
        # loaded, then the race plays itself: either way the status names where it was recorded
        page.wait_for_function("document.querySelector('#talk-status').innerText.includes('record_examples.py')")
        page.wait_for_function("document.querySelector('#talk-left-figures').innerText.includes('2,928')")
        assert "320" in page.locator("#talk-right-figures").inner_text()
        page.locator("#talk-right-overlay img").wait_for()
        play_race(page)
        assert_readable(page)
        page.screenshot(path=str(ARTIFACTS / f"talk_{name}_recording.png"), full_page=True)


def test_the_researcher_page_replays_a_recording(app_url):
    """The researcher's page: "Replay a recording" fills both chats, the summary and the charts."""
    from app.talk import RECORDINGS

    path = next(p for p in RECORDINGS if p.name == "tiny-house_and_car.vzrec.json")
    with browser_page(app_url) as page:  # its own browser: the module's other tests open theirs
        page.get_by_role("tab", name="Export").click()
        with page.expect_file_chooser() as chooser:
            page.click("#load-recording")
        chooser.value.set_files(str(path))
        page.wait_for_function("document.querySelector('#media-info').innerText.includes('Replaying a recording')")
        page.wait_for_function(
            "['left', 'right'].every(s => document.querySelectorAll(`#${s}-chat [data-testid='bot']`).length === 2)"
        )
        assert "2928 -> 320 visual tokens" in page.locator("#summary").inner_text()
        page.get_by_role("tab", name="Charts").click()
        page.wait_for_function("document.querySelector('#tokens-chart').innerText.includes('turn 2')")
        page.screenshot(path=str(ARTIFACTS / "browser_replayed_recording.png"), full_page=True)


def test_talk_first_serves_the_presenter_view_at_the_root():
    """`app.py --talk`: the presenter view at /, the researcher's page at /research."""
    import importlib.util

    from app_helpers import served

    from app.models import ModelRegistry
    from app.ui import build_demo

    spec = importlib.util.spec_from_file_location("app_main", Path(__file__).resolve().parents[1] / "app.py")
    app_main = importlib.util.module_from_spec(spec)  # app.py is a script beside the `app` package
    spec.loader.exec_module(app_main)
    assert app_main.parse_args(["--talk"]).talk and not app_main.parse_args([]).talk
    with served(build_demo(ModelRegistry(), max_new_tokens=4, talk_first=True)) as url:
        with browser_page(url, ready="#talk-view #talk-ask") as page:
            assert page.locator("#message").count() == 0
        with browser_page(url.rstrip("/") + "/research") as page:
            assert page.locator("#talk-view").count() == 0
