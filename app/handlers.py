"""What each event does, as named members of one class whose dependencies (the registry, the answer
length, the folder of stop flags) are passed in: plain methods a test calls without a server.

Each handler returns a dict of named results ("state", "left_chat", "media_info", ...); `app.ui`
maps the names to the page's components in one place.  A name left out leaves its component as it
is.  Handlers raise `gr.Error` with a message for the user; the conversation they were given is
never changed in place, so a refused change loses nothing.
"""

import filecmp
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr
from PIL import Image

import visionzip
from app import charts, overlay, render, scrub
from app.choices import ShownChoice, changed_note, choice_of, last_turn_ran, recorded_choice, waiting_message
from app.conversation import SIDES, Conversation, SideConfig, load_media, messages_for
from app.engine import NO_VIDEO as ENGINE_NO_VIDEO
from app.engine import EngineError
from app.hosting import gpu_task
from app.media import MediaError, detect_media_kind, load_clip, load_image
from app.models import ModelLoadError, ModelRegistry
from app.modes import (
    CUSTOM,
    CUSTOM_TOKENS,
    FULL,
    FULL_MODE,
    Mode,
    budget_labels,
    checked_on,
    default_mode,
    make_mode,
    matched_mode,
    method_name,
    method_titles,
    mode_choices,
    tile_limit,
    translate_mode,
    tuned_mode,
    use_mode,
)
from app.turn import (
    ContextTooLong,
    StopFlag,
    TurnRefused,
    describe_error,
    load_side_models,
    run_turn,
    unit_tokens,
    video_tokens,
)
from app.video import DEFAULT_FRAMES, MAX_FRAMES, describe_clip, filmstrip, frame_tile, pair_filmstrip

log = logging.getLogger(__name__)

DEFAULT_MODES = {"left": FULL, "right": "VisionZip 320"}
CUSTOM_START = (54, 10)  # the custom D/C boxes' first values: VisionZip 320's budget per tile
CUSTOM_TOKENS_START = 64  # the custom token box's first value: 320 over a 2x2 grid's 5 tiles
NO_IMAGE = "Upload an image to see which tokens each method keeps."
NO_REDUCTION = "Neither side reduces: pick a method to see what it keeps."
NO_DIFFERENCE = "Set both sides to a reduction method (on one model family) to see where their choices differ."
NO_DIFFERENCE_MEDIA = "Upload an image to compare what the two sides keep."
ON_SERVER = (
    "The {side} side runs on a vLLM server, which does not return which tokens its method kept: no overlay, "
    "difference view or budget scrubbing for it."
)
STREAM_INTERVAL_S = 0.1  # redraw streaming answers at most this often: a browser re-renders the whole chat each time
Results = dict[str, object]


def uploaded_path(upload: dict | None) -> str | None:
    """The server path of an upload that reaches its handler unprocessed (as gr.FileData).  Media
    handlers skip Gradio's preprocessing: gr.Image's opens the file with PIL, so a bad file fails with
    a bare "Error" and CMYK, 16-bit and transparent images are flattened before app.media sees them."""
    return upload.get("path") if upload else None


def same_file(path: str, other: str) -> bool:
    try:
        return filecmp.cmp(path, other, shallow=False)
    except OSError:
        return False


def frame_count(value: float) -> int:
    if value != int(value) or not 1 <= value <= MAX_FRAMES:
        raise gr.Error(f"The frame count must be a whole number from 1 to {MAX_FRAMES}, got {value}.")
    return int(value)


def new_conversation(registry: ModelRegistry) -> Conversation:
    family = registry.family(registry.default)
    sides = {
        side: SideConfig(registry.default, translate_mode(make_mode(DEFAULT_MODES[side], "llava_next"), family))
        for side in SIDES
    }
    for side, label in registry.engine_defaults.items():  # --engine SIDE=URL: as the server last reported
        report = registry.engines[label].report
        sides[side] = SideConfig(label, report.mode if report else FULL_MODE)
    return Conversation(sides)


def engine_sides(registry: ModelRegistry, conversation: Conversation) -> list[str]:
    return [side for side in SIDES if registry.is_engine(conversation.sides[side].model)]


class Handlers:
    def __init__(self, registry: ModelRegistry, max_new_tokens: int, stops: Path) -> None:
        self.registry, self.max_new_tokens, self.stops = registry, max_new_tokens, stops
        # The model work, as GPU tasks: ZeroGPU runs them in a worker process (reached by fork, so a
        # bound method serves; only their arguments and results are pickled, and those are plain data).
        self.ask_on_gpu = gpu_task(duration_s=120)(self.ask_on_gpu)
        self.select_tokens = gpu_task(duration_s=30)(self.select_tokens)
        self.run_tower = gpu_task(duration_s=30)(self.run_tower)
        self.towers = scrub.TowerCaches()  # one tower run per image and model: the budget slider's redraws

    # -- what several handlers return ----------------------------------------------------------------
    def views(self, conversation: Conversation) -> Results:
        """The conversation and everything drawn from it alone: both chats, the measurements, the summary."""
        return {
            "state": conversation,
            **{f"{side}_chat": render.chat_messages(conversation, side) for side in SIDES},
            "stats_json": render.stats_records(conversation),
            "summary": render.summary_markdown(conversation),
        }

    def headers(self, conversation: Conversation) -> Results:
        return {
            f"{side}_header": render.side_header(self.registry, conversation, side, self.max_new_tokens)
            for side in SIDES
        }

    # -- media ---------------------------------------------------------------------------------
    def set_media(
        self,
        image: dict | None,
        conversation: Conversation,
        video: dict | None = None,
        num_frames: float = DEFAULT_FRAMES,
        same_budget: bool = False,
        event: gr.EventData = None,
    ) -> Results:
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
            # the file in use shown again (the other box emptied, or put back after a refused upload; Gradio
            # may cache it under a new path): the same conversation goes on
            if path and conversation.media_path and same_file(path, conversation.media_path):
                return {**self.views(conversation), **self.headers(conversation)}
        else:  # an API call
            source, path = None, video or image
        num_frames = frame_count(num_frames)
        kind, info = self._read_media(path, num_frames) if path else ("image", "")
        conversation = replace(
            conversation,
            media_path=path or None,
            media_kind=kind,
            turns=[],
            num_frames=num_frames,
            same_budget=bool(same_budget),
            caches={},  # a new image has the same placeholder ids as the old: its cache must not be reused
        )
        results = {**self.views(conversation), "media_info": info, **self.headers(conversation)}
        # the box that was not used is emptied, so the page shows only the media in use
        if source == "video" and image:
            results["media"] = None
        if source == "media" and video:
            results["video"] = None
        return results

    @staticmethod
    def _read_media(path: str, num_frames: int) -> tuple[str, str]:
        """(kind, info line) of an upload; raises gr.Error with the reason it cannot be read."""
        try:
            kind = detect_media_kind(path)
            if kind == "video":
                return kind, describe_clip(Path(path).name, load_clip(path, num_frames))
            picture, notes = load_image(path)
            return kind, f"{picture.width}x{picture.height} image" + (f" ({'; '.join(notes)})" if notes else "")
        except MediaError as error:
            raise gr.Error(str(error)) from None

    @staticmethod
    def show_media(conversation: Conversation) -> Results:
        """The upload boxes as the media in use: a refused file leaves no trace in them."""
        path, kind = conversation.media_path, conversation.media_kind
        return {"media": path if kind == "image" else None, "video": path if kind == "video" else None}

    def set_frames(self, conversation: Conversation, num_frames: float, same_budget: bool) -> Results:
        """Frames sampled from the video, and the "same budget" mode; the conversation goes on, as
        after a mode change (each turn re-reads the clip with the current frames)."""
        conversation = replace(conversation, num_frames=frame_count(num_frames), same_budget=bool(same_budget))
        results = {"state": conversation, **self.headers(conversation)}
        if conversation.media_kind == "video":
            try:
                clip = load_clip(conversation.media_path, conversation.num_frames)
            except MediaError as error:
                raise gr.Error(str(error)) from None
            results["media_info"] = describe_clip(Path(conversation.media_path).name, clip)
        return results

    def set_quality(self, conversation: Conversation, quality_check: bool) -> Results:
        """The quality check: from the next turn on, one reference prefill with every visual token per
        reducing side (its KL when no full side shares its prompt) and the full answer scored under it."""
        return {"state": replace(conversation, quality_check=bool(quality_check))}

    def set_cache(self, conversation: Conversation, keep_cache: bool) -> Results:
        """Keep each side's KV cache between turns, as a chat server does (later turns prefill only their
        new text; a text-dependent method keeps the tokens it chose for the first question), or re-prefill
        the whole conversation every turn (the method re-selects for every question)."""
        return {"state": replace(conversation, keep_cache=bool(keep_cache), caches={})}

    # -- asking --------------------------------------------------------------------------------
    @staticmethod
    def take_message(text: str) -> Results:
        return {"message": "", "question": text}

    def stop_flag(self, request: gr.Request | None) -> StopFlag:
        session = request.session_hash if request else ""
        return StopFlag(self.stops / hashlib.sha256(session.encode()).hexdigest()[:16])  # clients pick session ids

    def ask(self, question: str, conversation: Conversation, request: gr.Request = None) -> Iterator[Results]:
        """Ask both sides `question` about the conversation's media; streams both chat columns."""
        load_side_models(self.registry, conversation)
        stop = self.stop_flag(request)
        stop.clear()
        try:
            for current in self.ask_on_gpu(question, conversation, stop):
                yield self.views(current)  # drawn here, in the server: the GPU task returns plain data
        finally:
            stop.clear()

    def request_stop(self, request: gr.Request = None) -> None:
        self.stop_flag(request).set()

    def pop_last_turn(self, conversation: Conversation) -> Results:
        if not conversation.turns:
            raise gr.Error("Nothing to regenerate yet.")
        last = conversation.turns[-1]
        conversation = replace(conversation, turns=conversation.turns[:-1], caches={})  # regenerate: from scratch
        return {**self.views(conversation), "question": last.question}

    def clear_conversation(self, conversation: Conversation) -> Results:
        return self.views(replace(conversation, turns=[], caches={}))

    def after_turn(self, conversation: Conversation, request: gr.Request = None) -> Results:
        turns = conversation.all_stats()
        json_file, csv_file = render.export_files(conversation, request.session_hash if request else "")
        return {
            "tokens_plot": charts.tokens_chart(turns),
            "times_plot": charts.times_chart(turns),
            "speedup_plot": charts.speedup_chart(turns),
            "quality_plot": charts.quality_chart(turns),
            "export_json": json_file,
            "export_csv": csv_file,
            "models_info": render.models_markdown(self.registry),
            **self.headers(conversation),
        }

    def ask_on_gpu(self, question: str, conversation: Conversation, stop: StopFlag) -> Iterator[Conversation]:
        """The turn itself; yields the conversation as it fills in, at most every STREAM_INTERVAL_S
        while a side streams, and whenever a side starts or finishes."""
        shown, shown_at = None, 0.0
        try:
            for current in run_turn(self.registry, conversation, question, self.max_new_tokens, stop):
                turn = current.turns[-1]
                progress = (turn.running, len(turn.stats))
                if progress != shown or time.monotonic() - shown_at >= STREAM_INTERVAL_S:
                    shown, shown_at = progress, time.monotonic()
                    yield current
            yield conversation
        except (TurnRefused, ValueError, MediaError, ModelLoadError) as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # on ZeroGPU anything but gr.Error would reach the page as "worker error"
            log.exception("turn failed")
            raise gr.Error(f"The turn failed: {type(error).__name__}: {error}") from None

    # -- modes and models ----------------------------------------------------------------------
    def set_mode(
        self,
        conversation: Conversation,
        left_mode: str,
        left_dominant: float,
        left_contextual: float,
        right_mode: str,
        right_dominant: float,
        right_contextual: float,
        left_tuned: bool = False,
        right_tuned: bool = False,
        left_method: str | None = None,
        right_method: str | None = None,
        left_tokens: float | None = None,
        right_tokens: float | None = None,
        event: gr.EventData = None,
    ) -> Results:
        """Both sides' modes: FULL, a preset of any method ("VisionZip 320", "DivPrune 320"), CUSTOM
        (VisionZip, dominant/contextual per tile) or CUSTOM_TOKENS (`*_method` by title, `*_tokens`),
        each with its model's tuned projector (`*_tuned`) when the app was given one.  When a side's
        method dropdown changed, that side gets the new method's preset of the same rank."""
        trigger = getattr(event.target, "elem_id", None) if event is not None else None
        values = {
            "left": (left_mode, left_dominant, left_contextual, left_tuned, left_method, left_tokens),
            "right": (right_mode, right_dominant, right_contextual, right_tuned, right_method, right_tokens),
        }
        sides = dict(conversation.sides)
        for side, (name, dominant, contextual, tuned, title, tokens) in values.items():
            if self.registry.is_engine(sides[side].model):
                try:  # a per-request server runs the side's choice; any other its own (mode_controls shows it fixed)
                    budget = (dominant, contextual, tokens)
                    mode = self._requested_mode(sides[side], trigger == f"{side}-method", name, title, *budget)
                except ValueError as error:
                    raise gr.Error(f"{render.SIDE_NAMES[side]} side: {error}") from None
                sides[side] = replace(sides[side], mode=mode)
                continue
            try:
                loaded = self.registry.get(sides[side].model)
                method = method_name(title)
                if trigger == f"{side}-method":
                    mode = default_mode(method, loaded.family, like=sides[side].mode)
                else:
                    limit = tile_limit(loaded)
                    mode = make_mode(name, loaded.family, dominant, contextual, limit, tokens, method)
                    mode = mode if limit is not None else checked_on(loaded, mode)
                mode = tuned_mode(mode, loaded, bool(tuned))
            except (ValueError, ModelLoadError) as error:
                raise gr.Error(f"{render.SIDE_NAMES[side]} side: {error}") from None
            sides[side] = replace(sides[side], mode=mode)
        conversation = replace(conversation, sides=sides)
        return {"state": conversation, **self.mode_controls(conversation, values=False), **self.headers(conversation)}

    def _requested_mode(
        self, config: SideConfig, method_changed: bool, name: str, title: str | None, *budget: float | None
    ) -> Mode:
        """The mode a vLLM side asks its server for: the chosen one where the server lets requests choose (a
        method it refuses raises its reason; a budget above its own is refused by the server at the turn)."""
        report = self.registry.engines[config.model].report
        # the same preset as now (the server's own settings included, which no dropdown lists); a custom budget
        # is read again from its boxes
        unchanged = (name, title) == (config.mode.name, config.mode.method_title)
        unchanged = unchanged and name not in (CUSTOM, CUSTOM_TOKENS)
        if report is None or not report.per_request or unchanged:
            return config.mode
        method = method_name(title)
        if method_changed:
            mode = default_mode(method, report.family, like=config.mode)
        else:
            dominant, contextual, tokens = budget
            mode = make_mode(name, report.family, dominant, contextual, None, tokens, method)
        report.check_request(mode)
        return mode

    def side_choices(self, conversation: Conversation, side: str) -> tuple[list[str], list[str], bool]:
        """A side's method titles and budget names to choose from, and whether it may choose at all: a vLLM side
        offers what its server lets a request ask for, or (a server that fixes them) only its own settings."""
        mode, model = conversation.sides[side].mode, conversation.sides[side].model
        server = self.registry.engines.get(model)
        report = server.report if server is not None else None
        live = server is None or (report is not None and report.per_request)  # else the server's mode, fixed
        if server is None:
            titles = method_titles()
        elif live:  # the methods a request may ask this server for
            titles = [title for title in method_titles() if report.serves(method_name(title))]
        else:
            titles = [mode.method_title]
        choices = mode_choices(self.registry.family(model), mode.method if mode.enabled else FULL) if live else []
        return titles, choices + ([] if mode.name in choices else [mode.name]), live  # the server's own, on vLLM

    def mode_controls(self, conversation: Conversation, values: bool = True) -> Results:
        """Each side's method, budget choices and custom boxes as the mode in force (`values`: the
        custom numbers too, so a refused budget leaves no trace)."""
        controls = {}
        for side in SIDES:
            mode = conversation.sides[side].mode
            family = self.registry.family(conversation.sides[side].model)
            titles, choices, live = self.side_choices(conversation, side)
            controls[f"{side}_method"] = gr.Dropdown(choices=titles, value=mode.method_title, interactive=live)
            labels = budget_labels(family, mode)  # in the unit the budget counts on this family
            controls[f"{side}_mode"] = gr.Dropdown(
                choices=choices, value=mode.name, interactive=live, info=labels["info"]
            )
            controls[f"{side}_custom_row"] = gr.Row(visible=mode.name == CUSTOM)
            controls[f"{side}_tokens_row"] = gr.Row(visible=mode.name == CUSTOM_TOKENS)
            boxes = {name: {"label": labels[name]} for name in ("dominant", "contextual", "tokens")}
            if values:
                dominant, contextual = (mode.dominant, mode.contextual) if mode.name == CUSTOM else CUSTOM_START
                boxes["dominant"]["value"], boxes["contextual"]["value"] = dominant, contextual
                boxes["tokens"]["value"] = mode.tokens if mode.tokens is not None else CUSTOM_TOKENS_START
                controls[f"{side}_tuned"] = gr.Checkbox(value=mode.tuned is not None)
            controls.update({f"{side}_{name}": gr.Number(**box) for name, box in boxes.items()})
        return controls

    def show_modes(self, conversation: Conversation) -> Results:
        """Each side's mode controls as the budget in force: a refused budget leaves no trace."""
        return self.mode_controls(conversation)

    def set_model(
        self, conversation: Conversation, left_model: str, right_model: str, progress=gr.Progress(track_tqdm=True)
    ) -> Results:
        """Load (on first use, with the checkpoint shards' progress on the page) and select each side's
        model; a mode preset maps to the new model family's.  On failure the previous models keep serving."""
        sides = dict(conversation.sides)
        for side, label in zip(SIDES, (left_model, right_model)):
            if self.registry.is_engine(label):
                sides[side] = self._engine_side(side, label, sides[side])
                continue
            try:
                if label not in {model.label for model in self.registry.loaded()}:
                    progress(0, desc=f"Loading {label}")
                loaded = self.registry.get(label)
                mode = translate_mode(sides[side].mode, loaded.family)
                # the tuned projector stays chosen while the new model has one too
                mode = tuned_mode(mode, loaded, mode.tuned is not None and loaded.projector is not None)
            except ModelLoadError as error:
                raise gr.Error(f"{render.SIDE_NAMES[side]} side keeps {sides[side].model}: {error}") from None
            sides[side] = SideConfig(label, mode)
        conversation = replace(conversation, sides=sides)
        results: Results = {
            "state": conversation,
            **self.headers(conversation),
            **self.mode_controls(conversation, False),
        }
        for side in SIDES:
            results[f"{side}_tuned"] = gr.Checkbox(**render.tuned_box(self.registry, conversation, side))
        results["banner"] = render.banner_update(self.registry, conversation)
        results["models_info"] = render.models_markdown(self.registry)
        return results

    def _engine_side(self, side: str, label: str, current: SideConfig) -> SideConfig:
        """A side on a vLLM server, with the method and budget the server reports now."""
        try:
            return SideConfig(label, self.registry.engines[label].read_report().mode)
        except EngineError as error:
            raise gr.Error(f"{render.SIDE_NAMES[side]} side keeps {current.model}: {error}") from None

    def show_models(self, conversation: Conversation) -> Results:
        models = list(self.registry.choices)
        return {f"{side}_model": gr.Dropdown(choices=models, value=conversation.sides[side].model) for side in SIDES}

    def match_left(self, conversation: Conversation) -> Results:
        """The left side's method at the right side's visual-token count for this image (as near as
        the method's budget rule allows; the headers show both real counts)."""
        return self._match(conversation, "left")

    def match_right(self, conversation: Conversation) -> Results:
        """The right side's method at the left side's visual-token count for this image."""
        return self._match(conversation, "right")

    def _match(self, conversation: Conversation, side: str) -> Results:
        other = "right" if side == "left" else "left"
        if conversation.media_path is None or conversation.media_kind != "image":
            raise gr.Error("Upload an image first: the count to match is the other side's count for that image.")
        if engine_sides(self.registry, conversation):
            raise gr.Error(
                "Match needs both sides' models in this app: it counts a budget's tokens on the loaded model."
            )
        try:
            picture = load_media(conversation)
            loaded, other_loaded = (self.registry.get(conversation.sides[s].model) for s in (side, other))
            with use_mode(other_loaded, conversation.sides[other].mode):
                target = other_loaded.handle.num_image_tokens((picture.height, picture.width))
            mode = matched_mode(loaded, conversation.sides[side].mode, (picture.height, picture.width), target)
            mode = tuned_mode(mode, loaded, conversation.sides[side].mode.tuned is not None)
        except (ValueError, ModelLoadError, MediaError) as error:
            raise gr.Error(f"{render.SIDE_NAMES[side]} side: {error}") from None
        sides = {**conversation.sides, side: replace(conversation.sides[side], mode=mode)}
        conversation = replace(conversation, sides=sides)
        return {"state": conversation, **self.mode_controls(conversation), **self.headers(conversation)}

    # -- what the methods keep ------------------------------------------------------------------
    def overlay_views(
        self, shown: ShownChoice | visionzip.ImageSelection | None, conversation: Conversation, chosen: str
    ) -> Results:
        """Legend, view choices, overlay, heatmap and attention chart for one view of a choice; every
        label comes from the choice's record (`shown`; a bare selection is looked up in the turns that
        hold it), never from the side's current settings."""
        side = render.vision_side(conversation)
        if isinstance(shown, visionzip.ImageSelection) and side is not None:
            shown = choice_of(conversation, side, shown)
        if not isinstance(shown, ShownChoice):
            return {
                "view": gr.Dropdown(choices=["all"], value="all"),
                "overlay": None,
                "heatmap": None,
                "attention_plot": None,
            }
        selection = shown.selection
        picture = load_media(conversation)
        choices = overlay.view_choices(selection)
        chosen = chosen if chosen in choices else "all"
        results = {
            "legend": shown.header() + "\n\n" + overlay.legend_markdown(selection, chosen),
            "view": gr.Dropdown(choices=choices, value=chosen),
            "overlay": overlay.draw_overlay(picture, selection, chosen),
            "heatmap": None,
            "attention_plot": None,
        }
        if all(tile.cls_attention is not None for tile in selection.tiles):  # methods that read it
            results["heatmap"] = overlay.draw_attention_heatmap(picture, selection, chosen)
            results["attention_plot"] = charts.attention_chart(selection, len(selection.tiles[0].kept), chosen)
        else:
            results["legend"] += f"\n\n{shown.mode.method_title} does not read the CLS attention: no heatmap."
        return results

    def refresh_overlay(self, conversation: Conversation, chosen: str) -> Results:
        """What the reducing side's method keeps on the image, drawn and labelled by what chose it."""
        side = render.vision_side(conversation)
        hidden = self.scrub_slider(conversation, None)
        if conversation.media_kind == "video":  # the filmstrip shows it, with its own legend
            return {"selection_state": None, **self.overlay_views(None, conversation, chosen), **hidden}
        if conversation.media_path is None or side is None:
            note = NO_IMAGE if conversation.media_path is None else self.no_choice_note(conversation)
            return {"selection_state": None, "legend": note, **self.overlay_views(None, conversation, chosen), **hidden}
        shown = self.side_choice(conversation, side, self._picture(conversation, side))
        if isinstance(shown, str):  # nothing it can truthfully draw: say why
            results = {"selection_state": None, "legend": shown, **self.overlay_views(None, conversation, chosen)}
        else:
            results = {"selection_state": shown, **self.overlay_views(shown, conversation, chosen)}
        return {**results, **self.scrub_slider(conversation, side)}

    def no_choice_note(self, conversation: Conversation) -> str:
        """Why no side's choice is drawn: neither reduces, or the one that does runs on a vLLM server."""
        reducing = [side for side in engine_sides(self.registry, conversation) if conversation.sides[side].mode.enabled]
        return ON_SERVER.format(side=render.SIDE_NAMES[reducing[0]].lower()) if reducing else NO_REDUCTION

    def overlay_after_turn(self, conversation: Conversation, chosen: str) -> Results:
        """After a turn only a text-dependent method's choice can have changed: redraw just then."""
        side = render.vision_side(conversation)
        if conversation.media_kind != "image" or side is None or not conversation.sides[side].mode.reads_text:
            return {}
        return self.refresh_overlay(conversation, chosen)

    def _picture(self, conversation: Conversation, *sides: str) -> Image.Image:
        """The conversation's image, with the sides' models loaded; gr.Error when either fails."""
        try:
            for side in sides:
                self.registry.get(conversation.sides[side].model)
            return load_media(conversation)
        except (ValueError, ModelLoadError, MediaError) as error:
            raise gr.Error(str(error)) from None

    # -- budget scrubbing ---------------------------------------------------------------------------
    def run_tower(self, label: str, picture: Image.Image) -> scrub.TowerCache:
        """The vision tower once on the picture, its signals kept (a GPU task: the model must be loaded)."""
        try:
            return scrub.run_tower(self.registry.ready(label), picture)
        except Exception as error:  # on ZeroGPU anything but gr.Error would reach the page as "worker error"
            raise gr.Error(describe_error(error)) from None

    def tower_cache(self, conversation: Conversation, side: str) -> scrub.TowerCache:
        """The side's model's tower signals for the conversation's image, from the cache or run now."""
        label = conversation.sides[side].model
        key = (label, conversation.media_path)
        cache = self.towers.get(key)
        if cache is None:
            cache = self.towers.put(key, self.run_tower(label, self._picture(conversation, side)))
        return cache

    def scrub_slider(self, conversation: Conversation, side: str | None) -> Results:
        """The budget slider over every budget the side's method allows on this image, at its budget now;
        hidden, with the reason, when the method needs a question (or a tuned projector) to choose."""
        if side is None or conversation.media_kind != "image" or conversation.media_path is None:
            return {"scrub": gr.Slider(visible=False), "scrub_info": ""}
        config = conversation.sides[side]
        if self.registry.is_engine(config.model):  # no tower here to choose again from
            return {
                "scrub": gr.Slider(visible=False),
                "scrub_info": ON_SERVER.format(side=render.SIDE_NAMES[side].lower()),
            }
        if not scrub.can_scrub(config.mode):
            if config.mode.reads_text:
                note = f"Budget scrubbing: {config.mode.method_title} needs a question; ask one to see its choice."
            else:
                note = "Budget scrubbing previews the model's own projector: untick the tuned projector to use it."
            return {"scrub": gr.Slider(visible=False), "scrub_info": note}
        loaded, image = self.registry.get(config.model), load_media(conversation)
        values = scrub.budget_values(loaded, config.mode, (image.height, image.width))
        unit = config.mode.reducer.budget_unit(loaded.family)
        label = f"{render.SIDE_NAMES[side]} side's budget, {config.mode.method_title} (tokens {unit}): drag to preview"
        value = scrub.budget_value(loaded, config.mode)
        slider = gr.Slider(minimum=values[0], maximum=values[-1], value=value, step=1, label=label, visible=True)
        return {"scrub": slider, "scrub_info": ""}

    def scrub_overlay(self, conversation: Conversation, value: float, chosen: str) -> Results:
        """The reducing side's choice at the slider's budget, from the image's one tower run: the overlay,
        the count and the predicted prefill redrawn without the chat or the tower.  A preview: the side
        keeps its budget (its Budget control sets what the next turn runs)."""
        side = render.vision_side(conversation)
        if side is None or conversation.media_kind != "image" or not scrub.can_scrub(conversation.sides[side].mode):
            return {}
        result, shown = self.scrub_choice(conversation, side, value)
        view = chosen if chosen in overlay.view_choices(result.selection) else "all"
        return {
            "selection_state": shown,
            "legend": shown.header() + "\n\n" + overlay.legend_markdown(result.selection, view),
            "overlay": overlay.draw_overlay(result.picture, result.selection, view),
            "scrub_info": scrub.scrub_markdown(result),
        }

    def scrub_choice(self, conversation: Conversation, side: str, value: float) -> tuple[scrub.Scrubbed, ShownChoice]:
        """`side`'s text-agnostic method at budget `value` on the image, from the tower's cache, with its
        record: a preview at that budget, said not to be what the side runs."""
        config = conversation.sides[side]
        loaded = self.registry.get(config.model)
        last = last_turn_ran(conversation, side)
        text_tokens = last[1].stats[side].text_tokens if last is not None else 0
        try:
            result = scrub.scrub(loaded, self.tower_cache(conversation, side), config.mode, int(value), text_tokens)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        note = (
            f"Preview at {result.mode.label}: the {side} side still runs {config.mode.label} until its Budget is set."
        )
        return result, ShownChoice([result.selection], side, config.model, result.mode, note=note)

    @staticmethod
    def scrub_chart(shown: ShownChoice | None, chosen: str) -> Results:
        """The attention chart's budget cut at the previewed budget: after the overlay, which comes first."""
        if shown is None or any(tile.cls_attention is None for tile in shown.selection.tiles):
            return {}
        view = chosen if chosen in overlay.view_choices(shown.selection) else "all"
        return {"attention_plot": charts.attention_chart(shown.selection, len(shown.selection.tiles[0].kept), view)}

    def side_choice(self, conversation: Conversation, side: str, picture: Image.Image) -> ShownChoice | str:
        """What `side`'s method keeps on the picture, with the record of what chose it; or, when nothing
        truthful can be drawn, the message that says why.  A text-agnostic method chooses now, from the
        picture; a text-dependent one shows its latest turn's choice while the side still runs the settings
        that made it, else its choice for the last question computed now (FastV, which chooses inside the
        language model, cannot: it asks for a question)."""
        config = conversation.sides[side]
        note = changed_note(conversation, side)
        if scrub.can_scrub(config.mode):  # from the image's one tower run, as the budget slider draws it
            selection = scrub.cached_selection(
                self.registry.get(config.model), self.tower_cache(conversation, side), config.mode
            )
            return ShownChoice([selection], side, config.model, config.mode, note=note)
        if not config.mode.reads_text:  # through a tuned projector
            selection = self.select_tokens(config.model, config.mode, (picture,), False)[0]
            return ShownChoice([selection], side, config.model, config.mode, note=note)
        recorded = recorded_choice(conversation, side)
        if recorded is not None:
            return recorded
        if not conversation.turns or config.mode.inside_llm:
            return waiting_message(conversation, side)
        number, question = len(conversation.turns), conversation.turns[-1].question
        selection = self.select_tokens(config.model, config.mode, (picture,), False, question)[0]
        return ShownChoice([selection], side, config.model, config.mode, number, question, on_demand=True, note=note)

    def select_tokens(
        self, label: str, mode: Mode, pictures: tuple[Image.Image, ...], frames: bool, text: str | None = None
    ) -> list[visionzip.ImageSelection]:
        """What `mode` keeps and merges on each picture: images (anyres tiles) or a clip's frames (one
        tile each), from the vision tower alone; drawing happens outside."""
        try:
            loaded = self.registry.ready(label)
            if frames:
                return overlay.frame_selections(loaded, pictures, mode, text)
            return [overlay.image_selection(loaded, picture, mode, text) for picture in pictures]
        except Exception as error:  # on ZeroGPU anything but gr.Error would reach the page as "worker error"
            raise gr.Error(describe_error(error)) from None

    def compare_sides(self, conversation: Conversation, chosen: str = "all") -> Results:
        """When both sides reduce the same image on one model family: which patches each keeps as
        itself, drawn on the picture, and their overlap per tile and overall (also as JSON), each side
        named by the record of what chose its patches."""
        modes = [conversation.sides[side].mode for side in SIDES]
        families = {self.registry.family(conversation.sides[side].model) for side in SIDES}
        if conversation.media_kind != "image" or conversation.media_path is None:
            return {"difference_table": NO_DIFFERENCE_MEDIA, "difference_image": None, "difference_json": None}
        if not all(mode.enabled for mode in modes) or len(families) > 1:
            return {"difference_table": NO_DIFFERENCE, "difference_image": None, "difference_json": None}
        on_server = engine_sides(self.registry, conversation)
        if on_server:
            note = ON_SERVER.format(side=render.SIDE_NAMES[on_server[0]].lower())
            return {"difference_table": note, "difference_image": None, "difference_json": None}
        picture = self._picture(conversation, *SIDES)
        left, right = (self.side_choice(conversation, side, picture) for side in SIDES)
        waiting = [shown for shown in (left, right) if isinstance(shown, str)]
        if waiting:  # a text-dependent side with no choice it can truthfully show
            note = " ".join(waiting) + " Then compare."
            return {"difference_table": note, "difference_image": None, "difference_json": None}
        rows = overlay.kept_overlap(left.selection, right.selection)
        view = chosen if chosen in overlay.view_choices(left.selection) else "all"
        provenance = " ".join(part for part in (left.provenance(), right.provenance()) if part)
        table = overlay.overlap_markdown(rows, f"{left.model}, {left.label}", f"{right.model}, {right.label}")
        return {
            "difference_table": (provenance + "\n\n" if provenance else "") + table,
            "difference_image": overlay.draw_difference(picture, left.selection, right.selection, view),
            "difference_json": rows,
        }

    def refresh_filmstrip(self, conversation: Conversation) -> Results:
        """For a video: each frame each reducing side sees (both sides' when both reduce; with none, the
        left side's plain frames), with what it keeps and merges on it; the image views are hidden."""
        if conversation.media_kind != "video":
            return {
                "filmstrip": gr.Gallery(value=None, visible=False),
                "view": gr.Dropdown(visible=True),
                "image_views": gr.Column(visible=True),
            }
        reducing = [side for side in SIDES if conversation.sides[side].mode.enabled] or ["left"]
        strips, legends, counts = [], [], []
        for side in reducing:
            strip, legend = self._side_filmstrip(conversation, side)
            prefix = f"{render.SIDE_NAMES[side]} · " if len(reducing) > 1 else ""
            strips += [(picture, prefix + caption) for picture, caption in strip]
            legends.append(legend)
            counts.append(f"{len(strip)} frames")
        hidden = {"view": gr.Dropdown(visible=False), "image_views": gr.Column(visible=False)}
        gallery = gr.Gallery(value=strips or None, label=" + ".join(counts), visible=bool(strips))
        return {"filmstrip": gallery, "legend": "\n\n".join(legends), **hidden}

    def _side_filmstrip(self, conversation: Conversation, side: str) -> tuple[list, str]:
        """(frames with what `side` keeps drawn on them, a legend line); no frames when the side is refused."""
        config = conversation.sides[side]
        title = f"**{render.SIDE_NAMES[side]} side**: {config.model}, {config.mode.label}"
        if self.registry.is_engine(config.model):
            return [], f"{title}: {ENGINE_NO_VIDEO}"
        try:
            loaded = self.registry.get(config.model)
            messages = messages_for(conversation, side, "")
            tokens = video_tokens(loaded, config.mode, conversation, messages, self.max_new_tokens)
        except ContextTooLong as error:
            return [], f"{title}: **refused:** {error}"
        except (ValueError, ModelLoadError, MediaError) as error:
            raise gr.Error(str(error)) from None
        clip = tokens.clip
        with loaded.handle.use(enabled=False):
            full = unit_tokens(loaded, (clip.frames[0].height, clip.frames[0].width))
        selections, asked = None, ""
        number, question = len(conversation.turns), (conversation.turns[-1].question if conversation.turns else None)
        if config.mode.inside_llm:
            asked = f"{config.mode.method_title} chooses inside the language model: no frame-by-frame choice to draw. "
        elif config.mode.reads_text and question is None:
            asked = f"{config.mode.method_title} chooses by the question: ask one to see its choice. "
        elif config.mode.enabled:
            selections = self.select_tokens(config.model, config.mode, clip.frames, True, question)
            shown = ShownChoice(selections, side, config.model, config.mode, note=changed_note(conversation, side))
            if config.mode.reads_text:  # chosen now, by the side's current settings, for the last question
                shown = replace(shown, turn=number, question=question, on_demand=True)
            asked = shown.provenance() + " " if shown.provenance() else ""
        legend = f"{title}: {self._clip_geometry(loaded, tokens)} " + asked
        legend += (overlay.FILMSTRIP_LEGEND if selections else NO_REDUCTION + " ") + self._framing(loaded)
        if loaded.pairs_frames:
            return pair_filmstrip(clip, selections, full), legend
        return filmstrip(clip, loaded.family, selections, full), legend

    @staticmethod
    def _clip_geometry(loaded, tokens) -> str:
        """How the side's model sees the clip, for the filmstrip's legend."""
        if loaded.pairs_frames:
            rows, cols = loaded.handle.family.video_grid(loaded.processor, (2, *tokens.clip.frames[0].size[::-1]))[1:]
            return (
                f"{len(tokens.clip.frames)} frames as {tokens.units} frame pairs (the model pairs frames in time), "
                f"each pair {rows}x{cols} merged cells, {tokens.per_unit} tokens."
            )
        tile = frame_tile(tokens.clip.frames[0], loaded.family).width
        return f"{len(tokens.clip.frames)} frames, each one {tile}x{tile} tile of {tokens.per_unit} tokens."

    @staticmethod
    def _framing(loaded) -> str:
        if loaded.pairs_frames:
            return "Each pair is shown as its first frame; its cells cover the whole frame."
        if loaded.family != "llava":
            return "Frames are shown squashed to the square base tile the model sees."
        return "Frames are shown centre-cropped, as the model sees them."
