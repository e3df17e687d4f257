"""A side served by a running vLLM server with the visionzip_vllm plugin (`python app.py --engine URL`): the
conversation sent as OpenAI chat messages over HTTP (httpx), the answer streamed and timed on this app's clock
(time.perf_counter around the request: the network and the server's queue are in it).

What the server reports is what the side shows: its method and budget come from the plugin's `GET /visionzip`
(the server's own model config, `visionzip_vllm/report.py`), or, on a server started with "per_request", from
the side's own choice, sent with each request as the plugin's `mm_processor_kwargs` (`request_options`; the
server refuses, with its reason, a budget above its own count per image).  The visual-token count comes from
vLLM's `/tokenize` of the same messages and options (the image placeholder's copies: the plugin's reduced
count), the text tokens from the answer's `usage.prompt_tokens` less that count.  What a server cannot give
(the vision / prefill split, which tokens the method kept, the full first-token distribution) is said on the
page (`LIMITS`), never guessed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from PIL import Image

from app.modes import FULL as FULL_TITLE
from app.modes import FULL_MODE, Mode
from app.stats import TurnStats
from visionzip_vllm.options import FULL, OPTIONS_KEY, REFUSED, STOCK_ARCHITECTURES, server_settings
from visionzip_vllm.report import MIDDLEWARE, PATH

if TYPE_CHECKING:
    from app.models import ModelRegistry

LABEL_PREFIX = "vLLM server · "  # every engine side's model label starts so (see is_engine_label)
CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 120.0  # the longest wait for the server's next streamed token
FIXED = "its method and budget are the server's (set when it starts)"
PER_REQUEST = (
    "its method and budget are sent with each request (the server lets requests choose them, up to its own count "
    "per image: a larger budget is refused with the server's reason)"
)
LIMITS = (  # {method}: FIXED or PER_REQUEST
    "runs on a vLLM server: {method}; TTFT and decode speed are measured on this app's clock over HTTP, with "
    "no vision / prefill split and no per-layer counts; the server does not return which tokens it kept (no "
    "overlay, difference view or budget scrubbing for this side) nor the full first-token distribution (no KL "
    "quality signal); the KV-cache toggle does not apply (vLLM's own prefix cache reuses the repeated conversation)"
)
NO_QUALITY = "not on a vLLM side: the KL needs the first token's full distribution, which the server does not return"
NO_VIDEO = "A vLLM side answers about images only here: send an image, or pick a local model for video."
NO_CACHE_TOGGLE = "the toggle does not apply to a vLLM side (vLLM's automatic prefix cache reuses repeated prefixes)"


FAMILIES = {  # vLLM's stock architecture -> the library's family
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaForConditionalGeneration": "llava",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
}


# a request may ask a server for at most its own count of visual tokens (vLLM sizes its caches from it)
FULL_REFUSED = (
    "Full asks for every visual token, more than this server's own {server} lets a request ask for (vLLM sizes "
    "its encoder cache and KV cache from it): to compare against the full model, start a server without reduction"
)


def request_options(mode: Mode) -> dict:
    """A side's Mode as the plugin's per-request options (`mm_processor_kwargs["visionzip"]`)."""
    if not mode.enabled:
        return {"method": FULL}
    if mode.method == "visionzip":
        return {"method": "visionzip", "dominant": mode.dominant, "contextual": mode.contextual}
    return {"method": mode.method, "tokens": mode.tokens, "seed": mode.seed}


def limits(report: ServerReport | None) -> str:
    """What a side on this server cannot show, and whose method and budget it runs (`LIMITS`)."""
    return LIMITS.format(method=PER_REQUEST if report is not None and report.per_request else FIXED)


class EngineError(RuntimeError):
    """The server could not serve a side; the message is for the page (the server's address, never a path)."""


def is_engine_label(label: str) -> bool:
    return label.startswith(LABEL_PREFIX)


@dataclass(frozen=True)
class ServerReport:
    """What the plugin's GET /visionzip says the server runs."""

    served_model: str
    options: dict | None  # the "visionzip" options of --hf-overrides; None: the model runs stock
    image_token_id: int
    architecture: str | None = None  # the served model class (ours, or vLLM's stock one)

    @property
    def per_request(self) -> bool:
        """Whether requests may choose their own method and budget (the plugin's "per_request" option)."""
        return bool(self.options and self.options.get("per_request", False))

    @property
    def family(self) -> str:
        """The library's model family the server runs ("llava_next" when it does not say)."""
        stock = {ours: stock for stock, ours in STOCK_ARCHITECTURES.items()}.get(self.architecture, self.architecture)
        return FAMILIES.get(stock, "llava_next")

    def serves(self, method: str) -> bool:
        """Whether a request may ask for `method` (a library name, or the page's FULL): not FastV or CDPruner (the
        plugin's REFUSED, with its reasons), and not every token from a server that reduces (`FULL_REFUSED`)."""
        if method in (FULL, FULL_TITLE):
            return not self.mode.enabled
        return method not in REFUSED

    def check_request(self, mode: Mode) -> None:
        """A ValueError with the plugin's reason where a request cannot ask for `mode`'s method."""
        if not mode.enabled and self.mode.enabled:
            raise ValueError(FULL_REFUSED.format(server=self.mode.label))
        if mode.enabled and mode.method in REFUSED:
            raise ValueError(REFUSED[mode.method])

    @property
    def mode(self) -> Mode:
        """The server's reduction as the app's Mode (its label is the library's description of the settings)."""
        settings = server_settings({OPTIONS_KEY: self.options}) if self.options is not None else None
        if settings is None or not settings.enabled:
            return FULL_MODE
        budget = settings.budget
        mode = Mode("", True, budget.dominant, budget.contextual, None, settings.method, settings.tokens, settings.seed)
        return replace(mode, name=f"{mode.label} (the server's)")


@dataclass
class EngineServer:
    """One vLLM server the app can use as a side's engine, and what it last reported."""

    url: str  # scheme://host:port, no path
    report: ServerReport | None = None
    problem: str | None = None  # why the last report could not be read
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=httpx.Timeout(CONNECT_TIMEOUT_S)))

    @classmethod
    def at(cls, url: str) -> EngineServer:
        """A server at `url` (http(s)://host:port, a trailing /v1 allowed); ValueError for anything else."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.rstrip("/") not in ("", "/v1"):
            raise ValueError(f"--engine takes a vLLM server's address, http(s)://HOST:PORT, not {url!r}")
        return cls(f"{parts.scheme}://{parts.netloc}")

    def describe(self) -> str:
        """Its model-list label: the served model and method as last reported, and its address."""
        served = f"{self.report.served_model} ({self.report.mode.label}) at " if self.report else ""
        return f"{LABEL_PREFIX}{served}{urlsplit(self.url).netloc}"

    def read_report(self) -> ServerReport:
        """Ask the server what it serves and runs (GET /v1/models, GET /visionzip); EngineError says why not."""
        try:
            models = self._get_json("/v1/models", "a vLLM (OpenAI-compatible) server")
            report = self._get_json(PATH, "a server with the visionzip_vllm plugin's report")
            served = report.get("served_model_names") or [model["id"] for model in models["data"]]
            read = ServerReport(served[0], report["options"], int(report["image_token_id"]), report.get("architecture"))
            read.mode  # noqa: B018 - options this app's plugin code cannot read raise here, not in a later view
            self.report, self.problem = read, None
            return self.report
        except EngineError as error:
            self.problem = str(error)
            raise
        except (KeyError, TypeError, ValueError) as error:
            self.problem = f"the server at {self.url} answered {PATH} with something unexpected ({error})"
            raise EngineError(self.problem) from None

    def _get_json(self, path: str, what: str) -> dict:
        response = self.request("GET", path)
        if response.status_code == 404 and path == PATH:
            raise EngineError(
                f"the server at {self.url} does not report VisionZip's settings (no {PATH}): it is not a vLLM server "
                f"with the visionzip_vllm plugin, or was started without --middleware {MIDDLEWARE}"
            )
        return checked_json(response, f"{self.url}{path}", what)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.client.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as error:
            raise EngineError(transport_problem(self.url, error)) from None


def offer_server(registry: ModelRegistry, entry: str) -> str:
    """One `--engine [SIDE=]URL`, offered in the registry's model lists (on SIDE's first): listed under what the
    server reports now; a server not up yet is listed by its address and read again when a side picks it (its
    header then says why it could not be read).  Returns the label; ValueError for an address that is not one."""
    side, equals, url = entry.partition("=")
    if not (equals and side in ("left", "right")):
        side, url = "", entry
    server = EngineServer.at(url)
    try:
        server.read_report()
    except EngineError as error:
        logging.getLogger("app").warning("--engine %s: %s", url, error)
    return registry.add_engine(server, side or None)


def transport_problem(url: str, error: httpx.HTTPError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"the vLLM server at {url} did not answer in time ({type(error).__name__})"
    if isinstance(error, httpx.ConnectError):
        return f"no vLLM server answers at {url} (connection refused or unknown host): is it running?"
    return f"the connection to the vLLM server at {url} failed ({type(error).__name__})"


def checked_json(response: httpx.Response, where: str, what: str) -> dict:
    if response.status_code != 200:
        try:
            detail = without_paths(str(response.json()["error"]["message"]))
        except (ValueError, KeyError, TypeError):
            detail = f"HTTP {response.status_code}"
        raise EngineError(f"{where} is not {what}: {detail[:300]}")
    try:
        return response.json()
    except ValueError:
        raise EngineError(f"{where} is not {what}: it did not answer JSON") from None


def without_paths(text: str) -> str:
    """A server's message with its file paths (a checkpoint folder, say) left out: they are no visitor's business."""
    return re.sub(r"(?<![\w.:/])/[^\s'\"`,;)]+", "<path>", text)


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict], image: Image.Image) -> list[dict]:
    """The app's chat messages (app.conversation.messages_for) as OpenAI chat messages: the image, as a data URL,
    where the app's first user turn holds it; text blocks as they are."""
    url = image_data_url(image)
    converted = []
    for message in messages:
        content = [
            {"type": "image_url", "image_url": {"url": url}} if block["type"] == "image" else block
            for block in message["content"]
        ]
        converted.append({"role": message["role"], "content": content})
    return converted


@dataclass
class EngineTurn:
    """One side's turn on a vLLM server: what `app.turn.run_turn` reads of a prepared side (no local model, so
    no selection, cache or logits), and the streamed request that answers it."""

    server: EngineServer
    report: ServerReport
    mode: Mode
    request: list[dict]  # the OpenAI chat messages
    visual_tokens: int
    prompt_tokens: int
    mm_kwargs: dict | None = None  # the side's own method and budget, on a per-request server
    keep_cache: bool = False  # the conversation's KV-cache toggle, which does not apply here (said in the stats)
    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    output: None = None  # the quality signal's logits: a server does not return them
    selection: None = None  # nor what its method kept
    reuse: None = None
    cache: None = None
    tokens: list[tuple[float, str]] | None = None

    def stream(
        self, turn: int, side: str, max_new_tokens: int, stop: threading.Event, label: str
    ) -> Iterator[tuple[str, TurnStats | None]]:
        """Yields (answer so far, None) per streamed token, then (answer, stats)."""
        body = chat_body(self.report, self.request, max_new_tokens, stream=True, mm_kwargs=self.mm_kwargs)
        answer, times, texts, usage = "", [], [], None
        client = httpx.Client(timeout=httpx.Timeout(ANSWER_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        start = time.perf_counter()
        try:
            with client.stream("POST", f"{self.server.url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    checked_json(response, f"{self.server.url}/v1/chat/completions", "able to answer")
                for chunk in sse_chunks(response):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece is None:
                            continue
                        times.append(time.perf_counter())
                        texts.append(piece)
                        answer += piece
                        yield answer, None
                    if stop.is_set():  # closing the stream makes vLLM abort the request
                        return
        except httpx.HTTPError as error:
            raise EngineError(transport_problem(self.server.url, error)) from None
        finally:
            client.close()
        if usage is None or not times:
            raise EngineError(f"the vLLM server at {self.server.url} ended its answer without tokens or usage")
        self.tokens = [((at - start) * 1000, text) for at, text in zip(times, texts)]
        yield answer, self.stats(turn, side, label, start, times, usage)

    def stats(self, turn: int, side: str, label: str, start: float, times: list[float], usage: dict) -> TurnStats:
        new_tokens = int(usage["completion_tokens"])
        decode_s = times[-1] - times[0]
        prompt = int(usage["prompt_tokens"])
        return TurnStats(
            turn=turn,
            side=side,
            model=label,
            mode=self.mode.label,
            visual_tokens=self.visual_tokens,
            text_tokens=prompt - self.visual_tokens,
            context_tokens=prompt,
            vision_ms=0.0,  # not reported: the page says so (TurnStats.engine)
            ttft_ms=(times[0] - start) * 1000,
            decode_tokens_per_s=(new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else 0.0,
            new_tokens=new_tokens,
            kv_cache_bytes=0,  # the server's paged cache: not reported
            device=f"vLLM server at {urlsplit(self.server.url).netloc}",
            prefilled_tokens=prompt,
            quality_reference=NO_QUALITY if self.mode.enabled else None,
            cache_note=NO_CACHE_TOGGLE if self.keep_cache else None,
            engine=self.server.url,
        )


def chat_body(
    report: ServerReport, messages: list[dict], max_tokens: int, stream: bool, mm_kwargs: dict | None = None
) -> dict:
    """A greedy chat request for the served model (what the app sends; a test sends the same without stream),
    with the side's reduction as vLLM's `mm_processor_kwargs` on a per-request server."""
    body = {"model": report.served_model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def sse_chunks(response: httpx.Response) -> Iterator[dict]:
    """The JSON chunks of an OpenAI server-sent-event stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise EngineError(f"the vLLM server stopped answering: {without_paths(str(chunk['error']))[:300]}")
        yield chunk


def prepare_engine_turn(
    server: EngineServer,
    messages: list[dict],
    image: Image.Image | None,
    max_new_tokens: int,
    keep_cache: bool,
    mode: Mode | None = None,
) -> EngineTurn:
    """Read what the server runs now and count this turn's visual tokens with its /tokenize (the image's
    placeholders, the plugin's reduced count); on a per-request server the side's `mode` runs, sent with both
    requests (a budget the server refuses fails here, with its reason); raises EngineError or ValueError before
    anything is generated."""
    if image is None:
        raise ValueError(NO_VIDEO)
    report = server.read_report()
    request = openai_messages(messages, image)
    if report.per_request:  # the side's choice, in both requests; the server refuses one above its count
        run = mode or report.mode
        report.check_request(run)
        mm_kwargs = {OPTIONS_KEY: request_options(run)}
        where, what = f"the vLLM server at {server.url}", "able to run this side's method and budget"
    else:
        run, mm_kwargs = report.mode, None
        where, what = f"{server.url}/tokenize", "counting tokens"
    body = {"model": report.served_model, "messages": request, "add_generation_prompt": True}
    body |= {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    tokenized = checked_json(server.request("POST", "/tokenize", json=body, timeout=ANSWER_TIMEOUT_S), where, what)
    visual = tokenized["tokens"].count(report.image_token_id)
    return EngineTurn(server, report, run, request, visual, int(tokenized["count"]), mm_kwargs, keep_cache, messages)
