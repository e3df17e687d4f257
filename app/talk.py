"""The presenter view's handlers: plain methods returning named results (as app.handlers does), built
on the page's own handlers for the model work (media, modes, the turn itself).

What a talk needs beyond the researcher's page: the latest turn in large figures, each side's
overlay from the turn's own record, the race (app.race) and recorded runs (app.recording).  Loading
a recording and playing the race never touch the model registry: they run on a laptop with no model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import torch
from PIL import Image

from app import charts, overlay, race, recording, render, scrub
from app.choices import choice_of
from app.conversation import SIDES, Conversation, SideConfig, Turn, load_media
from app.handlers import ON_SERVER, Handlers, same_file, uploaded_path
from app.hosting import machine_description, timing_method
from app.media import MediaError
from app.models import ModelLoadError
from app.modes import CUSTOM, CUSTOM_TOKENS, make_mode, method_titles, mode_choices, translate_mode, use_mode
from app.render import SIDE_NAMES
from app.stats import TurnStats

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_FILE = ROOT / "assets" / "examples.json"
RECORDINGS = sorted((ROOT / "assets").glob("*.vzrec.json"))  # the recordings shipped with the app
REPLAYS = Path(tempfile.gettempdir()) / "visionzip-live-replays"  # media of loaded recordings, named by content
RECORDING_NAME = "visionzip_recording.vzrec.json"
DOWNLOAD = "Download recording"
SLOWDOWNS = {"measured pace": 1.0, "10x slower": 10.0}
SHORTCUTS = (
    "**Keys:** `N` next example · `A` ask (or Enter in the question) · `↑` / `↓` right side's budget up / down "
    "one preset (what the next question runs; its slider follows) · `Shift+↑` / `Shift+↓` left side's · "
    "`R` play the race. **Slider:** previews any budget on release (overlay, count, predicted prefill), "
    "without changing what runs"
)
EVERY_TOKEN = "Full model: every visual token."
Results = dict[str, object]


def load_examples(path: Path = EXAMPLES_FILE) -> list[dict]:
    """[{file: assets path, question, probes}] one per (picture, question) pair, in the file's order."""
    entries = json.loads(path.read_text())
    return [
        {"file": str(ROOT / "assets" / entry["file"]), "question": item["question"], "probes": item["probes"]}
        for entry in entries
        for item in entry["questions"]
    ]


def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def figures_html(stats: TurnStats | None, count: int | None) -> str:
    """A side's headline figures: its visual tokens and TTFT (large), decode speed below."""
    tokens = f"{stats.visual_tokens:,}" if stats is not None else (f"{count:,}" if count is not None else "—")
    ttft = _ms(stats.ttft_ms) if stats is not None and stats.ok else "—"
    decode = f"{stats.decode_tokens_per_s:,.0f} tok/s decode" if stats is not None and stats.ok else ""
    return (
        '<div class="talk-figures">'
        f'<div class="talk-figure"><span class="talk-number">{tokens}</span><span class="talk-unit">visual tokens</span></div>'
        f'<div class="talk-figure"><span class="talk-number">{ttft}</span><span class="talk-unit">time to first token'
        f"{' · ' + decode if decode else ''}</span></div></div>"
    )


def no_speedup(reason: str) -> str:
    return f'<div class="talk-speedup"><span class="talk-number">—</span><span class="talk-unit">{reason}</span></div>'


def speedup_html(turn: Turn | None) -> str:
    """The latest turn's TTFT ratio, the side with more visual tokens over the one with fewer."""
    pair = [turn.stats.get(side) for side in SIDES] if turn is not None else [None, None]
    if None in pair or not all(s.ok and s.ttft_ms > 0 for s in pair):
        return no_speedup("ask a question")
    if any(stats.cached_tokens for stats in pair):  # the image came from a KV cache: the time is not the method's
        return no_speedup("the visual tokens came from the KV cache this turn: no speed-up to show")
    more, fewer = sorted(pair, key=lambda stats: -stats.visual_tokens)
    ratio = more.ttft_ms / fewer.ttft_ms
    change = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
    return (
        f'<div class="talk-speedup"><span class="talk-number">{change}</span><span class="talk-unit">time to first '
        f"token with {fewer.visual_tokens:,} instead of {more.visual_tokens:,} visual tokens "
        f"({SIDE_NAMES[fewer.side].lower()} side)</span></div>"
    )


def answer_markdown(turn: Turn | None, side: str) -> str:
    if turn is None:
        return ""
    answer = turn.answers[side].strip()
    stats = turn.stats.get(side)
    if turn.running == side:
        answer += " ▌"
    elif stats is not None and stats.error:
        answer = f"⚠️ {stats.error}"
    return f"**Q:** {turn.question}\n\n{answer or '…'}"


def replay_note(turn: Turn | None) -> str:
    """What the status line says about a turn's timings: live here, or recorded where and on what."""
    if turn is None or turn.measured_on is None:
        return ""
    where = turn.measured_on
    note = recording.weights_note(where)
    return f"Timings measured on **{where['hardware']}** ({where['where']}).{' ' + note if note else ''}"


def recorded_header(conversation: Conversation, side: str) -> str:
    """A side's header from its recorded turns alone (the page's header asks the registry)."""
    config = conversation.sides[side]
    title = f"With {config.mode.method_title}" if config.mode.enabled else "Without reduction"
    stats = conversation.turns[-1].stats.get(side) if conversation.turns else None
    count = f" · **{stats.visual_tokens:,} visual tokens** (recorded)" if stats is not None else ""
    return f"### {title}\n{config.model} · {config.mode.label}{count}"


class TalkHandlers:
    """Every presenter-view event, on the page's handlers (`page`) and their registry."""

    def __init__(self, page: Handlers, examples: list[dict] | None = None) -> None:
        self.page, self.registry = page, page.registry
        self.examples = load_examples() if examples is None else examples

    # -- what several handlers return -------------------------------------------------------------
    def views(self, conversation: Conversation, live_counts: bool = True) -> Results:
        """The latest turn large: each side's title, figures and answer, the speed-up and a status line."""
        turn = conversation.turns[-1] if conversation.turns else None
        results: Results = {"state": conversation, "speedup": speedup_html(turn), "status": replay_note(turn)}
        for side in SIDES:
            config = conversation.sides[side]
            stats = turn.stats.get(side) if turn is not None else None
            count = None if stats is not None or not live_counts else self.live_count(conversation, side)
            results[f"{side}_title"] = f"### {SIDE_NAMES[side]}: {config.mode.label}\n{config.model}"
            results[f"{side}_figures"] = figures_html(stats, count)
            results[f"{side}_answer"] = answer_markdown(turn, side)
        return results

    def live_count(self, conversation: Conversation, side: str) -> int | None:
        """The side's visual tokens for the image, when its model is loaded (before any turn)."""
        loaded = next((m for m in self.registry.loaded() if m.label == conversation.sides[side].model), None)
        if loaded is None or conversation.media_path is None or conversation.media_kind != "image":
            return None
        picture = load_media(conversation)
        with use_mode(loaded, conversation.sides[side].mode):
            return loaded.handle.num_image_tokens((picture.height, picture.width))

    @staticmethod
    def overlays(conversation: Conversation) -> Results:
        """Each reducing side's choice on the latest turn, drawn large on the picture from the turn's record
        and captioned by what chose it (the turn's model, method and budget: app.choices)."""
        results: Results = {f"{side}_{part}": None for side in SIDES for part in ("overlay", "chosen")}
        if not conversation.turns or conversation.media_kind != "image" or conversation.media_path is None:
            return results
        picture, turn = load_media(conversation), conversation.turns[-1]
        for side in SIDES:
            if side in turn.selections:
                shown = choice_of(conversation, side, turn.selections[side][0])
                results[f"{side}_overlay"] = overlay.draw_overlay(picture, shown.selection, "all")
                results[f"{side}_chosen"] = shown.header()
            elif not conversation.sides[side].mode.enabled:  # the full model keeps every token: the picture as it is
                results[f"{side}_overlay"], results[f"{side}_chosen"] = picture, EVERY_TOKEN
        return results

    def preview(self, conversation: Conversation) -> Results:
        """After a change of media or mode: what each side's method keeps on the picture, captioned by
        what chose it (the page's `side_choice`: a text-agnostic method chooses now, from the tower; a
        text-dependent one shows a turn's choice only while the side runs the settings that made it),
        each side's budget slider at its budget, and the sides' counts."""
        if conversation.media_kind != "image" or conversation.media_path is None:
            return {}
        picture, results = load_media(conversation), {}
        for side in SIDES:
            results.update(self.side_overlay(conversation, side, picture))
            results.update(self.scrub_slider(conversation, side))
        return {**self.views(conversation), **results}

    def side_overlay(self, conversation: Conversation, side: str, picture: Image.Image) -> Results:
        """One side's overlay and caption from the record of what chose it, or why there is none."""
        config = conversation.sides[side]
        if not config.mode.enabled:
            return {f"{side}_overlay": picture, f"{side}_chosen": EVERY_TOKEN}
        if self.registry.is_engine(config.model):
            return {f"{side}_overlay": None, f"{side}_chosen": ON_SERVER.format(side=SIDE_NAMES[side].lower())}
        try:
            self.registry.get(config.model)
        except ModelLoadError as error:
            raise gr.Error(f"{SIDE_NAMES[side]} side: {error}") from None
        shown = self.page.side_choice(conversation, side, picture)
        if isinstance(shown, str):  # nothing it can truthfully draw (FastV before a question): say why
            return {f"{side}_overlay": None, f"{side}_chosen": shown}
        return {
            f"{side}_overlay": overlay.draw_overlay(picture, shown.selection, "all"),
            f"{side}_chosen": shown.header(),
        }

    # -- budget scrubbing ----------------------------------------------------------------------------
    def scrub_slider(self, conversation: Conversation, side: str) -> Results:
        """The side's budget slider (the page's, per side) at its budget; hidden for the full model."""
        if not conversation.sides[side].mode.enabled:
            return {f"{side}_scrub": gr.Slider(visible=False), f"{side}_scrub_info": ""}
        results = self.page.scrub_slider(conversation, side)
        return {f"{side}_scrub": results["scrub"], f"{side}_scrub_info": results["scrub_info"]}

    @staticmethod
    def hidden_sliders() -> Results:
        """A replayed recording has no tower to scrub (no model is loaded): the sliders go."""
        return {
            f"{side}_{part}": gr.Slider(visible=False) if part == "scrub" else ""
            for side in SIDES
            for part in ("scrub", "scrub_info")
        }

    def scrub_side(self, conversation: Conversation, side: str, value: float) -> Results:
        """The side's overlay, count and predicted prefill at the slider's budget, from the image's one
        tower run: no chat, no tower.  A preview: the side runs its preset until its Budget changes."""
        config = conversation.sides[side]
        if conversation.media_kind != "image" or conversation.media_path is None or not scrub.can_scrub(config.mode):
            return {}
        result, shown = self.page.scrub_choice(conversation, side, value)
        return {
            f"{side}_overlay": overlay.draw_overlay(result.picture, result.selection, "all"),
            f"{side}_chosen": shown.header(),
            f"{side}_scrub_info": scrub.scrub_markdown(result),
        }

    def scrub_left(self, conversation: Conversation, value: float) -> Results:
        return self.scrub_side(conversation, "left", value)

    def scrub_right(self, conversation: Conversation, value: float) -> Results:
        return self.scrub_side(conversation, "right", value)

    def controls(self, conversation: Conversation, live: bool = False) -> Results:
        """Each side's method and budget dropdowns as the conversation's modes (presets only); `live`: what each
        side may choose now (a vLLM side: what its server serves), else a replay's recorded settings."""
        results: Results = {}
        for side in SIDES:
            mode = conversation.sides[side].mode
            titles, choices, interactive = method_titles(), [mode.name], True
            if live:
                titles, choices, interactive = self.side_choices(conversation, side)
            results[f"{side}_method"] = gr.Dropdown(choices=titles, value=mode.method_title, interactive=interactive)
            results[f"{side}_budget"] = gr.Dropdown(choices=choices, value=mode.name, interactive=interactive)
        return results

    def side_choices(self, conversation: Conversation, side: str) -> tuple[list[str], list[str], bool]:
        """The page's `side_choices` (a vLLM side: what its server serves), presets only: a talk picks presets."""
        titles, choices, live = self.page.side_choices(conversation, side)
        return titles, preset_names(choices), live

    def servable(self, conversation: Conversation) -> Conversation:
        """The conversation with each side on a model this app serves: a replayed recording may name one it
        has not (a GPU's checkpoint replayed on a laptop); such a side moves to the default model."""
        sides = dict(conversation.sides)
        for side, config in sides.items():
            if config.model not in self.registry.choices:
                default = self.registry.default
                sides[side] = SideConfig(default, translate_mode(config.mode, self.registry.family(default)))
        return conversation if sides == conversation.sides else replace(conversation, sides=sides, caches={})

    # -- media and examples --------------------------------------------------------------------
    def set_media(self, upload: dict | None, conversation: Conversation) -> Results:
        """New media starts a new conversation; the file in use shown again keeps it."""
        path = uploaded_path(upload)
        if path and conversation.media_path and same_file(path, conversation.media_path):
            return self.views(conversation)
        results = self.page.set_media(upload, self.servable(conversation))
        return {**self.views(results["state"]), **self.overlays(results["state"]), "status": results["media_info"]}

    def pick_example(self, index: int, conversation: Conversation) -> Results:
        """Example `index`: its media in use and its question in the box, one click."""
        example = self.examples[index % len(self.examples)]
        results = self.set_media({"path": example["file"]}, conversation)
        note = f"Example {index % len(self.examples) + 1} of {len(self.examples)}: probes **{example['probes']}**."
        return {
            **results,
            "media": example["file"],
            "question": example["question"],
            "status": note,
            "example_index": index % len(self.examples),
        }

    def next_example(self, index: int, conversation: Conversation) -> Results:
        return self.pick_example(index + 1, conversation)

    # -- asking ----------------------------------------------------------------------------------
    def ask(self, question: str, conversation: Conversation, request: gr.Request = None) -> Iterator[Results]:
        """Both sides answer (one after the other, as on the page); then the overlays and where it ran."""
        current = conversation = self.servable(conversation)
        for results in self.page.ask(question, conversation, request):
            current = results["state"]
            yield self.views(current, live_counts=False)
        if current.turns and current.turns[-1].measured_on is None:
            current.turns[-1].measured_on = self.live_measured_on(current, current.turns[-1])
        sliders = {name: value for side in SIDES for name, value in self.scrub_slider(current, side).items()}
        yield {**self.views(current, live_counts=False), **self.overlays(current), **sliders}  # back at the budgets

    def live_measured_on(self, conversation: Conversation, turn: Turn) -> dict:
        """Where a live turn ran: this machine and its clock, or per side where one ran on a vLLM server (its
        stats name the server), and whether each side's model is the tiny one."""
        local = [stats.device for stats in turn.stats.values() if stats.engine is None]
        device = torch.device(local[0] if local else "cpu")
        machine, timing = machine_description(device), timing_method(device)
        servers = {side: stats.device for side, stats in turn.stats.items() if stats.engine is not None}
        if servers:  # a side on vLLM: its times are its tokens' arrivals here, streamed over HTTP
            machine = "; ".join(f"{SIDE_NAMES[side]} side: {servers.get(side, machine)}" for side in SIDES)
            timing = f"{timing} here; a vLLM side: when each streamed token arrived (HTTP)"
        tiny = {side: self.registry.is_tiny(conversation.sides[side].model) for side in SIDES}
        return recording.measured_on(machine, timing, "live, in this app", tiny)

    # -- the race --------------------------------------------------------------------------------
    def play_race(self, conversation: Conversation, slowdown: str = "measured pace") -> Iterator[Results]:
        """The latest turn's answers revealed side by side at their measured times (see app.race)."""
        turn = conversation.turns[-1] if conversation.turns else None
        if turn is None or not race.timelines(turn):
            raise gr.Error("Nothing to race yet: ask a question, or load a recording.")
        factor = SLOWDOWNS.get(slowdown, 1.0)
        status = race.race_status(turn, factor)
        for frame in race.pace(race.timelines(turn), slowdown=factor):
            texts = race.race_texts(turn, frame)
            yield {"status": status, **{f"{side}_answer": f"**Q:** {turn.question}\n\n{texts[side]}" for side in SIDES}}
        yield {"status": status + "<br>" + race.finish_line(turn)}

    # -- recordings -----------------------------------------------------------------------------
    def load_recording(self, upload: dict | str | None, conversation: Conversation) -> Results:
        """Replay a recording: its media, turns, figures and overlays, with no model loaded; a file that
        is not a valid recording is refused with the reason and the conversation stays as it was."""
        path = upload if isinstance(upload, str) else uploaded_path(upload)
        if not path:
            return {}
        try:
            replayed = recording.read(path, REPLAYS)
            overlays = self.overlays(replayed)
        except (recording.RecordingError, MediaError) as error:
            raise gr.Error(str(error)) from None
        first = replayed.turns[-1] if replayed.turns else None
        note = "**Recording loaded.** " + (
            replay_note(first) + " The race plays; **R** plays it again." if first else "No turns."
        )
        results = {**self.views(replayed, live_counts=False), **overlays, **self.controls(replayed), "status": note}
        results.update(self.hidden_sliders())
        media = replayed.media_path if replayed.media_kind == "image" else None
        return {**results, "media": media, "question": first.question if first else ""}

    def load_shipped(self, name: str, conversation: Conversation) -> Results:
        """One of the recordings shipped in assets/, by file name."""
        match = next((path for path in RECORDINGS if path.name == name), None)
        if match is None:
            raise gr.Error(f"There is no shipped recording called {name!r}.")
        return self.load_recording(str(match), conversation)

    def recording_after_turn(self, conversation: Conversation, request: gr.Request = None) -> Results:
        """Both pages' "Download recording" file, rewritten after every turn (one per browser session)."""
        if not conversation.turns:
            return {"export_recording": gr.DownloadButton(DOWNLOAD, value=None)}
        folder = render.export_folder(request.session_hash if request else "")
        default = self.live_measured_on(conversation, conversation.turns[-1])
        try:
            path = recording.save(conversation, folder / RECORDING_NAME, default)
        except recording.RecordingError as error:  # said on the button: this runs after every turn, unasked
            return {"export_recording": gr.DownloadButton(f"No recording: {error}", value=None)}
        return {"export_recording": gr.DownloadButton(DOWNLOAD, value=str(path))}

    def replay_on_page(self, upload: dict | str | None, conversation: Conversation) -> Results:
        """A recording on the researcher's page: chats, summary, charts, measurements and the overlay of
        the recorded choice, with no model (the upload box keeps its file: the picture is in the overlay)."""
        path = upload if isinstance(upload, str) else uploaded_path(upload)
        if not path:
            return {}
        try:
            replayed = recording.read(path, REPLAYS)
        except recording.RecordingError as error:
            raise gr.Error(str(error)) from None
        stats = replayed.all_stats()
        side = render.vision_side(replayed)
        latest = replayed.latest_choice(side) if side is not None else None
        selection = latest.selections[side][0] if latest is not None and replayed.media_kind == "image" else None
        return {
            **self.page.views(replayed),
            **{f"{s}_header": recorded_header(replayed, s) for s in SIDES},
            "media_info": "**Replaying a recording.** " + replay_note(replayed.turns[-1] if replayed.turns else None),
            "tokens_plot": charts.tokens_chart(stats),
            "times_plot": charts.times_chart(stats),
            "speedup_plot": charts.speedup_chart(stats),
            "quality_plot": charts.quality_chart(stats),
            "selection_state": selection,
            **self.page.overlay_views(selection, replayed, "all"),
        }

    # -- modes -------------------------------------------------------------------------------------
    def set_mode(
        self,
        conversation: Conversation,
        left_method: str,
        left_budget: str,
        right_method: str,
        right_budget: str,
        event: gr.EventData = None,
    ) -> Results:
        """Each side's method and preset budget (a method change takes that method's preset of the same rank)."""
        trigger = getattr(getattr(event, "target", None), "elem_id", None) or ""
        changed = next((side for side in SIDES if trigger == f"talk-{side}-method"), None)
        modes = {side: conversation.sides[side].mode for side in SIDES}
        values = dict(
            left_mode=left_budget,
            left_dominant=modes["left"].dominant,
            left_contextual=modes["left"].contextual,
            right_mode=right_budget,
            right_dominant=modes["right"].dominant,
            right_contextual=modes["right"].contextual,
            left_tuned=modes["left"].tuned is not None,
            right_tuned=modes["right"].tuned is not None,
            left_method=left_method,
            right_method=right_method,
            left_tokens=modes["left"].tokens,
            right_tokens=modes["right"].tokens,
        )
        # the page's handler tells a method change (its preset of the same rank) from a budget change by the
        # event's target: this view's method dropdown, named as the page's
        page_event = SimpleNamespace(target=SimpleNamespace(elem_id=f"{changed}-method")) if changed else None
        results = self.page.set_mode(self.servable(conversation), **values, event=page_event)
        conversation = results["state"]
        return {**self.views(conversation), **self.controls(conversation, live=True)}

    def step_budget(self, conversation: Conversation, side: str, step: int) -> Results:
        """The side's next larger (step -1) or smaller (+1) preset budget of its method."""
        conversation = self.servable(conversation)
        mode = conversation.sides[side].mode
        if not mode.enabled:
            raise gr.Error(f"The {side} side runs the full model: pick a method first.")
        if not self.side_choices(conversation, side)[2]:
            raise gr.Error(f"The {side} side runs on a vLLM server that sets its own method and budget.")
        family = self.registry.family(conversation.sides[side].model)
        presets = preset_names(mode_choices(family, mode.method))
        labels = [make_mode(name, family).label for name in presets]  # a vLLM server's own settings: the preset
        index = labels.index(mode.label) + step if mode.label in labels else 0  # they equal, if any
        budgets = {s: conversation.sides[s].mode.name for s in SIDES}
        budgets[side] = presets[min(max(index, 0), len(presets) - 1)]
        titles = {s: conversation.sides[s].mode.method_title for s in SIDES}
        return self.set_mode(conversation, titles["left"], budgets["left"], titles["right"], budgets["right"])


def preset_names(choices: list[str]) -> list[str]:
    """A budget list without its custom entries: a talk picks presets."""
    return [name for name in choices if name not in (CUSTOM, CUSTOM_TOKENS)]
