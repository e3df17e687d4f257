"""The page, assembled: the layout (`app.page`), the handlers (`app.handlers`) and, here, the wiring of
events to handlers in one place.

Every event that touches a model or changes the conversation shares one queue slot
(`concurrency_id="gpu"`), so the two sides never run at the same time, no two users' timings overlap,
and a change made while a turn streams waits for it; the queue and uploads are bounded.  Named
endpoints (`/set_media`, `/set_frames`, `/ask`, `/clear`, `/set_mode`, `/set_model`) let `gradio_client`
drive a whole conversation (`/set_mode` also switches a side to its model's tuned projector, given
with `--projector`); the conversation lives in a per-session `gr.State`, which the client keeps
across calls.  Handlers load the models they need in the server process and hand the model work to
GPU tasks, which ZeroGPU runs in a worker process.
"""

import atexit
import functools
import inspect
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from app.conversation import SIDES
from app.handlers import Handlers, new_conversation
from app.models import ModelRegistry
from app.page import ASSETS, CSS, Page
from app.presenter import TALK_CSS, TALK_KEYS, build_talk
from app.talk import TalkHandlers

MAX_UPLOAD = "200mb"  # a phone video of a minute or two; larger uploads are refused before they are stored
QUEUE_SIZE = 32  # events waiting for the model slot (about 16 visitors' turns); the next visitor is asked to retry

# The names each event's handler may return, in the order of its outputs.
VIEWS = ["state", "left_chat", "right_chat", "stats_json", "summary"]
HEADERS = [f"{side}_header" for side in SIDES]
MEDIA = [*VIEWS, "media_info", *HEADERS, "media", "video"]
OVERLAY = ["selection_state", "legend", "view", "overlay", "heatmap", "attention_plot", "scrub", "scrub_info"]
SCRUB = ["selection_state", "legend", "overlay", "scrub_info"]  # the budget slider's redraw
AFTER_TURN = [
    "tokens_plot",
    "times_plot",
    "speedup_plot",
    "quality_plot",
    "export_json",
    "export_csv",
    "models_info",
    *HEADERS,
]
FILMSTRIP = ["filmstrip", "legend", "view", "image_views"]
DIFFERENCE = ["difference_table", "difference_image", "difference_json"]
# what follows a side's mode (the custom boxes' labels say the family's unit; their values follow in MODE_CONTROLS)
MODE_PARTS = ("method", "mode", "custom_row", "tokens_row", "dominant", "contextual", "tokens")
MODE_VIEW = [f"{side}_{part}" for side in SIDES for part in MODE_PARTS]
MODE_CONTROLS = [*MODE_VIEW, *(f"{side}_tuned" for side in SIDES)]
MODE_OUTPUTS = ["state", *MODE_VIEW, *HEADERS]
MODEL_OUTPUTS = ["state", *HEADERS, *MODE_VIEW, "banner", "models_info", "left_tuned", "right_tuned"]


def ordered(results: dict | None, names: list[str]):
    """A handler's named results as the event's output values; a name it left out keeps its component."""
    results = results or {}
    unknown = sorted(set(results) - set(names))
    if unknown:  # a handler and its event's outputs disagree: a wiring mistake, not a user's
        raise KeyError(f"results {unknown} are not outputs of this event ({names})")
    values = [results.get(name, gr.skip()) for name in names]
    return values[0] if len(values) == 1 else tuple(values)


def adapt(handler: Callable, names: list[str]) -> Callable:
    """`handler` as Gradio calls it: the same signature (so the API keeps its parameter names and
    Gradio still injects requests and progress), positional outputs in the order of `names`."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streamed(*args, **kwargs):
            for results in handler(*args, **kwargs):
                yield ordered(results, names)

        return streamed

    @functools.wraps(handler)
    def single(*args, **kwargs):
        return ordered(handler(*args, **kwargs), names)

    return single


def build_demo(registry: ModelRegistry | None = None, max_new_tokens: int = 128, talk_first: bool = False) -> gr.Blocks:
    """The researcher's page at `/` and the presenter view at `/talk`; `talk_first`: the presenter view
    at `/` and the researcher's page at `/research`."""
    registry = registry or ModelRegistry()
    stops = Path(tempfile.mkdtemp(prefix="visionzip-live-stops-"))  # one StopFlag file per browser session
    atexit.register(shutil.rmtree, stops, ignore_errors=True)
    handlers = Handlers(registry, max_new_tokens, stops)
    talk = TalkHandlers(handlers)

    def research() -> None:
        Wiring(Page(registry, new_conversation(registry), max_new_tokens), handlers, talk).wire()

    def presenter() -> None:
        build_talk(registry, talk, Wiring)

    first, second, route = (presenter, research, "research") if talk_first else (research, presenter, "talk")
    with gr.Blocks(title="VisionZip Live") as demo:
        first()
    with demo.route("Researcher page" if talk_first else "Presenter view", f"/{route}"):
        second()
    demo.queue(max_size=QUEUE_SIZE)
    return demo


class Wiring:
    """Every event of the page, in one place: `on` connects triggers to a handler by component names,
    `follow` chains a handler after an event (`then`, `success` or `failure`)."""

    # Model work and everything that reads the conversation to write it, a header or a control share one
    # slot: a change made while a turn streams (new media, clear, regenerate) waits for it instead of being
    # overwritten by its next chunk, and no refresh writes back a mode the user has changed since it began.
    GPU = dict(concurrency_id="gpu", concurrency_limit=1)
    PRIVATE = dict(api_visibility="private")
    QUIET = dict(api_visibility="private", show_progress="hidden")  # follow-up refreshes: no spinners

    def __init__(self, page: Page, handlers: Handlers, talk: TalkHandlers | None = None) -> None:
        self.page, self.handlers, self.talk = page, handlers, talk

    def components(self, names: list[str]) -> list:
        return [self.page[name] for name in names]

    def on(self, triggers: list, handler: Callable, inputs: list[str], outputs: list[str], **options):
        return gr.on(triggers, adapt(handler, outputs), self.components(inputs), self.components(outputs), **options)

    def follow(self, step: Callable, handler: Callable, inputs: list[str], outputs: list[str], **options):
        return step(adapt(handler, outputs), self.components(inputs), self.components(outputs), **options)

    def wire(self) -> None:
        compare = self.page["compare"].click
        self.on([compare], self.handlers.compare_sides, ["state", "view"], DIFFERENCE, api_name="compare", **self.GPU)
        settings = {"quality_check": self.handlers.set_quality, "keep_cache": self.handlers.set_cache}
        for name, handler in settings.items():  # conversation settings: each its own endpoint
            self.on([self.page[name].input], handler, ["state", name], ["state"], api_name=handler.__name__, **self.GPU)
        self.wire_media()
        self.wire_turns()
        self.wire_modes()
        self.wire_models()
        self.wire_recordings()
        self.follow(
            self.page["view"].input,
            self.handlers.overlay_views,
            ["selection_state", "state", "view"],
            OVERLAY[1:6],
            **self.PRIVATE,
        )
        self.wire_scrub()

    def wire_scrub(self) -> None:
        """The budget slider redraws on release (not on every step of a drag), from the tower's cache."""
        options = dict(api_name="scrub", trigger_mode="always_last", show_progress="hidden", **self.GPU)
        redrawn = self.on(
            [self.page["scrub"].release], self.handlers.scrub_overlay, ["state", "scrub", "view"], SCRUB, **options
        )
        chart = self.handlers.scrub_chart  # the attention chart's cut follows, after the overlay is on screen
        self.follow(redrawn.success, chart, ["selection_state", "view"], ["attention_plot"], **self.QUIET)

    def refresh_tokens(self, event):
        """After a change of media, mode or model: what the reducing side keeps, image or video."""
        event = self.follow(
            event.success, self.handlers.refresh_overlay, ["state", "view"], OVERLAY, **self.PRIVATE, **self.GPU
        )
        event = self.follow(
            event.then, self.handlers.refresh_filmstrip, ["state"], FILMSTRIP, **self.PRIVATE, **self.GPU
        )
        return self.follow(
            event.then, self.handlers.compare_sides, ["state", "view"], DIFFERENCE, **self.QUIET, **self.GPU
        )

    def after_turn(self, event) -> None:
        if self.talk is not None:  # the conversation as a recording, for "Download recording"
            self.follow(event.then, self.talk.recording_after_turn, ["state"], ["export_recording"], **self.QUIET)
        # in the slot: it writes the headers from the conversation it read, so a mode change made while it
        # ran would otherwise be overwritten by the old mode's header
        event = self.follow(event.then, self.handlers.after_turn, ["state"], AFTER_TURN, **self.QUIET, **self.GPU)
        # a text-dependent method chose anew (or kept its frozen choice): the overlay shows which
        self.follow(event.then, self.handlers.overlay_after_turn, ["state", "view"], OVERLAY, **self.QUIET, **self.GPU)

    def wire_media(self) -> None:
        page, handlers = self.page, self.handlers
        media_inputs = ["media", "state", "video", "frames", "same_budget"]
        triggers = [page["media"].change, page["video"].change]
        # preprocess=False: the files reach set_media unopened (see handlers.uploaded_path)
        changed = self.on(
            triggers, handlers.set_media, media_inputs, MEDIA, api_name="set_media", preprocess=False, **self.GPU
        )
        self.after_turn(self.refresh_tokens(changed))
        self.follow(changed.failure, handlers.show_media, ["state"], ["media", "video"], **self.QUIET, **self.GPU)

        triggers = [
            page["frames"].change,
            page["same_budget"].input,
        ]  # change: dragged or typed (release misses typing)
        options = dict(api_name="set_frames", trigger_mode="always_last", show_progress="hidden", **self.GPU)
        frames = self.on(
            triggers,
            handlers.set_frames,
            ["state", "frames", "same_budget"],
            ["state", "media_info", *HEADERS],
            **options,
        )
        self.follow(frames.success, handlers.refresh_filmstrip, ["state"], FILMSTRIP, **self.PRIVATE, **self.GPU)

    def wire_turns(self) -> None:
        page, handlers = self.page, self.handlers
        triggers = [page["message"].submit, page["send"].click]
        submitted = self.on(
            triggers, handlers.take_message, ["message"], ["message", "question"], queue=False, **self.PRIVATE
        )
        asked = self.follow(
            submitted.then,
            handlers.ask,
            ["question", "state"],
            VIEWS,
            api_name="ask",
            show_progress="minimal",
            **self.GPU,
        )
        self.after_turn(asked)
        page["stop"].click(handlers.request_stop, None, None, queue=False, **self.PRIVATE)

        popped = self.on(
            [page["regenerate"].click],
            handlers.pop_last_turn,
            ["state"],
            [*VIEWS, "question"],
            **self.PRIVATE,
            **self.GPU,
        )
        options = dict(show_progress="minimal", **self.PRIVATE, **self.GPU)
        self.after_turn(self.follow(popped.success, handlers.ask, ["question", "state"], VIEWS, **options))

        self.after_turn(
            self.on([page["clear"].click], handlers.clear_conversation, ["state"], VIEWS, api_name="clear", **self.GPU)
        )
        # a chat column's own trash button clears the whole conversation, not just the view
        chat_clears = [page[f"{side}_chat"].clear for side in SIDES]
        self.after_turn(self.on(chat_clears, handlers.clear_conversation, ["state"], VIEWS, **self.PRIVATE, **self.GPU))

    def wire_modes(self) -> None:
        page, inputs, triggers = self.page, ["state"], []
        for side in SIDES:
            inputs += [f"{side}_mode", f"{side}_dominant", f"{side}_contextual"]
            boxes = (page[f"{side}_dominant"], page[f"{side}_contextual"], page[f"{side}_tokens"])
            triggers += [page[f"{side}_{name}"].input for name in ("method", "mode", "tuned")]
            triggers += [event for box in boxes for event in (box.submit, box.blur)]
        # after the first ones, so older callers' positional arguments still fit
        inputs += [f"{side}_tuned" for side in SIDES] + [f"{side}_method" for side in SIDES]
        inputs += [f"{side}_tokens" for side in SIDES]
        options = dict(api_name="set_mode", trigger_mode="always_last", show_progress="hidden", **self.GPU)
        changed = self.on(triggers, self.handlers.set_mode, inputs, MODE_OUTPUTS, **options)  # may load a model
        self.follow(changed.failure, self.handlers.show_modes, ["state"], MODE_CONTROLS, **self.QUIET, **self.GPU)
        self.refresh_tokens(changed)
        for side in SIDES:  # "match": this side's method at the other side's count
            handler = getattr(self.handlers, f"match_{side}")
            matched = self.on(
                [page[f"{side}_match"].click],
                handler,
                ["state"],
                ["state", *MODE_CONTROLS, *HEADERS],
                api_name=f"match_{side}",
                **self.GPU,
            )
            self.refresh_tokens(matched)

    def wire_models(self) -> None:
        models = [f"{side}_model" for side in SIDES]
        triggers = [self.page[name].input for name in models]
        # "always_last": a pick made while the other side's model is still loading runs after it (Gradio's
        # default, "once", dropped it: the dropdown showed the new model while the side kept the old one)
        options = dict(api_name="set_model", trigger_mode="always_last", **self.GPU)
        changed = self.on(triggers, self.handlers.set_model, ["state", *models], MODEL_OUTPUTS, **options)
        self.refresh_tokens(changed)
        self.follow(changed.failure, self.handlers.show_models, ["state"], models, **self.PRIVATE, **self.GPU)

    def wire_recordings(self) -> None:
        """Replay a recording on this page: no model runs, nothing after it is refreshed from one."""
        if self.talk is None:
            return
        outputs = [*VIEWS, *HEADERS, "media_info", *AFTER_TURN[:4], *OVERLAY]
        upload = self.page["load_recording"].upload
        self.on([upload], self.talk.replay_on_page, ["load_recording", "state"], outputs, **self.PRIVATE, **self.GPU)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **options) -> tuple:
    """Serve `demo` with the page's theme and styles (Gradio 6 takes them at launch)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(),
        css=CSS + TALK_CSS,
        head=TALK_KEYS,
        allowed_paths=[str(ASSETS)],  # the presenter view's examples are served from assets/
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,
        **options,
    )
