"""The public demo under stress, through its API: bad files and messages, impossible settings, models
that fail, many sessions at once, requests that go away, and files it must never serve.

Every refusal is checked for its message and for the session going on afterwards with its history.
"""

import json
import re
import struct
import time
import zlib
from io import BytesIO
from pathlib import Path

import av  # before anything loads decord (see app/media.py)
import httpx
import numpy as np
import pytest
from app_helpers import DAMAGED, ENDLESS, OUT_OF_MEMORY, FaultyRegistry, browser_page, expected_visual_tokens, served
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from app.models import TINY_LABEL
from app.ui import build_demo

FIRST = "What is in the picture?"
NEXT = "And what else?"
MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return FaultyRegistry(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def app_url(registry):
    with served(build_demo(registry, max_new_tokens=MAX_NEW_TOKENS)) as url:
        yield url


@pytest.fixture
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def picture(files):
    path = files / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def picture_tokens(tiny_next):
    return expected_visual_tokens(tiny_next[1], 640, 480)


# -- driving a session -------------------------------------------------------------------------------
def upload(client: Client, path: Path, kind: str = "image") -> str:
    """Make `path` the session's media; returns the note shown under it."""
    upload = handle_file(str(path))
    outputs = client.predict(
        image=upload if kind == "image" else None, video=upload if kind == "video" else None, api_name="/set_media"
    )
    return outputs[4]  # left chat, right chat, stats, summary, media info, ...


def ask(client: Client, question: str) -> tuple[list, list, list[dict], str]:
    """(left chat, right chat, stats, summary) after the turn; a turn stuck behind another fails the test."""
    return client.submit(question, api_name="/ask").result(timeout=300)


def questions(history: list[dict]) -> list[str]:
    return [text_of(message) for message in history if message["role"] == "user"]


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(block.get("text", "") for block in content)


def by_side(stats: list[dict], turn: int) -> dict[str, dict]:
    return {record["side"]: record for record in stats if record["turn"] == turn}


def assert_answered(stats: list[dict], turn: int, tokens: tuple[int, int]) -> None:
    sides = by_side(stats, turn)
    assert sides["left"]["error"] is None and sides["right"]["error"] is None
    assert (sides["left"]["visual_tokens"], sides["right"]["visual_tokens"]) == tokens
    assert sides["left"]["new_tokens"] > 0 and sides["right"]["new_tokens"] > 0


@pytest.fixture
def session(client, picture, picture_tokens):
    """A session with the picture and one answered turn."""
    upload(client, picture)
    _, _, stats, _ = ask(client, FIRST)
    assert_answered(stats, 1, picture_tokens)
    return client


def assert_goes_on(session: Client, picture_tokens: tuple[int, int], earlier: tuple[str, ...] = (FIRST,)) -> None:
    """The next turn runs on the session's picture, after its earlier questions."""
    left, right, stats, _ = ask(session, NEXT)
    assert questions(left) == questions(right) == [*earlier, NEXT]
    assert_answered(stats, len(earlier) + 1, picture_tokens)


# -- bad files ---------------------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    data = bytearray(encoded(Image.new("L", (10, 10))))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"

REFUSED = {  # name: (content, the message's gist)
    "notes.png": (b"hello, this is not an image\n" * 20, "notes.png is neither an image nor a video"),
    "notes.mp4": (b"hello, this is not a video\n" * 20, "notes.mp4 is neither an image nor a video"),
    "notes": (b"\x00\x01binary junk" * 50, "notes is neither an image nor a video"),
    # PIL would hand PostScript to Ghostscript: it is no image format the demo opens
    "drawing.eps": (EPS, "drawing.eps is neither an image nor a video"),
    "empty.jpg": (b"", "empty.jpg is empty"),
    "cut.jpg": (encoded(noise(200, 200), "JPEG")[:6000], "cut.jpg is truncated or corrupt"),
    "cut.png": (encoded(noise(200, 200))[:6000], "cut.png is truncated or corrupt"),
    "bomb.png": (png_claiming(40000, 40000), "bomb.png is refused as a possible decompression bomb"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_bad_file_is_refused_with_its_reason_and_the_conversation_goes_on(session, files, picture_tokens, name):
    content, message = REFUSED[name]
    path = files / name
    path.write_bytes(content)
    with pytest.raises(AppError, match=message):
        upload(session, path)
    assert_goes_on(session, picture_tokens)


def write_clip(path: Path, num_frames: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
        for number in range(num_frames):
            pixels = np.full((48, 64, 3), number * 8, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        if num_frames:
            container.mux(stream.encode())
    return path


def test_a_video_with_no_frames_is_refused(session, files, picture_tokens):
    path = write_clip(files / "noframes.mp4", 0)
    with pytest.raises(AppError, match="noframes.mp4 has no video frames"):
        upload(session, path, "video")
    assert_goes_on(session, picture_tokens)


def test_a_truncated_video_is_refused(session, files, picture_tokens):
    whole = write_clip(files / "whole.mp4", 30).read_bytes()
    path = files / "cut.mp4"
    path.write_bytes(whole[: len(whole) // 2])  # the index (moov) is written last: it is lost
    with pytest.raises(AppError, match="cut.mp4 is truncated or corrupt"):
        upload(session, path, "video")
    assert_goes_on(session, picture_tokens)


def rotated_photo(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the 64x32 stored pixels appear 32x64
    noise(64, 32).save(path, exif=exif, quality=95)


def transparent(path: Path) -> None:
    cutout = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    cutout.paste((20, 40, 220, 255), (48, 0, 96, 64))
    cutout.save(path)


ODD = {  # name: (writer, the note shown, the size the model sees (width, height))
    "huge.jpg": (
        lambda path: Image.new("RGB", (9000, 1500), (30, 120, 200)).save(path),
        "downscaled from 9000x1500 to 4096x683",
        (4096, 683),
    ),
    "print.jpg": (
        lambda path: Image.new("CMYK", (96, 64), (255, 0, 0, 0)).save(path),
        "converted from CMYK to RGB",
        (96, 64),
    ),
    "scan.png": (
        lambda path: Image.fromarray(np.full((64, 96), 32896, np.uint16)).save(path),
        "converted from high bit depth",
        (96, 64),
    ),
    "logo.png": (
        lambda path: noise(96, 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(path),
        "converted from P to RGB",
        (96, 64),
    ),
    "cutout.png": (transparent, "transparent areas shown on white", (96, 64)),
    "phone.jpg": (rotated_photo, "turned upright from its EXIF orientation", (32, 64)),
    "dot.png": (
        lambda path: Image.new("RGB", (1, 1), (9, 99, 199)).save(path),
        "very small image (1x1 pixels)",
        (1, 1),
    ),
    "panorama.png": (
        lambda path: Image.new("RGB", (4000, 50), (10, 120, 30)).save(path),
        "padded with white to 20:1",
        (4000, 200),
    ),
}


@pytest.mark.parametrize("name", ODD)
def test_an_odd_image_is_used_with_a_note_and_answered(session, files, tiny_next, name):
    """Each is shown to the model as the RGB image the note describes (its size sets the counts)."""
    write, note, (width, height) = ODD[name]
    path = files / name
    write(path)
    info = upload(session, path)
    assert info.startswith(f"{width}x{height} image") and note in info
    left, right, stats, _ = ask(session, FIRST)
    assert questions(left) == questions(right) == [FIRST]  # new media, new conversation
    assert_answered(stats, 1, expected_visual_tokens(tiny_next[1], width, height))


# -- bad messages and settings ------------------------------------------------------------------------
@pytest.mark.parametrize("message", ["", "   \n\t"])
def test_an_empty_message_is_refused(session, picture_tokens, message):
    with pytest.raises(AppError, match="Type a question first"):
        ask(session, message)
    assert_goes_on(session, picture_tokens)


def filler(processor, tokens: int) -> str:
    """Text of about `tokens` tokens for this tokenizer."""
    unit = " lorem"
    per_unit = len(processor.tokenizer(unit * 100, add_special_tokens=False).input_ids) / 100
    text = (unit * round(tokens / per_unit)).strip()
    assert abs(len(processor.tokenizer(text, add_special_tokens=False).input_ids) - tokens) < tokens * 0.05
    return text


def test_a_message_past_the_context_window_is_refused_before_running(session, tiny_next, picture_tokens):
    window = tiny_next[0].config.text_config.max_position_embeddings
    with pytest.raises(AppError, match=f"more than its {window}-token context window") as refusal:
        ask(session, filler(tiny_next[1], window))
    assert str(refusal.value).count("context window") == 2  # both sides say why
    assert_goes_on(session, picture_tokens)


def test_a_conversation_past_one_sides_window_runs_only_the_other(session, tiny_next, picture_tokens):
    """Two long questions fit the 320-token side's window but not the full side's: the full side says
    so in its column before running, and the other answers."""
    window = tiny_next[0].config.text_config.max_position_embeddings
    full, reduced = picture_tokens
    long_question = filler(tiny_next[1], (window - full) * 2 // 3)  # one fits beside the full image, two do not
    _, _, stats, _ = ask(session, long_question)
    assert_answered(stats, 2, picture_tokens)
    left, right, stats, _ = ask(session, long_question + " Again.")
    sides = by_side(stats, 3)
    assert "context window" in sides["left"]["error"] and sides["left"]["new_tokens"] == 0
    assert "context window" in text_of(left[-1])
    assert sides["right"]["error"] is None and sides["right"]["visual_tokens"] == reduced
    assert len(questions(left)) == len(questions(right)) == 3


@pytest.mark.parametrize("dominant, contextual", [(600, 10), (0, 10), (54, 600), (54, -1)])
def test_an_impossible_budget_is_refused_and_the_budget_in_force_stays(session, picture_tokens, dominant, contextual):
    with pytest.raises(AppError, match="out of range.*a tile has 577 tokens"):
        session.predict(
            right_mode="Custom D/C", right_dominant=dominant, right_contextual=contextual, api_name="/set_mode"
        )
    assert_goes_on(session, picture_tokens)


def test_a_model_that_fails_to_load_leaves_the_previous_one_serving(session, registry, picture_tokens):
    with pytest.raises(AppError, match=re.escape(f"keeps {TINY_LABEL}: could not load {DAMAGED}")):
        session.predict(DAMAGED, TINY_LABEL, api_name="/set_model")
    assert DAMAGED not in [model.label for model in registry.loaded()]
    assert_goes_on(session, picture_tokens)


def test_only_the_listed_models_can_be_chosen(session, registry, picture_tokens):
    """A hub id or a server folder sent as a model name is refused: users choose labels, never sources."""
    before = [model.label for model in registry.loaded()]
    for name in ("llava-hf/llava-v1.6-vicuna-7b-hf", str(Path(__file__).parent)):
        with pytest.raises(AppError, match="not in the list of choices"):
            session.predict(name, TINY_LABEL, api_name="/set_model")
    assert [model.label for model in registry.loaded()] == before
    assert_goes_on(session, picture_tokens)


# -- failures on one side ------------------------------------------------------------------------------
def test_one_side_out_of_memory_shows_in_its_column_and_the_other_answers(session, picture_tokens):
    session.predict(OUT_OF_MEMORY, TINY_LABEL, api_name="/set_model")
    left, right, stats, _ = ask(session, NEXT)
    sides = by_side(stats, 2)
    assert sides["left"]["error"].startswith("Out of GPU memory on this side")
    assert text_of(left[-1]).startswith("⚠️ Out of GPU memory on this side")
    assert sides["right"]["error"] is None and sides["right"]["visual_tokens"] == picture_tokens[1]
    assert "visual +" in text_of(right[-1])

    session.predict(TINY_LABEL, TINY_LABEL, api_name="/set_model")
    left, _, stats, _ = ask(session, "Once more.")
    assert questions(left) == [FIRST, NEXT, "Once more."]
    assert "Out of GPU memory" in text_of(left[3])  # the failed answer stays in the history as it was
    assert_answered(stats, 3, picture_tokens)


# -- requests that go away, a full queue -------------------------------------------------------------------
def raw_ask(app_url: str, client: Client, question: str) -> httpx.Response:
    """Join the queue for /ask as `client`'s session, without listening for the answer."""
    body = {
        "data": [question, None],
        "fn_index": client._infer_fn_index("/ask", None),
        "session_hash": client.session_hash,
    }
    return httpx.post(f"{app_url}gradio_api/queue/join", json=body)


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_a_request_that_goes_away_frees_the_model_for_the_next_visitor(
    app_url, registry, client, picture, picture_tokens, how
):
    registry.endless_started.clear()
    registry.endless_stopped.clear()
    upload(client, picture)
    client.predict(ENDLESS, TINY_LABEL, api_name="/set_model")
    if how == "cancel":
        job = client.submit(FIRST, api_name="/ask")
        assert registry.endless_started.wait(60)
        job.cancel()
    else:  # the visitor closes the tab: its event stream ends mid-answer
        assert raw_ask(app_url, client, FIRST).status_code == 200
        with httpx.stream(
            "GET", f"{app_url}gradio_api/queue/data", params={"session_hash": client.session_hash}, timeout=60
        ) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["msg"] == "process_generating":
                    break
    assert registry.endless_stopped.wait(60), "the abandoned answer was not stopped"

    other = Client(app_url, verbose=False)
    upload(other, picture)
    left, _, stats, _ = ask(other, NEXT)
    assert questions(left) == [NEXT]
    assert_answered(stats, 1, picture_tokens)

    # the abandoned turn stays in its session's history, marked stopped, and the session goes on
    client.predict(TINY_LABEL, TINY_LABEL, api_name="/set_model")
    left, right, stats, _ = ask(client, NEXT)
    assert questions(left) == [FIRST, NEXT]
    assert text_of(left[1]).endswith("■ stopped") and "▌" not in text_of(left[1])
    assert_answered(stats, 2, picture_tokens)


def test_a_full_queue_asks_the_next_visitor_to_come_back(app_url, registry, client, picture, picture_tokens):
    registry.endless_started.clear()
    upload(client, picture)
    client.predict(ENDLESS, TINY_LABEL, api_name="/set_model")
    running = client.submit(FIRST, api_name="/ask")
    assert registry.endless_started.wait(60)
    try:
        waiting = Client(app_url, verbose=False)
        for accepted in range(200):  # noqa: B007 (read after the loop)
            joined = raw_ask(app_url, waiting, "Anyone there?")
            if joined.status_code != 200:
                break
        assert joined.status_code == 503 and "Queue is full" in joined.json()["detail"]
        assert 0 < accepted < 200
        with pytest.raises(QueueError, match="Queue is full! Please try again"):
            Client(app_url, verbose=False).predict(FIRST, api_name="/ask")
    finally:
        running.cancel()
    late = Client(app_url, verbose=False)
    upload(late, picture)
    assert_answered(ask(late, FIRST)[2], 1, picture_tokens)


# -- uploads and files ----------------------------------------------------------------------------------
def test_uploads_over_the_size_cap_are_refused(app_url, client, files):
    cap = client.config["max_file_size"]
    assert cap == 200 * 2**20
    big = files / "big.mp4"
    with open(big, "wb") as sparse:
        sparse.truncate(cap + 1)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(None, handle_file(str(big)), api_name="/set_media")
    with open(big, "rb") as content:  # a client that skips the check is refused by the server
        response = httpx.post(f"{app_url}gradio_api/upload", files=[("files", ("big.mp4", content))], timeout=120)
    assert response.status_code == 413 and "File size exceeded maximum allowed size" in response.text
    big.unlink()


OUTSIDE = [
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/tmp/gradio/..%2F..%2Fetc%2Fpasswd",
    "~/.bashrc",
    "file:///etc/passwd",
    "app/ui.py",
    str(Path(__file__).resolve().parents[1] / "app.py"),
    "http://127.0.0.1:1/internal",
]


def raw_upload(app_url: str, path: Path) -> str:
    """Upload `path` as the browser does; returns where the server stored it."""
    with open(path, "rb") as content:
        response = httpx.post(f"{app_url}gradio_api/upload", files=[("files", (path.name, content))])
    response.raise_for_status()
    return response.json()[0]


@pytest.mark.parametrize("path", OUTSIDE)
def test_the_file_route_serves_nothing_outside_the_apps_files(app_url, files, picture, path):
    uploaded = raw_upload(app_url, picture)  # what the route is for: the visitor's own upload
    assert httpx.get(f"{app_url}gradio_api/file={uploaded}").content == picture.read_bytes()
    for route in ("gradio_api/file=", "gradio_api/file/"):
        response = httpx.get(f"{app_url}{route}{path}")
        assert response.status_code == 403, f"{route}{path}: {response.status_code}"


def raw_set_media(app_url: str, client: Client, server_path: str) -> dict:
    """/set_media as `client`'s session with a file the request names by its server path; returns
    the final message of the event stream."""
    file = {"path": server_path, "orig_name": Path(server_path).name, "meta": {"_type": "gradio.FileData"}}
    endpoint = client.endpoints[client._infer_fn_index("/set_media", None)]
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/set_media"]["parameters"]
    values = [file] + [parameter.get("parameter_default") for parameter in parameters[1:]]
    body = {
        "data": list(endpoint.insert_empty_state(*values)),
        "fn_index": endpoint.fn_index,
        "session_hash": client.session_hash,
    }
    assert httpx.post(f"{app_url}gradio_api/queue/join", json=body).status_code == 200
    with httpx.stream(
        "GET", f"{app_url}gradio_api/queue/data", params={"session_hash": client.session_hash}, timeout=60
    ) as events:
        for line in events.iter_lines():
            if line.startswith("data:") and (message := json.loads(line[5:]))["msg"] == "process_completed":
                return message
    raise AssertionError("the event stream ended without a result")


def test_the_api_takes_no_file_path_that_was_not_uploaded(app_url, client, files, picture):
    """A request naming a server file instead of uploading one is refused, and the file is never read;
    the same request naming an upload works."""
    secret = files / "secret.png"
    secret.write_bytes(picture.read_bytes())
    assert raw_set_media(app_url, client, str(secret))["success"] is False
    with pytest.raises(AppError, match="Upload an image first"):
        ask(client, FIRST)
    assert raw_set_media(app_url, client, raw_upload(app_url, secret))["success"] is True
    assert len(questions(ask(client, FIRST)[0])) == 1


# -- in the browser: what the API cannot show ----------------------------------------------------------
@pytest.fixture(scope="module")
def browser(app_url):
    with browser_page(app_url) as page:
        yield page


@pytest.fixture
def page(browser):
    browser.reload()  # a new session
    browser.wait_for_selector("#message textarea")
    return browser


def choose(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def toasts(page) -> str:
    return " ".join(page.locator("[data-testid='toast-body']").all_inner_texts())


@pytest.mark.browser
def test_a_refused_budget_leaves_the_budget_in_force_in_the_boxes(page):
    choose(page, "#right-mode", "Custom D/C")
    page.wait_for_function("document.querySelector('#right-header').innerText.includes('VisionZip 54+10/tile')")
    page.fill("#right-dominant input", "600")
    page.press("#right-dominant input", "Enter")
    page.locator("[data-testid='toast-body']").first.wait_for()
    page.wait_for_function("document.querySelector('#right-dominant input').value === '54'", timeout=30_000)
    assert "dominant=600 is out of range" in toasts(page) and "Traceback" not in toasts(page)
    assert page.input_value("#right-contextual input") == "10"
    assert "VisionZip 54+10/tile" in page.inner_text("#right-header")

    page.fill("#right-dominant input", "20")
    page.press("#right-dominant input", "Enter")
    page.wait_for_function("document.querySelector('#right-header').innerText.includes('VisionZip 20+10/tile')")


@pytest.mark.browser
def test_regenerate_pressed_during_a_turn_redoes_that_turn_once_it_ends(page, registry, picture):
    """Regenerate waits for the running turn (here stopped) and then asks its question again: the
    question is in the history once, whatever order the two requests reach the server in."""
    page.set_input_files("#media input[type=file]", str(picture))
    page.wait_for_function("document.querySelector('#media-info').innerText.includes('640x480')")
    choose(page, "#left-model", ENDLESS)
    page.wait_for_function(f"document.querySelector('#left-header').innerText.includes('{ENDLESS}')")

    registry.endless_started.clear()
    page.fill("#message textarea", FIRST)
    page.press("#message textarea", "Enter")
    assert registry.endless_started.wait(60)
    answers = len(registry.endless_answers)
    page.click("#regenerate")
    page.click("#stop")
    deadline = time.monotonic() + 60
    while len(registry.endless_answers) == answers:  # the first turn's answer keeps streaming until stopped
        assert time.monotonic() < deadline, "the regenerated turn did not start"
        time.sleep(0.05)
    assert registry.endless_answers[-1].wait(60)
    page.click("#stop")
    page.wait_for_function(
        """() => [...document.querySelectorAll("#right-chat [data-testid='bot']")].some(m => m.innerText.includes('stopped'))"""
    )
    for side in ("left", "right"):
        assert page.locator(f"#{side}-chat [data-testid='user']").all_inner_texts() == [FIRST]


@pytest.mark.browser
def test_a_refused_upload_leaves_no_trace_in_the_upload_boxes(page, files, picture):
    """The boxes show the media in use: nothing after a refused first upload, the picture (and an
    empty video box) after a refused video, with the conversation going on."""
    bad_picture = files / "cut.png"
    bad_picture.write_bytes(REFUSED["cut.png"][0])
    page.set_input_files("#media input[type=file]", str(bad_picture))
    page.locator("[data-testid='toast-body']").first.wait_for()
    assert "cut.png is truncated or corrupt" in toasts(page)
    # the refused picture is on show from its upload until the box is put back (after the message)
    page.wait_for_function("document.querySelector('#media img') === null", timeout=30_000)

    page.set_input_files("#media input[type=file]", str(picture))
    page.wait_for_function("document.querySelector('#media-info').innerText.includes('640x480')")
    page.fill("#message textarea", FIRST)
    page.press("#message textarea", "Enter")
    answered = """n => [...document.querySelectorAll('#left-chat [data-testid=bot]')].filter(m => m.innerText.includes(' visual + ')).length === n"""
    page.wait_for_function(answered, arg=1)

    bad_video = files / "cut.mp4"
    bad_video.write_bytes(b"\x00\x01binary junk" * 50)
    page.set_input_files("#video input[type=file]", str(bad_video))
    page.wait_for_function("document.body.innerText.includes('cut.mp4 is')")
    page.wait_for_function("!document.querySelector('#video').innerText.includes('cut.mp4')", timeout=30_000)  # emptied
    assert page.locator("#media img").count() == 1 and "640x480" in page.inner_text("#media-info")
    page.fill("#message textarea", NEXT)
    page.press("#message textarea", "Enter")
    page.wait_for_function(answered, arg=2)
    assert page.locator("#left-chat [data-testid='user']").all_inner_texts() == [FIRST, NEXT]
