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
from app.page import CSS, Page

MAX_UPLOAD = "200mb"  # a phone video of a minute or two; larger uploads are refused before they are stored
QUEUE_SIZE = 32  # events waiting for the model slot (about 16 visitors' turns); the next visitor is asked to retry

# The names each event's handler may return, in the order of its outputs.
VIEWS = ["state", "left_chat", "right_chat", "stats_json", "summary"]
HEADERS = [f"{side}_header" for side in SIDES]
MEDIA = [*VIEWS, "media_info", *HEADERS, "media", "video"]
OVERLAY = ["selection_state", "legend", "view", "overlay", "heatmap", "attention_plot"]
AFTER_TURN = ["tokens_plot", "times_plot", "speedup_plot", "export_json", "export_csv", "models_info", *HEADERS]
FILMSTRIP = ["filmstrip", "legend", "view", "image_views"]
MODE_CONTROLS = [
    f"{side}_{part}" for side in SIDES for part in ("mode", "dominant", "contextual", "custom_row", "tuned")
]
MODEL_OUTPUTS = ["state", "left_mode", "right_mode", *HEADERS, "banner", "models_info", "left_tuned", "right_tuned"]


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


def build_demo(registry: ModelRegistry | None = None, max_new_tokens: int = 128) -> gr.Blocks:
    registry = registry or ModelRegistry()
    stops = Path(tempfile.mkdtemp(prefix="visionzip-live-stops-"))  # one StopFlag file per browser session
    atexit.register(shutil.rmtree, stops, ignore_errors=True)
    handlers = Handlers(registry, max_new_tokens, stops)
    with gr.Blocks(title="VisionZip Live") as demo:
        page = Page(registry, new_conversation(registry), max_new_tokens)
        wire(page, handlers)
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def wire(page: Page, handlers: Handlers) -> None:
    """Every event of the page, in one place."""

    def on(triggers, handler: Callable, inputs: list[str], outputs: list[str], **options):
        return gr.on(
            triggers, adapt(handler, outputs), [page[n] for n in inputs], [page[n] for n in outputs], **options
        )

    # Model work and every change to the conversation share one slot: a change made while a turn
    # streams (new media, clear, regenerate) waits for it instead of being overwritten by its next chunk.
    gpu = dict(concurrency_id="gpu", concurrency_limit=1)
    private = dict(api_visibility="private")
    quiet = dict(api_visibility="private", show_progress="hidden")  # follow-up refreshes: no spinners

    def refresh_tokens(event):
        """After a change of media, mode or model: what the reducing side keeps, image or video."""
        event = event.success(
            adapt(handlers.refresh_overlay, OVERLAY),
            [page["state"], page["view"]],
            [page[n] for n in OVERLAY],
            **private,
            **gpu,
        )
        return event.then(
            adapt(handlers.refresh_filmstrip, FILMSTRIP),
            [page["state"]],
            [page[n] for n in FILMSTRIP],
            **private,
            **gpu,
        )

    after_turn = (adapt(handlers.after_turn, AFTER_TURN), [page["state"]], [page[n] for n in AFTER_TURN])

    media_inputs = ["media", "state", "video", "frames", "same_budget"]
    media = page["media"], page["video"]
    # preprocess=False: the files reach set_media unopened (see handlers.uploaded_path)
    media_change = on(
        [media[0].change, media[1].change],
        handlers.set_media,
        media_inputs,
        MEDIA,
        api_name="set_media",
        preprocess=False,
        **gpu,
    )
    refresh_tokens(media_change).then(*after_turn, **quiet)
    media_change.failure(
        adapt(handlers.show_media, ["media", "video"]), [page["state"]], list(media), show_progress="hidden", **private
    )

    frames = on(
        [page["frames"].change, page["same_budget"].input],  # change: dragged or typed (release misses typing)
        handlers.set_frames,
        ["state", "frames", "same_budget"],
        ["state", "media_info", *HEADERS],
        api_name="set_frames",
        trigger_mode="always_last",
        show_progress="hidden",
        **gpu,
    )
    frames.success(
        adapt(handlers.refresh_filmstrip, FILMSTRIP), [page["state"]], [page[n] for n in FILMSTRIP], **private, **gpu
    )

    submitted = on(
        [page["message"].submit, page["send"].click],
        handlers.take_message,
        ["message"],
        ["message", "question"],
        queue=False,
        **private,
    )
    asked = submitted.then(
        adapt(handlers.ask, VIEWS),
        [page["question"], page["state"]],
        [page[n] for n in VIEWS],
        api_name="ask",
        show_progress="minimal",
        **gpu,
    )
    asked.then(*after_turn, **quiet)
    page["stop"].click(handlers.request_stop, None, None, queue=False, **private)

    regenerated = on(
        [page["regenerate"].click], handlers.pop_last_turn, ["state"], [*VIEWS, "question"], **private, **gpu
    )
    regenerated = regenerated.success(
        adapt(handlers.ask, VIEWS),
        [page["question"], page["state"]],
        [page[n] for n in VIEWS],
        show_progress="minimal",
        **private,
        **gpu,
    )
    regenerated.then(*after_turn, **quiet)

    on([page["clear"].click], handlers.clear_conversation, ["state"], VIEWS, api_name="clear", **gpu).then(
        *after_turn, **quiet
    )
    # a chat column's own trash button clears the whole conversation, not just the view
    chat_clears = [page[f"{side}_chat"].clear for side in SIDES]
    on(chat_clears, handlers.clear_conversation, ["state"], VIEWS, **private, **gpu).then(*after_turn, **quiet)

    wire_modes(page, handlers, on, refresh_tokens, gpu)


def wire_modes(page: Page, handlers: Handlers, on: Callable, refresh_tokens: Callable, gpu: dict) -> None:
    """Mode and model changes, and the overlay's view switch."""
    mode_inputs, mode_triggers = ["state"], []
    for side in SIDES:
        mode_inputs += [f"{side}_mode", f"{side}_dominant", f"{side}_contextual"]
        mode_triggers += [page[f"{side}_mode"].input, page[f"{side}_dominant"].submit, page[f"{side}_dominant"].blur]
        mode_triggers += [
            page[f"{side}_contextual"].submit,
            page[f"{side}_contextual"].blur,
            page[f"{side}_tuned"].input,
        ]
    mode_inputs += [f"{side}_tuned" for side in SIDES]  # last, so older callers' positional arguments still fit
    mode_outputs = ["state", *(f"{side}_custom_row" for side in SIDES), *HEADERS]
    # may load a model on first use
    mode_change = on(
        mode_triggers,
        handlers.set_mode,
        mode_inputs,
        mode_outputs,
        api_name="set_mode",
        trigger_mode="always_last",
        show_progress="hidden",
        **gpu,
    )
    mode_change.failure(
        adapt(handlers.show_modes, MODE_CONTROLS),
        [page["state"]],
        [page[n] for n in MODE_CONTROLS],
        api_visibility="private",
        show_progress="hidden",
    )
    refresh_tokens(mode_change)

    model_triggers = [page[f"{side}_model"].input for side in SIDES]
    model_change = on(
        model_triggers,
        handlers.set_model,
        ["state", "left_model", "right_model"],
        MODEL_OUTPUTS,
        api_name="set_model",
        **gpu,
    )
    refresh_tokens(model_change)
    models = [f"{side}_model" for side in SIDES]
    model_change.failure(
        adapt(handlers.show_models, models), [page["state"]], [page[n] for n in models], api_visibility="private"
    )

    view_outputs = OVERLAY[1:]
    page["view"].input(
        adapt(handlers.overlay_views, view_outputs),
        [page["selection_state"], page["state"], page["view"]],
        [page[n] for n in view_outputs],
        api_visibility="private",
    )


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **options) -> tuple:
    """Serve `demo` with the page's theme and styles (Gradio 6 takes them at launch)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(),
        css=CSS,
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,
        **options,
    )
