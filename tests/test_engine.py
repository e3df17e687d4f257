"""A side on a vLLM server (app/engine.py): the handlers, the API and one browser page against a real vLLM
server with the visionzip_vllm plugin (VisionZip 320 on the tiny LLaVA-NeXT, "per_request": requests may choose
their own method and budget up to that count per image), started once for this module from .venv-vllm with
bench/serve.py's own start and stop.  The answers are checked against direct requests to the same server (greedy,
the same messages and mm_processor_kwargs built here), the visual counts against the library's count for the image
size and mode; the error cases (nothing listening, not a vLLM server, no plugin report, no answer in time) and a
server that fixes its method for every request are served here without vLLM."""

from __future__ import annotations

import base64
import http.server
import json
import re
import socket
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
from app_helpers import ARTIFACTS, VLLM_PYTHON, free_port
from gradio_client import Client, handle_file
from test_browser_methods import ask_turns, choose, wait_for_text

import visionzip
from app import recording
from app.conversation import SideConfig
from app.engine import NO_VIDEO, EngineServer
from app.handlers import ON_SERVER, Handlers, new_conversation
from app.models import TINY_LABEL, ModelRegistry
from app.modes import FULL_MODE
from app.talk import TalkHandlers
from bench.phases import parse_budget

ROOT = Path(__file__).resolve().parent.parent
BUDGET = "visionzip:320"  # the server's method and budget (LLaVA-NeXT's middle preset: 54 + 10 per tile)
SERVER_MODE = "VisionZip 54+10/tile"
MAX_NEW_TOKENS = 6
QUESTIONS = ["What is in the picture?", "What is in its top-left corner?"]


@pytest.fixture(scope="module")
def vllm_server(tiny_cache, tmp_path_factory) -> SimpleNamespace:
    """One vLLM server for the module: its URL and the checkpoint folder it serves (a path no message may show)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"needs the vLLM venv {VLLM_PYTHON.relative_to(ROOT)} (bash scripts/setup.sh --vllm)")
    from bench.serve import start_server, stop_server, wait_ready
    from visionzip.tiny import hub_layout_checkpoint
    from visionzip_vllm import hf_overrides

    checkpoint = hub_layout_checkpoint("llava_next")
    args = SimpleNamespace(vllm_python=VLLM_PYTHON, dtype="float32", clients=2, preset="tiny", kv_space_gib=1)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    overrides = hf_overrides(**parse_budget(BUDGET).server_options(), per_request=True)
    process, url = start_server(args, checkpoint, overrides, log)
    try:
        try:
            wait_ready(process, url, 600, log)
        except SystemExit as error:
            pytest.fail(f"{error}\n{log.read_text()[-4000:]}")
        yield SimpleNamespace(url=url, checkpoint=str(checkpoint))
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def engine_label(vllm_server) -> str:
    return f"vLLM server · served (VisionZip 54+10/tile) at {vllm_server.url.removeprefix('http://')}"


@pytest.fixture(scope="module")
def registry(vllm_server):
    """The app's registry with the live server offered on both sides (what `app.py --engine URL` builds)."""
    registry = ModelRegistry(device="cpu")
    server = EngineServer.at(vllm_server.url)
    server.read_report()
    registry.add_engine(server)
    registry.add_engine(EngineServer.at(f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    return registry


@pytest.fixture(scope="module")
def max_new_tokens():
    return MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def handlers(registry, tmp_path_factory):
    return Handlers(registry, max_new_tokens=MAX_NEW_TOKENS, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture(scope="module")
def reduced_count(tiny_next):
    """The plugin's reduced count for an image size under a budget ("visionzip:320", "divprune:320"), from the
    library on transformers' model."""
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)

    def count(height: int, width: int, budget: str = BUDGET) -> int:
        with handle.use(**parse_budget(budget).use()):
            return handle.num_image_tokens((height, width))

    yield count
    handle.remove()


def picture_file(tmp_path: Path, make_image, height: int, width: int) -> str:
    path = tmp_path / f"picture-{height}x{width}.png"
    make_image(height, width, seed=5).save(path)
    return str(path)


def direct_answer(
    url: str, picture: str, turns: list[tuple[str, str]], question: str, budget: str | None = None
) -> dict:
    """The server's greedy answer to the conversation, sent here as OpenAI messages: the image file as a data URL
    in the first user turn, then the earlier (question, answer) pairs; `budget` ("divprune:320") as the request's
    mm_processor_kwargs, None: the server's own."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(Path(picture).read_bytes()).decode()}}  # fmt: skip
    messages = []
    for index, (asked, answer) in enumerate([*turns, (question, None)]):
        messages.append(
            {"role": "user", "content": ([image] if index == 0 else []) + [{"type": "text", "text": asked}]}
        )
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    body = {"model": "served", "messages": messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    if budget is not None:
        body["mm_processor_kwargs"] = {"visionzip": parse_budget(budget).server_options()}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


def right_mode(handlers: Handlers, conversation, name: str, title: str) -> dict:
    """The page's set_mode with the right side's method and budget chosen, the left side's as they are."""
    left = conversation.sides["left"].mode
    return handlers.set_mode(conversation, left.name, 54, 10, name, 54, 10, left_method=left.method_title, right_method=title)  # fmt: skip


# (image size, the right side's budget: None for the server's own, else (mode, method title, the library's name));
# a 2x2 grid (5 tiles) and a 1x3 grid (4 tiles), each budget at most the server's count for that image
TURNS = [
    ((480, 640), None),
    ((480, 640), ("DivPrune 320", "DivPrune", "divprune:320")),
    ((336, 1008), ("VisionZip 160", "VisionZip", "visionzip:160")),
]


@pytest.mark.parametrize(("size", "chosen"), TURNS)
def test_a_vllm_side_answers_what_the_server_answers_a_direct_request(
    handlers, engine_label, vllm_server, reduced_count, size, chosen, tmp_path, make_image
):
    picture = picture_file(tmp_path, make_image, *size)
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, TINY_LABEL, engine_label)["state"]
    budget = None
    if chosen is not None:  # the side's own method and budget, sent with each request
        name, title, budget = chosen
        conversation = right_mode(handlers, conversation, name, title)["state"]
    label = conversation.sides["right"].mode.label
    assert (label == SERVER_MODE) == (chosen is None)
    earlier = []
    for number, question in enumerate(QUESTIONS, start=1):
        conversation = list(handlers.ask(question, conversation))[-1]["state"]
        turn = conversation.turns[-1]
        served, local = turn.stats["right"], turn.stats["left"]
        direct = direct_answer(vllm_server.url, picture, earlier, question, budget)
        assert served.error is None and local.error is None, (served.error, local.error)
        assert turn.answers["right"] == direct["choices"][0]["message"]["content"]
        assert served.new_tokens == direct["usage"]["completion_tokens"]
        assert served.visual_tokens == reduced_count(*size, budget or BUDGET)  # the reduced count, not 2,000+
        assert served.context_tokens == direct["usage"]["prompt_tokens"]
        assert served.text_tokens == direct["usage"]["prompt_tokens"] - served.visual_tokens
        assert served.mode == label and served.turn == number and served.ttft_ms > 0
        assert "".join(text for _, text in turn.tokens["right"]) == turn.answers["right"]  # the race replays it
        assert "not on a vLLM side" in served.quality_reference
        earlier.append((question, turn.answers["right"]))
    assert len(conversation.turns) == 2
    assert f"{label}<br>" in handlers.headers(conversation)["right_header"]  # what the server ran


def test_a_vllm_side_offers_what_the_server_serves_and_refuses_a_budget_above_its_own(
    handlers, engine_label, vllm_server, reduced_count, tmp_path, make_image
):
    picture = picture_file(tmp_path, make_image, 480, 640)
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, TINY_LABEL, engine_label)["state"]
    controls = handlers.mode_controls(conversation)
    methods = controls["right_method"].choices
    assert controls["right_method"].interactive and controls["right_mode"].interactive
    assert ("DivPrune", "DivPrune") in methods and not {"FastV", "CDPruner", "Full"} & {value for _, value in methods}
    with pytest.raises(gr.Error, match="Right side: FastV drops image tokens inside the language model"):
        right_mode(handlers, conversation, "FastV 320", "FastV")  # what the API could still ask for
    with pytest.raises(
        gr.Error, match=f"Right side: Full asks for every visual token, more than .* {re.escape(SERVER_MODE)}"
    ):
        right_mode(handlers, conversation, "Full", "Full")  # above the server's own count on every image
    conversation = list(handlers.ask(QUESTIONS[0], conversation))[-1]["state"]
    kept = conversation.sides
    conversation = right_mode(handlers, conversation, "VisionZip 640", "VisionZip")["state"]
    assert conversation.sides["right"].mode.label == "VisionZip 108+20/tile"
    conversation = list(handlers.ask(QUESTIONS[1], conversation))[-1]["state"]
    turn = conversation.turns[-1]
    refusal = turn.stats["right"].error
    assert refusal and f"gives this 480x640 image {reduced_count(480, 640, 'visionzip:640')} tokens" in refusal
    assert f"more than the {reduced_count(480, 640)} of the server's {SERVER_MODE}" in refusal
    assert vllm_server.checkpoint not in refusal and turn.stats["left"].error is None and turn.answers["left"]
    assert len(conversation.turns) == 2 and conversation.turns[0].answers["right"]  # the conversation is kept
    conversation = replace(conversation, sides=kept)  # back within the server's count: the side answers again
    conversation = list(handlers.ask(QUESTIONS[1], conversation))[-1]["state"]
    assert conversation.turns[-1].stats["right"].error is None and len(conversation.turns) == 3


def test_what_a_vllm_side_cannot_show_is_said(handlers, engine_label, vllm_server, tmp_path, make_image):
    picture = picture_file(tmp_path, make_image, 480, 640)
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, TINY_LABEL, engine_label)["state"]
    header = handlers.headers(conversation)["right_header"]
    assert "on vLLM" in header and "no overlay" in header and "KV-cache toggle does not apply" in header
    assert "sent with each request" in header
    conversation = list(handlers.ask(QUESTIONS[0], conversation))[-1]["state"]
    reason = ON_SERVER.format(side="right")
    assert handlers.refresh_overlay(conversation, "all")["legend"] == reason  # not a stale or local drawing
    conversation = handlers.set_mode(conversation, "DivPrune 320", 54, 10, "VisionZip 160", 27, 5, left_method="DivPrune", right_method="VisionZip")["state"]  # fmt: skip
    assert handlers.compare_sides(conversation)["difference_table"] == reason
    with pytest.raises(gr.Error, match="Match needs both sides' models in this app"):
        handlers.match_right(conversation)
    conversation = handlers.set_cache(conversation, True)["state"]
    conversation = list(handlers.ask(QUESTIONS[1], conversation))[-1]["state"]
    assert "does not apply to a vLLM side" in conversation.turns[-1].stats["right"].cache_note
    shown = [header, *(message["content"] for message in handlers.views(conversation)["right_chat"])]
    assert not any(vllm_server.checkpoint in text for text in shown)


def test_a_presenter_turn_with_the_left_side_on_vllm_is_recorded_and_replays_naming_the_server(
    handlers, engine_label, vllm_server, tmp_path, make_image
):
    """The presenter view's turn, its recording and its replay, with the vLLM side first: where each side was
    measured is said (the server's side was timed by its streamed tokens' arrival here, not on this machine)."""
    talk = TalkHandlers(handlers, examples=[])
    picture = picture_file(tmp_path, make_image, 480, 640)
    conversation = handlers.set_media({"path": picture}, new_conversation(handlers.registry))["state"]
    conversation = handlers.set_model(conversation, engine_label, TINY_LABEL)["state"]
    results = list(talk.ask(QUESTIONS[0], conversation))[-1]
    conversation, turn = results["state"], results["state"].turns[-1]
    assert turn.stats["left"].engine and turn.stats["left"].error is None and turn.answers["left"]
    server = turn.stats["left"].device  # "vLLM server at host:port"
    assert turn.measured_on["hardware"].startswith(f"Left side: {server}; Right side: ")
    assert "streamed token" in turn.measured_on["timing"]
    saved = talk.recording_after_turn(conversation)["export_recording"].value["path"]
    replayed = recording.read(saved, tmp_path / "media")
    shown = talk.load_recording(saved, new_conversation(handlers.registry))
    assert replayed.turns[0].answers == turn.answers and f"Left side: {server}" in shown["status"]
    for side in ("left", "right"):
        assert replayed.turns[0].stats[side].visual_tokens == turn.stats[side].visual_tokens
    assert replayed.sides["left"].model == engine_label and vllm_server.checkpoint not in json.dumps(
        recording.to_document(replayed, turn.measured_on)
    )
    # the presenter's controls offer what the server serves; its keys step the budget the next request asks for
    controls = talk.controls(conversation, live=True)
    assert not {"FastV", "CDPruner"} & {value for _, value in controls["left_method"].choices}
    stepped = talk.step_budget(conversation, "left", 1)["state"]  # one preset smaller than the server's own
    assert stepped.sides["left"].mode.label == "VisionZip 27+5/tile" and "left_overlay" in talk.preview(stepped)
    turn = list(talk.ask(QUESTIONS[1], stepped))[-1]["state"].turns[-1]
    assert turn.stats["left"].error is None and turn.stats["left"].mode == "VisionZip 27+5/tile"


# -- error cases: no vLLM needed ---------------------------------------------------------------------
class NotVllm(http.server.BaseHTTPRequestHandler):
    """An HTTP server on the address that is not vLLM: 404 everywhere, or (`models`) an OpenAI model list and
    nothing else, as a vLLM server without the plugin's report answers."""

    models = False

    def do_GET(self) -> None:
        if self.models and self.path == "/v1/models":
            body, status = json.dumps({"object": "list", "data": [{"id": "stock"}]}).encode(), 200
        else:
            body, status = b'{"detail": "Not Found"}', 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class StockVllm(NotVllm):
    models = True


class FixedVllm(StockVllm):
    """A vLLM server with the plugin that runs VisionZip 54+10 for every request (no "per_request")."""

    def do_GET(self) -> None:
        if self.path != "/visionzip":
            return super().do_GET()
        options = {"method": "visionzip", "dominant": 54, "contextual": 10}
        architecture = "VisionZipLlavaForConditionalGeneration"  # a LLaVA-1.5 server
        report = {"served_model_names": ["fixed"], "options": options, "image_token_id": 32000, "architecture": architecture}  # fmt: skip
        body = json.dumps(report).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server():
    servers = []

    def serve(handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture(scope="module")
def local_handlers(tmp_path_factory):
    return Handlers(ModelRegistry(device="cpu"), max_new_tokens=4, stops=tmp_path_factory.mktemp("stops"))


def offer(handlers: Handlers, url: str, timeout: float = 5.0) -> str:
    server = EngineServer.at(url)
    server.client = httpx.Client(timeout=timeout)
    return handlers.registry.add_engine(server)


def test_an_unusable_server_is_refused_with_its_reason_and_the_other_side_keeps_answering(
    local_handlers, http_server, silent_port, tmp_path, make_image
):
    cases = {
        f"http://127.0.0.1:{free_port()}": "no vLLM server answers at",
        http_server(NotVllm): "is not a vLLM (OpenAI-compatible) server: HTTP 404",
        http_server(StockVllm): "does not report VisionZip's settings (no /visionzip)",
        f"http://127.0.0.1:{silent_port}": "did not answer in time",
    }
    picture = picture_file(tmp_path, make_image, 480, 640)
    start = local_handlers.set_media({"path": picture}, new_conversation(local_handlers.registry))["state"]
    for url, reason in cases.items():
        label = offer(local_handlers, url, timeout=1.0)
        assert label == f"vLLM server · {url.removeprefix('http://')}"  # listed by its address until it answers
        with pytest.raises(gr.Error, match=re.escape(f"Right side keeps {TINY_LABEL}: ") + ".*" + re.escape(reason)):
            local_handlers.set_model(start, TINY_LABEL, label)
        # the server went away after a side chose it: that side says why, the other side answers
        chosen = {**start.sides, "right": SideConfig(label, start.sides["right"].mode)}
        conversation = list(local_handlers.ask(QUESTIONS[0], replace(start, sides=chosen)))[-1]["state"]
        stats = conversation.turns[-1].stats
        assert reason in stats["right"].error and stats["left"].error is None and conversation.turns[-1].answers["left"]
        assert reason in local_handlers.headers(conversation)["right_header"]
        assert str(tmp_path) not in stats["right"].error


def test_a_server_without_per_request_keeps_its_own_method_and_budget(local_handlers, http_server):
    start = new_conversation(local_handlers.registry)
    label = offer(local_handlers, http_server(FixedVllm))
    conversation = local_handlers.set_model(start, TINY_LABEL, label)["state"]
    assert conversation.sides["right"].mode.label == SERVER_MODE and local_handlers.registry.family(label) == "llava"
    conversation = right_mode(local_handlers, conversation, "VisionZip 64", "VisionZip")["state"]
    assert conversation.sides["right"].mode.label == SERVER_MODE  # the server's, not the page's
    controls = local_handlers.mode_controls(conversation)
    assert not controls["right_method"].interactive and not controls["right_mode"].interactive
    assert [value for _, value in controls["right_mode"].choices] == [conversation.sides["right"].mode.name]
    assert "set when it starts" in local_handlers.headers(conversation)["right_header"]


def test_a_vllm_side_refuses_video_and_the_other_side_answers(local_handlers):
    label = offer(local_handlers, f"http://127.0.0.1:{free_port()}")
    start = new_conversation(local_handlers.registry)
    start = local_handlers.set_media(None, start, video={"path": str(ROOT / "assets" / "rolling_ball.gif")})["state"]
    chosen = {**start.sides, "right": SideConfig(label, FULL_MODE)}
    conversation = list(local_handlers.ask(QUESTIONS[0], replace(start, sides=chosen, num_frames=2)))[-1]["state"]
    stats = conversation.turns[-1].stats
    assert stats["right"].error == NO_VIDEO and stats["left"].error is None
    chosen["left"] = SideConfig(label, FULL_MODE)  # neither side local: the filmstrip says why, no error
    assert NO_VIDEO in local_handlers.refresh_filmstrip(replace(conversation, sides=chosen))["legend"]


def test_app_py_engine_option_starts_a_side_on_the_server_or_says_why_not(app_main, vllm_server, engine_label):
    make_registry, parse_args = app_main.make_registry, app_main.parse_args
    down = f"http://127.0.0.1:{free_port()}"
    registry = make_registry(parse_args(["--device", "cpu", "--engine", f"right={vllm_server.url}", "--engine", down]))
    conversation = new_conversation(registry)
    assert conversation.sides["right"].model == engine_label and conversation.sides["left"].model == TINY_LABEL
    assert conversation.sides["right"].mode.label == "VisionZip 54+10/tile"
    registry = make_registry(parse_args(["--device", "cpu", "--engine", f"left={down}"]))  # not up yet: still listed
    handlers = Handlers(registry, max_new_tokens=4, stops=Path("/nonexistent"))
    header = handlers.headers(new_conversation(registry))["left_header"]
    assert "not reached yet" in header and "no vLLM server answers" in header


def test_engine_addresses_are_checked():
    for bad in ("127.0.0.1:8000", "http://127.0.0.1:8000/some/path", "file:///srv/model"):
        with pytest.raises(ValueError, match="http"):
            EngineServer.at(bad)
    assert EngineServer.at("http://127.0.0.1:8000/v1/").url == "http://127.0.0.1:8000"


# -- the API and a browser ---------------------------------------------------------------------------
def test_the_api_runs_a_side_on_the_server_and_names_a_dead_one(
    registry, app_url, engine_label, reduced_count, tmp_path, make_image
):
    dead = next(label for label in registry.engines if label != engine_label)
    client = Client(app_url, verbose=False)
    client.predict(handle_file(picture_file(tmp_path, make_image, 480, 640)), api_name="/set_media")
    with pytest.raises(Exception, match="no vLLM server answers"):
        client.predict(TINY_LABEL, dead, api_name="/set_model")
    client.predict(TINY_LABEL, engine_label, api_name="/set_model")
    _, right, stats, _ = client.predict(QUESTIONS[0], api_name="/ask")
    served = next(record for record in stats if record["side"] == "right")
    assert served["error"] is None and served["visual_tokens"] == reduced_count(480, 640)
    assert served["engine"] and right[-1]["content"]
    with pytest.raises(Exception, match="FastV is not in the list of choices"):  # not served: not offered
        client.predict(right_mode="FastV 320", right_method="FastV", api_name="/set_mode")
    client.predict(right_mode="DivPrune 160", right_method="DivPrune", api_name="/set_mode")
    _, right, stats, _ = client.predict(QUESTIONS[1], api_name="/ask")
    served = [record for record in stats if record["side"] == "right"][-1]
    assert served["mode"] == "DivPrune 160/image"
    assert served["error"] is None and served["visual_tokens"] == reduced_count(480, 640, "divprune:160")
    client.predict(right_mode="VisionZip 640", right_method="VisionZip", api_name="/set_mode")
    _, right, stats, _ = client.predict(QUESTIONS[0], api_name="/ask")
    refused, local = ([record for record in stats if record["side"] == side][-1] for side in ("right", "left"))
    assert f"more than the {reduced_count(480, 640)} of the server's {SERVER_MODE}" in refused["error"]
    assert local["error"] is None and local["turn"] == refused["turn"] == 3


@pytest.mark.browser
def test_a_browser_page_with_one_side_on_vllm_and_one_local(page, engine_label):
    page.set_input_files("#media input[type=file]", str(ROOT / "assets" / "house_and_car.png"))
    wait_for_text(page, "media-info", "672x672")
    choose(page, "right-model", engine_label)
    wait_for_text(page, "right-header", "With VisionZip on vLLM")
    wait_for_text(page, "right-header", "no overlay, difference view or budget scrubbing")
    ask_turns(page, QUESTIONS)
    wait_for_text(page, "right-chat", "over HTTP (the server does not split vision and prefill)")
    wait_for_text(page, "left-chat", "vision ")
    page.get_by_role("tab", name="What the method keeps").click()
    wait_for_text(page, "overlay-legend", "The right side runs on a vLLM server")
    page.screenshot(path=str(ARTIFACTS / "browser_engine.png"), full_page=True)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
