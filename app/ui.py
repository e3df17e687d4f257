"""The page: one message box that asks both sides, two chat columns, what VisionZip keeps, charts.

Every event that touches a model or changes the conversation shares one queue slot
(`concurrency_id="gpu"`), so the two sides never run at the same time, no two users' timings overlap,
and a change made while a turn streams waits for it; the queue and uploads are bounded.  Named
endpoints (`/set_media`, `/set_frames`, `/ask`, `/clear`, `/set_mode`, `/set_model`) let `gradio_client`
drive a whole conversation (`/set_mode` also switches a side to its model's tuned projector, given
with `--projector`); the conversation lives in a per-session `gr.State`, which the client keeps
across calls.

Handlers load the models they need in the server process and hand the model work to `gpu_task`
functions (`ask_on_gpu`, `select_tokens`), which ZeroGPU runs in a worker process: those only run
models already loaded, take and return plain picklable data, and draw nothing.
"""

import atexit
import filecmp
import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import gradio as gr
from PIL import Image

import visionzip
from app import charts, overlay
from app.chat import (
    CUSTOM,
    FULL,
    SIDES,
    ContextTooLong,
    Conversation,
    Mode,
    SideConfig,
    StopFlag,
    TurnRefused,
    describe_error,
    frame_selections,
    image_selection,
    load_media,
    load_side_models,
    make_mode,
    messages_for,
    mode_choices,
    run_turn,
    translate_mode,
    tuned_mode,
    use_mode,
    video_tokens,
)
from app.media import MediaError, detect_media_kind, load_image
from app.models import LoadedModel, ModelLoadError, ModelRegistry, gpu_task, resolve_device, timing_method
from app.stats import TurnStats, export_csv, export_json, summary_line
from app.video import DEFAULT_FRAMES, MAX_FRAMES, describe_clip, filmstrip, load_clip
from visionzip.video import tokens_per_frame

log = logging.getLogger(__name__)

SIDE_NAMES = {"left": "Without VisionZip", "right": "With VisionZip"}
DEFAULT_MODES = {"left": FULL, "right": "VisionZip 320"}
CUSTOM_START = (54, 10)  # the custom D/C boxes' first values: VisionZip 320's budget per tile
ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_BANNER = (
    "⚠️ **Tiny offline model.** Its weights are random, so its *answers are meaningless noise*; "
    "its *token counts and timings are real*: it has LLaVA-NeXT's exact image geometry (336x336 tiles of "
    "24x24 patches, the same grids). Start with `--model llava-hf/llava-v1.6-vicuna-7b-hf` on a GPU for real answers."
)
CSS = """
#banner { background: #fff4d6; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px; }
#summary p { font-size: 1.5rem !important; line-height: 1.4; }
#summary small { font-size: 1rem; }
.side-header { min-height: 6.2em; }  /* both columns' controls line up whatever the header's length */
.side-header h3 { margin: 0; }
.message-wrap .message { font-size: 1.05em; }
"""
NO_IMAGE = "Upload an image to see which tokens VisionZip keeps."
NO_VISIONZIP = "Neither side uses VisionZip: pick a VisionZip mode to see what it keeps."
VIDEO_TYPES = ["video", ".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"]
MAX_UPLOAD = "200mb"  # a phone video of a minute or two; larger uploads are refused before they are stored
QUEUE_SIZE = 32  # events waiting for the model slot (about 16 visitors' turns); the next visitor is asked to retry
STREAM_INTERVAL_S = 0.1  # redraw streaming answers at most this often: a browser re-renders the whole chat each time
EXPORTS = Path(tempfile.gettempdir()) / "visionzip-live-exports"


def same_file(path: str, other: str) -> bool:
    try:
        return filecmp.cmp(path, other, shallow=False)
    except OSError:
        return False


def uploaded_path(upload: dict | None) -> str | None:
    """The server path of an upload that reaches its handler unprocessed (as gr.FileData).  Media
    handlers skip Gradio's preprocessing: gr.Image's opens the file with PIL, so a bad file fails with
    a bare "Error" and CMYK, 16-bit and transparent images are flattened before app.media sees them."""
    return upload.get("path") if upload else None


# -- rendering (plain functions of the conversation) ---------------------------------------------
def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def stats_line(stats: TurnStats, frames: int | None = None) -> str:
    clip = f"{frames} frames · " if frames is not None else ""
    return (
        f"{stats.mode} · {clip}**{stats.visual_tokens:,}** visual + {stats.text_tokens:,} text = {stats.context_tokens:,} tokens · "
        f"vision {_ms(stats.vision_ms)} · prefill {_ms(stats.prefill_ms)} · "
        f"decode {stats.decode_tokens_per_s:,.0f} tok/s · KV cache {stats.kv_cache_bytes / 2**20:,.1f} MiB"
    )


def chat_messages(conversation: Conversation, side: str) -> list[dict]:
    messages = []
    for turn in conversation.turns:
        messages.append({"role": "user", "content": turn.question})
        answer, stats = turn.answers[side], turn.stats.get(side)
        if turn.running == side:
            text = answer + " ▌"
        elif stats is None:
            text = "… waiting: the other side runs first this turn" if turn.running else f"{answer} ■ stopped".lstrip()
        elif stats.error:
            text = (answer + "\n\n" if answer else "") + f"⚠️ {stats.error}"
        else:
            text = f"{answer.strip() or '(empty answer)'}\n\n<small>{stats_line(stats, turn.frames.get(side))}</small>"
        messages.append({"role": "assistant", "content": text})
    return messages


def summary_markdown(conversation: Conversation) -> str:
    """The latest turn's ratio large, earlier turns below; full (more visual tokens) -> reduced."""
    lines = []
    for number, turn in reversed(list(enumerate(conversation.turns, start=1))):
        pair = [turn.stats.get(side) for side in SIDES]
        if None in pair:
            continue
        full, reduced = sorted(pair, key=lambda stats: -stats.visual_tokens)
        line = summary_line(full, reduced)
        same_input = full.visual_tokens == reduced.visual_tokens and len(set(turn.frames.values())) <= 1
        if line and same_input:  # e.g. VisionZip with and without the tuned projector: a speed ratio would be noise
            left, right = pair
            line = f"{left.visual_tokens:,} visual tokens on both sides (left: {left.mode}; right: {right.mode})"
        elif line and turn.frames:
            line += f" ({turn.frames[full.side]} -> {turn.frames[reduced.side]} frames)"
        if line:
            lines.append(f"Turn {number}: {line}")
    if not lines:
        return ""
    return f"**{lines[0]}**" + "".join(f"<br><small>{line}</small>" for line in lines[1:])


def stats_records(conversation: Conversation) -> list[dict]:
    return [asdict(stats) for stats in conversation.all_stats()]


def side_header(registry: ModelRegistry, conversation: Conversation, side: str, max_new_tokens: int) -> str:
    config = conversation.sides[side]
    title = "With VisionZip" if config.mode.enabled else "Without VisionZip"
    title += " + tuned projector" if config.mode.tuned else ""
    detail = f"{config.model} · {config.mode.label}"
    loaded = next((m for m in registry.loaded() if m.label == config.model), None)
    if loaded is not None and conversation.media_path is not None and conversation.media_kind == "video":
        detail += " · " + video_budget(loaded, conversation, side, max_new_tokens)
    elif loaded is not None and conversation.media_path is not None:
        image, _ = load_image(conversation.media_path)
        with use_mode(loaded, config.mode):
            detail += (
                f" · **{loaded.handle.num_image_tokens((image.height, image.width)):,} visual tokens** for this image"
            )
    return f"### {title}\n{detail}"


def video_budget(loaded: LoadedModel, conversation: Conversation, side: str, max_new_tokens: int) -> str:
    """This side's visual tokens for the clip and whether the next turn fits its context window,
    known before anything runs (the same check that refuses the turn)."""
    messages = messages_for(conversation, side, "")
    try:
        clip, input_ids, per_frame = video_tokens(
            loaded, conversation.sides[side].mode, conversation, messages, max_new_tokens
        )
    except ContextTooLong as error:
        return f"**refused:** {error}"
    except MediaError as error:
        return f"⚠️ {error}"
    frames = len(clip.frames)
    return (
        f"**{frames} frames × {per_frame} = {frames * per_frame:,} visual tokens** for this clip · **fits** its "
        f"{loaded.context_window:,}-token context window ({input_ids.shape[1]:,} before the question + {max_new_tokens} to answer)"
    )


def banner_update(registry: ModelRegistry, conversation: Conversation) -> dict:
    tiny = any(registry.is_tiny(conversation.sides[side].model) for side in SIDES)
    return gr.Markdown(TINY_BANNER, visible=tiny)


def models_markdown(registry: ModelRegistry) -> str:
    loaded = registry.loaded()
    device = resolve_device(registry.device_name)
    lines = [f"- {model.describe()}" for model in loaded] or ["- none yet: a model loads on first use"]
    return (
        "**Loaded models** (both sides share one copy of each; the least recently used is unloaded when "
        "a new one does not fit in GPU memory):\n" + "\n".join(lines) + f"\n\n**Timing:** {timing_method(device)}. "
        "Prefill = vision encode + LLM prefill, up to the first new token."
    )


def tuned_box(registry: ModelRegistry, conversation: Conversation, side: str) -> dict:
    """The side's "tuned projector" checkbox settings: shown only when its model has one, ticked when in use."""
    config = conversation.sides[side]
    projector = registry.projector_for(config.model)
    label = f"+ tuned projector ({projector.describe()})" if projector else "+ tuned projector"
    return dict(value=config.mode.tuned is not None, label=label, visible=projector is not None)


def new_conversation(registry: ModelRegistry) -> Conversation:
    family = registry.family(registry.default)
    sides = {
        side: SideConfig(registry.default, translate_mode(make_mode(DEFAULT_MODES[side], "llava_next"), family))
        for side in SIDES
    }
    return Conversation(sides)


def vision_side(conversation: Conversation) -> str | None:
    """The side whose budget the overlay shows: the right one if it uses VisionZip, else the left."""
    return next((side for side in ("right", "left") if conversation.sides[side].mode.enabled), None)


def export_files(conversation: Conversation, session: str) -> tuple[str, str]:
    """The conversation's measurements as JSON and CSV files, one folder per browser session."""
    folder = EXPORTS / hashlib.sha256(session.encode()).hexdigest()[:16]  # the client picks session ids: no raw paths
    folder.mkdir(parents=True, exist_ok=True)
    stats = conversation.all_stats()
    (folder / "visionzip_turns.json").write_text(export_json(stats))
    (folder / "visionzip_turns.csv").write_text(export_csv(stats))
    return str(folder / "visionzip_turns.json"), str(folder / "visionzip_turns.csv")


# -- the page -------------------------------------------------------------------------------------
def build_demo(registry: ModelRegistry | None = None, max_new_tokens: int = 128) -> gr.Blocks:
    registry = registry or ModelRegistry()
    start = new_conversation(registry)
    stops = Path(tempfile.mkdtemp(prefix="visionzip-live-stops-"))  # one StopFlag file per browser session
    atexit.register(shutil.rmtree, stops, ignore_errors=True)
    model_labels = list(registry.choices)

    def headers_for(conversation: Conversation) -> list[str]:
        return [side_header(registry, conversation, side, max_new_tokens) for side in SIDES]

    with gr.Blocks(title="VisionZip Live") as demo:
        state = gr.State(start)
        selection_state = gr.State(None)  # the overlay's ImageSelection: view switches redraw without the model
        question = gr.Textbox(
            label="question", visible=False
        )  # the submitted question, once the message box is cleared

        gr.Markdown(
            "# VisionZip Live\nThe same question, answered twice: with every visual token (left) and with "
            "[VisionZip](https://arxiv.org/abs/2412.04467)'s few dominant + contextual tokens (right). "
            "Each side re-reads the whole conversation every turn, so the saving shows on every turn."
        )
        banner = gr.Markdown(TINY_BANNER, visible=registry.is_tiny(registry.default), elem_id="banner")

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                media = gr.Image(type="filepath", label="Image", height=300, elem_id="media")
                video = gr.File(label="… or a video", file_types=VIDEO_TYPES, height=140, elem_id="video")
                media_info = gr.Markdown(
                    "Images: PNG, JPEG, WebP, GIF, BMP, TIFF. Videos: MP4, WebM, MOV, AVI, MKV, animated GIF.",
                    elem_id="media-info",
                )
                with gr.Group():
                    frames = gr.Slider(
                        1,
                        MAX_FRAMES,
                        value=DEFAULT_FRAMES,
                        step=1,
                        label="Video frames, sampled uniformly",
                        elem_id="frames",
                    )
                    same_budget = gr.Checkbox(
                        False,
                        label="Same budget: VisionZip gets as many frames as fit in the full side's tokens",
                        elem_id="same-budget",
                    )
                examples = sorted(str(path) for path in ASSETS.glob("*.png"))
                if examples:
                    gr.Examples(
                        examples=[[path] for path in examples], inputs=[media], cache_examples=False, label="Examples"
                    )
            columns = {}
            for side in SIDES:
                with gr.Column(scale=2):
                    header = gr.Markdown(
                        side_header(registry, start, side, max_new_tokens),
                        elem_id=f"{side}-header",
                        elem_classes="side-header",
                    )
                    with gr.Row():
                        model = gr.Dropdown(
                            model_labels, value=start.sides[side].model, label="Model", elem_id=f"{side}-model", scale=2
                        )
                        mode = gr.Dropdown(
                            mode_choices(registry.family(registry.default)),
                            value=start.sides[side].mode.name,
                            label="Mode",
                            elem_id=f"{side}-mode",
                            scale=1,
                            min_width=150,
                        )
                    tuned = gr.Checkbox(
                        **tuned_box(registry, start, side),
                        info="The same tokens, through a projector fine-tuned for VisionZip (the paper's VisionZip‡)",
                        elem_id=f"{side}-tuned",
                    )
                    with gr.Row(visible=False) as custom_row:
                        dominant = gr.Number(
                            CUSTOM_START[0],
                            label="Dominant tokens per tile (D, counts CLS)",
                            precision=0,
                            elem_id=f"{side}-dominant",
                        )
                        contextual = gr.Number(
                            CUSTOM_START[1],
                            label="Contextual tokens per tile (C)",
                            precision=0,
                            elem_id=f"{side}-contextual",
                        )
                    chat = gr.Chatbot(
                        label=SIDE_NAMES[side], show_label=False, height=460, elem_id=f"{side}-chat", buttons=["copy"]
                    )
                columns[side] = dict(
                    header=header,
                    model=model,
                    mode=mode,
                    tuned=tuned,
                    custom_row=custom_row,
                    dominant=dominant,
                    contextual=contextual,
                    chat=chat,
                )

        with gr.Row():
            message = gr.Textbox(
                placeholder="Ask both sides about the image, e.g. 'What is in this picture?' (Enter to send)",
                show_label=False,
                scale=6,
                elem_id="message",
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            regenerate = gr.Button("Regenerate", scale=1, elem_id="regenerate")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        summary = gr.Markdown(elem_id="summary")
        models_info = gr.Markdown(models_markdown(registry), elem_id="models-info")

        with gr.Tabs():
            with gr.Tab("What VisionZip keeps", elem_id="tab-overlay"):
                view = gr.Dropdown(["all"], value="all", label="Tiles", elem_id="overlay-view")
                filmstrip_gallery = gr.Gallery(
                    label="Filmstrip", columns=6, height="auto", visible=False, elem_id="filmstrip"
                )
                legend = gr.Markdown(NO_IMAGE, elem_id="overlay-legend")
                with gr.Column() as image_views:  # hidden, with the view, for a video: its frames are in the filmstrip
                    with gr.Row():
                        overlay_image = gr.Image(
                            label="Kept and merged tokens",
                            show_label=False,
                            type="pil",
                            interactive=False,
                            elem_id="overlay",
                        )
                        heatmap_image = gr.Image(
                            label="CLS attention", show_label=False, type="pil", interactive=False, elem_id="heatmap"
                        )
                    attention_plot = gr.Plot(show_label=False, elem_id="attention-chart")
            with gr.Tab("Charts", elem_id="tab-charts"):
                tokens_plot = gr.Plot(charts.tokens_chart([]), show_label=False, elem_id="tokens-chart")
                times_plot = gr.Plot(charts.times_chart([]), show_label=False, elem_id="times-chart")
                speedup_plot = gr.Plot(charts.speedup_chart([]), show_label=False, elem_id="speedup-chart")
            with gr.Tab("Export", elem_id="tab-export"):
                with gr.Row():
                    export_json_button = gr.DownloadButton("Download JSON", elem_id="export-json")
                    export_csv_button = gr.DownloadButton("Download CSV", elem_id="export-csv")
                stats_json = gr.JSON(label="Per-turn measurements", elem_id="stats-json")

        chats = [columns[side]["chat"] for side in SIDES]
        headers = [columns[side]["header"] for side in SIDES]
        conversation_views = [*chats, stats_json, summary]

        def render(conversation: Conversation) -> list:
            return [
                *(chat_messages(conversation, side) for side in SIDES),
                stats_records(conversation),
                summary_markdown(conversation),
            ]

        # -- media ---------------------------------------------------------------------------------
        def set_media(
            image: dict | None,
            conversation: Conversation,
            video: dict | None = None,
            num_frames: float = DEFAULT_FRAMES,
            same_budget: bool = False,
            event: gr.EventData = None,
        ):
            """Make an uploaded image or video (gr.FileData; told apart by content, a video wins when the
            API is given both) the conversation's media; new media starts a new conversation.  On an
            unreadable file the previous media and conversation stay."""
            image, video = uploaded_path(image), uploaded_path(video)
            boxes = {"media": image, "video": video}
            trigger = getattr(event.target, "elem_id", None) if event is not None else None
            if trigger in boxes:
                other = "video" if trigger == "media" else "media"
                # an emptied box (perhaps by an upload in the other) leaves the other box's file in use
                source = trigger if boxes[trigger] or not boxes[other] else other
                path = boxes[source]
                # the file in use shown again (the other box emptied, or put back after a refused upload; Gradio may
                # cache it under a new path): the same conversation goes on
                if path and conversation.media_path and same_file(path, conversation.media_path):
                    return (
                        conversation,
                        *render(conversation),
                        gr.skip(),
                        *headers_for(conversation),
                        gr.skip(),
                        gr.skip(),
                    )
            else:  # an API call
                source, path = None, video or image
            num_frames = frame_count(num_frames)
            info, kind = "", "image"
            if path:
                try:
                    kind = detect_media_kind(path)
                    if kind == "video":
                        info = describe_clip(Path(path).name, load_clip(path, num_frames))
                    else:
                        picture, notes = load_image(path)
                        info = f"{picture.width}x{picture.height} image" + (f" ({'; '.join(notes)})" if notes else "")
                except MediaError as error:
                    raise gr.Error(str(error)) from None
            conversation = replace(
                conversation,
                media_path=path or None,
                media_kind=kind,
                turns=[],
                num_frames=num_frames,
                same_budget=bool(same_budget),
            )
            # the box that was not used is emptied, so the page shows only the media in use
            empty_image = None if source == "video" and image else gr.skip()
            empty_video = None if source == "media" and video else gr.skip()
            return conversation, *render(conversation), info, *headers_for(conversation), empty_image, empty_video

        def show_media(conversation: Conversation):
            """The upload boxes as the media in use: a refused file leaves no trace in them."""
            path, kind = conversation.media_path, conversation.media_kind
            return (path if kind == "image" else None), (path if kind == "video" else None)

        def frame_count(value: float) -> int:
            if value != int(value) or not 1 <= value <= MAX_FRAMES:
                raise gr.Error(f"The frame count must be a whole number from 1 to {MAX_FRAMES}, got {value}.")
            return int(value)

        def set_frames(conversation: Conversation, num_frames: float, same_budget: bool):
            """Frames sampled from the video, and the "same budget" mode; the conversation goes on, as
            after a mode change (each turn re-reads the clip with the current frames)."""
            conversation = replace(conversation, num_frames=frame_count(num_frames), same_budget=bool(same_budget))
            info = gr.skip()
            if conversation.media_kind == "video":
                try:
                    info = describe_clip(
                        Path(conversation.media_path).name, load_clip(conversation.media_path, conversation.num_frames)
                    )
                except MediaError as error:
                    raise gr.Error(str(error)) from None
            return conversation, info, *headers_for(conversation)

        # -- asking --------------------------------------------------------------------------------
        def take_message(text: str):
            return "", text

        def stop_flag(request: gr.Request | None) -> StopFlag:
            session = request.session_hash if request else ""
            return StopFlag(stops / hashlib.sha256(session.encode()).hexdigest()[:16])  # the client picks session ids

        def ask(question: str, conversation: Conversation, request: gr.Request):
            """Ask both sides `question` about the conversation's image; streams both chat columns."""
            load_side_models(registry, conversation)
            stop = stop_flag(request)
            stop.clear()
            try:
                yield from ask_on_gpu(question, conversation, stop)
            finally:
                stop.clear()

        @gpu_task(duration_s=120)
        def ask_on_gpu(question: str, conversation: Conversation, stop: StopFlag):
            shown, shown_at = None, 0.0
            try:
                for current in run_turn(registry, conversation, question, max_new_tokens, stop):
                    turn = current.turns[-1]
                    progress = (turn.running, len(turn.stats))
                    if progress != shown or time.monotonic() - shown_at >= STREAM_INTERVAL_S:
                        shown, shown_at = progress, time.monotonic()
                        yield current, *render(current)
                yield conversation, *render(conversation)
            except (TurnRefused, ValueError, MediaError, ModelLoadError) as error:
                raise gr.Error(str(error)) from None
            except Exception as error:  # on ZeroGPU anything but gr.Error would reach the page as "worker error"
                log.exception("turn failed")
                raise gr.Error(f"The turn failed: {type(error).__name__}: {error}") from None

        def request_stop(request: gr.Request):
            stop_flag(request).set()

        def pop_last_turn(conversation: Conversation):
            if not conversation.turns:
                raise gr.Error("Nothing to regenerate yet.")
            last = conversation.turns[-1]
            conversation = replace(conversation, turns=conversation.turns[:-1])
            return conversation, last.question, *render(conversation)

        def clear_conversation(conversation: Conversation):
            conversation = replace(conversation, turns=[])
            return conversation, *render(conversation)

        def after_turn(conversation: Conversation, request: gr.Request):
            turns = conversation.all_stats()
            return (
                charts.tokens_chart(turns),
                charts.times_chart(turns),
                charts.speedup_chart(turns),
                *export_files(conversation, request.session_hash if request else ""),
                models_markdown(registry),
                *headers_for(conversation),
            )

        # -- modes and models ----------------------------------------------------------------------
        def set_mode(
            conversation: Conversation,
            left_mode: str,
            left_dominant: float,
            left_contextual: float,
            right_mode: str,
            right_dominant: float,
            right_contextual: float,
            left_tuned: bool = False,
            right_tuned: bool = False,
        ):
            """Both sides' modes: FULL, a preset ("VisionZip 320") or CUSTOM with dominant/contextual per tile,
            each with its model's tuned projector (`left_tuned`/`right_tuned`) when the app was given one."""
            sides = dict(conversation.sides)
            values = {
                "left": (left_mode, left_dominant, left_contextual, left_tuned),
                "right": (right_mode, right_dominant, right_contextual, right_tuned),
            }
            for side, (name, dominant, contextual, tuned) in values.items():
                try:
                    loaded = registry.get(sides[side].model)
                    mode = make_mode(name, loaded.family, dominant, contextual, loaded.handle.tokens_per_tile)
                    mode = tuned_mode(mode, loaded, bool(tuned))
                except (ValueError, ModelLoadError) as error:
                    raise gr.Error(f"{SIDE_NAMES[side]} side: {error}") from None
                sides[side] = replace(sides[side], mode=mode)
            conversation = replace(conversation, sides=sides)
            rows = [gr.Row(visible=conversation.sides[side].mode.name == CUSTOM) for side in SIDES]
            return conversation, *rows, *headers_for(conversation)

        def set_model(conversation: Conversation, left_model: str, right_model: str):
            """Load (on first use) and select each side's model; a mode preset maps to the new
            model family's.  On failure the previous models keep serving."""
            sides = dict(conversation.sides)
            for side, label in zip(SIDES, (left_model, right_model)):
                try:
                    loaded = registry.get(label)
                    mode = translate_mode(sides[side].mode, loaded.family)
                    # the tuned projector stays chosen while the new model has one too
                    mode = tuned_mode(mode, loaded, mode.tuned is not None and loaded.projector is not None)
                except ModelLoadError as error:
                    raise gr.Error(f"{SIDE_NAMES[side]} side keeps {sides[side].model}: {error}") from None
                sides[side] = SideConfig(label, mode)
            conversation = replace(conversation, sides=sides)
            modes = [
                gr.Dropdown(
                    choices=mode_choices(registry.get(conversation.sides[side].model).family),
                    value=conversation.sides[side].mode.name,
                )
                for side in SIDES
            ]
            return (
                conversation,
                *modes,
                *headers_for(conversation),
                banner_update(registry, conversation),
                models_markdown(registry),
                *(gr.Checkbox(**tuned_box(registry, conversation, side)) for side in SIDES),
            )

        def show_models(conversation: Conversation):
            return [gr.Dropdown(value=conversation.sides[side].model) for side in SIDES]

        def show_modes(conversation: Conversation) -> list:
            """Each side's mode controls as the budget in force: a refused budget leaves no trace."""
            controls = []
            for side in SIDES:
                mode = conversation.sides[side].mode
                dominant, contextual = (mode.dominant, mode.contextual) if mode.enabled else CUSTOM_START
                controls += [gr.Dropdown(value=mode.name), dominant, contextual, gr.Row(visible=mode.name == CUSTOM)]
                controls.append(gr.Checkbox(value=mode.tuned is not None))
            return controls

        # -- what VisionZip keeps ------------------------------------------------------------------
        def overlay_views(selection, conversation: Conversation, chosen: str) -> tuple:
            """(legend, view choices, overlay, heatmap, attention chart) for one view of the selection."""
            side = vision_side(conversation)
            if selection is None or side is None:
                return gr.skip(), gr.Dropdown(choices=["all"], value="all"), None, None, None
            picture = load_media(conversation)
            choices = overlay.view_choices(selection)
            chosen = chosen if chosen in choices else "all"
            config = conversation.sides[side]
            budget = visionzip.Budget(config.mode.dominant, config.mode.contextual)
            title = f"**{SIDE_NAMES[side]} side**: {config.model}, {config.mode.label}.\n\n"
            return (
                title + overlay.legend_markdown(selection, chosen),
                gr.Dropdown(choices=choices, value=chosen),
                overlay.draw_overlay(picture, selection, chosen),
                overlay.draw_attention_heatmap(picture, selection, chosen),
                charts.attention_chart(selection, budget, chosen),
            )

        def refresh_overlay(conversation: Conversation, chosen: str):
            """Run the vision tower alone under the VisionZip side's budget and draw what it keeps."""
            side = vision_side(conversation)
            if conversation.media_kind == "video":  # the filmstrip shows it, with its own legend
                return None, gr.skip(), *overlay_views(None, conversation, chosen)[1:]
            if conversation.media_path is None or side is None:
                note = NO_IMAGE if conversation.media_path is None else NO_VISIONZIP
                return None, note, *overlay_views(None, conversation, chosen)[1:]
            config = conversation.sides[side]
            try:
                registry.get(config.model)
                picture = load_media(conversation)
            except (ValueError, ModelLoadError, MediaError) as error:
                raise gr.Error(str(error)) from None
            selection = select_tokens(config.model, config.mode, (picture,), frames=False)[0]
            return selection, *overlay_views(selection, conversation, chosen)

        @gpu_task(duration_s=30)
        def select_tokens(
            label: str, mode: Mode, pictures: tuple[Image.Image, ...], frames: bool
        ) -> list[visionzip.ImageSelection]:
            """What VisionZip keeps and merges under `mode` on each picture: images (anyres tiles) or a
            clip's frames (one tile each), from the vision tower alone; drawing happens outside."""
            try:
                loaded = registry.ready(label)
                if frames:
                    return frame_selections(loaded, pictures, mode)
                return [image_selection(loaded, picture, mode) for picture in pictures]
            except Exception as error:  # on ZeroGPU anything but gr.Error would reach the page as "worker error"
                raise gr.Error(describe_error(error)) from None

        def refresh_filmstrip(conversation: Conversation):
            """For a video: each frame the VisionZip side sees (or, with no VisionZip side, the left
            side's), with what VisionZip keeps and merges on it; the image views are hidden."""
            if conversation.media_kind != "video":
                return (
                    gr.Gallery(value=None, visible=False),
                    gr.skip(),
                    gr.Dropdown(visible=True),
                    gr.Column(visible=True),
                )
            side = vision_side(conversation) or "left"
            config = conversation.sides[side]
            title = f"**{SIDE_NAMES[side]} side**: {config.model}, {config.mode.label}"
            try:
                loaded = registry.get(config.model)
                messages = messages_for(conversation, side, "")
                clip, _, per_frame = video_tokens(loaded, config.mode, conversation, messages, max_new_tokens)
                with loaded.handle.use(enabled=False):
                    full = tokens_per_frame(loaded.handle)
                selections = (
                    select_tokens(config.model, config.mode, clip.frames, frames=True) if config.mode.enabled else None
                )
                strip = gr.Gallery(
                    value=filmstrip(clip, loaded.family, selections, full),
                    label=f"{len(clip.frames)} frames",
                    visible=True,
                )
                legend_text = (
                    f"{title}: {len(clip.frames)} frames, each one 336x336 tile of {per_frame} tokens. "
                    + (
                        "Yellow: kept (dominant) tokens; colours: contextual groups, ⚪ on each group's target. "
                        if selections
                        else NO_VISIONZIP + " "
                    )
                    + (
                        "Frames are shown squashed to the square base tile the model sees."
                        if loaded.family == "llava_next"
                        else "Frames are shown centre-cropped, as the model sees them."
                    )
                )
            except ContextTooLong as error:
                strip, legend_text = gr.Gallery(value=None, visible=False), f"{title}: **refused:** {error}"
            except (ValueError, ModelLoadError, MediaError) as error:
                raise gr.Error(str(error)) from None
            return strip, legend_text, gr.Dropdown(visible=False), gr.Column(visible=False)

        # -- wiring --------------------------------------------------------------------------------
        # Model work and every change to the conversation share one slot: a change made while a turn
        # streams (new media, clear, regenerate) waits for it instead of being overwritten by its next chunk.
        gpu = dict(concurrency_id="gpu", concurrency_limit=1)
        quiet = dict(api_visibility="private", show_progress="hidden")  # follow-up refreshes: no spinners
        overlay_outputs = [selection_state, legend, view, overlay_image, heatmap_image, attention_plot]
        after_outputs = [
            tokens_plot,
            times_plot,
            speedup_plot,
            export_json_button,
            export_csv_button,
            models_info,
            *headers,
        ]
        filmstrip_outputs = [filmstrip_gallery, legend, view, image_views]

        media_change = gr.on(
            [media.change, video.change],
            set_media,
            [media, state, video, frames, same_budget],
            [state, *conversation_views, media_info, *headers, media, video],
            api_name="set_media",
            preprocess=False,  # the files reach set_media unopened (see uploaded_path)
            **gpu,
        )
        media_change.success(refresh_overlay, [state, view], overlay_outputs, api_visibility="private", **gpu).then(
            refresh_filmstrip, [state], filmstrip_outputs, api_visibility="private", **gpu
        ).then(after_turn, [state], after_outputs, **quiet)
        media_change.failure(show_media, [state], [media, video], api_visibility="private", show_progress="hidden")

        gr.on(
            [frames.change, same_budget.input],  # change: dragged or typed (release misses typing)
            set_frames,
            [state, frames, same_budget],
            [state, media_info, *headers],
            api_name="set_frames",
            trigger_mode="always_last",
            show_progress="hidden",
            **gpu,
        ).success(refresh_filmstrip, [state], filmstrip_outputs, api_visibility="private", **gpu)

        submitted = gr.on(
            [message.submit, send.click],
            take_message,
            [message],
            [message, question],
            queue=False,
            api_visibility="private",
        )
        asked = submitted.then(
            ask, [question, state], [state, *conversation_views], api_name="ask", show_progress="minimal", **gpu
        )
        asked.then(after_turn, [state], after_outputs, **quiet)
        stop.click(request_stop, None, None, queue=False, api_visibility="private")

        regenerated = regenerate.click(
            pop_last_turn, [state], [state, question, *conversation_views], api_visibility="private", **gpu
        ).success(
            ask,
            [question, state],
            [state, *conversation_views],
            api_visibility="private",
            show_progress="minimal",
            **gpu,
        )
        regenerated.then(after_turn, [state], after_outputs, **quiet)

        clear.click(clear_conversation, [state], [state, *conversation_views], api_name="clear", **gpu).then(
            after_turn, [state], after_outputs, **quiet
        )
        for chat in chats:  # a chat column's own trash button clears the whole conversation, not just the view
            chat.clear(clear_conversation, [state], [state, *conversation_views], api_visibility="private", **gpu).then(
                after_turn, [state], after_outputs, **quiet
            )

        mode_inputs, mode_triggers = [state], []
        for side in SIDES:
            parts = columns[side]
            mode_inputs += [parts["mode"], parts["dominant"], parts["contextual"]]
            mode_triggers += [parts["mode"].input, parts["dominant"].submit, parts["dominant"].blur]
            mode_triggers += [parts["contextual"].submit, parts["contextual"].blur, parts["tuned"].input]
        mode_inputs += [
            columns[side]["tuned"] for side in SIDES
        ]  # last, so older callers' positional arguments still fit
        mode_change = gr.on(
            mode_triggers,
            set_mode,
            mode_inputs,
            [state, *(columns[side]["custom_row"] for side in SIDES), *headers],
            api_name="set_mode",
            trigger_mode="always_last",
            show_progress="hidden",
            **gpu,  # may load a model on first use
        )
        mode_controls = [
            columns[side][part] for side in SIDES for part in ("mode", "dominant", "contextual", "custom_row", "tuned")
        ]
        mode_change.failure(show_modes, [state], mode_controls, api_visibility="private", show_progress="hidden")
        mode_change.success(refresh_overlay, [state, view], overlay_outputs, api_visibility="private", **gpu).then(
            refresh_filmstrip, [state], filmstrip_outputs, api_visibility="private", **gpu
        )

        model_change = gr.on(
            [columns[side]["model"].input for side in SIDES],
            set_model,
            [state, *(columns[side]["model"] for side in SIDES)],
            [
                state,
                *(columns[side]["mode"] for side in SIDES),
                *headers,
                banner,
                models_info,
                *(columns[side]["tuned"] for side in SIDES),
            ],
            api_name="set_model",
            **gpu,
        )
        model_change.success(refresh_overlay, [state, view], overlay_outputs, api_visibility="private", **gpu).then(
            refresh_filmstrip, [state], filmstrip_outputs, api_visibility="private", **gpu
        )
        model_change.failure(show_models, [state], [columns[side]["model"] for side in SIDES], api_visibility="private")

        view.input(overlay_views, [selection_state, state, view], overlay_outputs[1:], api_visibility="private")

    demo.queue(max_size=QUEUE_SIZE)
    return demo


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
