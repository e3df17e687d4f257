"""The presenter view (`/talk`, or `/` with `app.py --talk`): the layout for a room and its wiring.

Large type for a 1920x1080 projector (headline figures 64-72 px, nothing a room needs below 24 px),
the latest turn only, each side's overlay large, and the few controls a talk needs: media and the
examples, the question, each side's method and budget, Ask, the race, recorded runs.  Keyboard
shortcuts (TALK_KEYS) click the page's own buttons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from app.conversation import SIDES, Conversation
from app.handlers import new_conversation
from app.models import ModelRegistry
from app.page import Page
from app.render import SIDE_NAMES
from app.talk import RECORDINGS, SHORTCUTS, SLOWDOWNS, TalkHandlers, figures_html, speedup_html

if TYPE_CHECKING:
    from app.ui import Wiring

TINY_NOTE = "⚠️ **Served model: tiny, random weights**: its answers are noise; its token counts and timings are real."
TALK_CSS = """
#talk-view { font-size: 24px; }
#talk-view .talk-number { display: block; font-size: 64px; font-weight: 700; line-height: 1.1; white-space: nowrap; }
#talk-view .talk-unit { display: block; font-size: 24px; opacity: 0.85; }
#talk-view .talk-figures { display: flex; flex-wrap: wrap; gap: 8px 40px; margin: 8px 0; }
#talk-view .talk-speedup { text-align: center; }
#talk-view .talk-speedup .talk-number { font-size: 72px; color: #1a7f37; }
#talk-view .talk-answer, #talk-view .talk-answer p { font-size: 28px !important; line-height: 1.35; }
#talk-view .talk-title h3 { font-size: 32px !important; margin: 0; }
#talk-view .talk-title p { font-size: 24px !important; margin: 0; }
#talk-view #talk-status p { font-size: 24px !important; }
#talk-view button { font-size: 24px !important; }
#talk-view input, #talk-view textarea { font-size: 24px !important; }
#talk-view label span, #talk-view .label-wrap span { font-size: 20px !important; }
#talk-view #talk-keys p { font-size: 24px !important; }
#talk-view .talk-note p { font-size: 24px !important; }
#talk-view #talk-banner { background: #fff4d6; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px; }
#talk-view #talk-banner p { font-size: 24px !important; }
"""

# Keys click the presenter view's own buttons (never while typing in a box).
TALK_KEYS = """
<script>
document.addEventListener("keydown", (event) => {
  if (!document.getElementById("talk-view")) return;
  const target = event.target;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName) || target.isContentEditable) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const plain = {n: "talk-next", a: "talk-ask", r: "talk-race", ArrowUp: "talk-right-up", ArrowDown: "talk-right-down"};
  const shifted = {ArrowUp: "talk-left-up", ArrowDown: "talk-left-down"};
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  const id = (event.shiftKey ? shifted[key] : undefined) || plain[key];
  const element = id && document.getElementById(id);
  if (!element) return;
  event.preventDefault();
  (element.tagName === "BUTTON" ? element : element.querySelector("button") || element).click();
});
</script>
"""


class TalkPage(Page):
    """The presenter view's components by name, made inside an open `gr.Blocks` (or route)."""

    def __init__(self, registry: ModelRegistry, start: Conversation, handlers: TalkHandlers) -> None:
        self.talk = handlers
        super().__init__(registry, start, handlers.page.max_new_tokens)

    def render(self) -> None:
        with gr.Column(elem_id="talk-view"):
            self.add("state", gr.State(self.start))
            self.add("example_index", gr.State(-1))
            tiny = self.registry.is_tiny(self.registry.default)
            self.add("banner", gr.Markdown(TINY_NOTE, visible=tiny, elem_id="talk-banner"))
            with gr.Row(equal_height=True):
                with gr.Column(scale=3):
                    self.add("status", gr.Markdown("", elem_id="talk-status"))
                with gr.Column(scale=2):
                    self.add("speedup", gr.HTML(speedup_html(None), elem_id="talk-speedup"))
            with gr.Row(equal_height=False):
                self.render_controls()
                for side in SIDES:
                    self.render_side(side)

    def render_controls(self) -> None:
        with gr.Column(scale=1, min_width=420):
            self.add("media", gr.Image(type="filepath", label="Image", height=230, elem_id="talk-media"))
            self.add("question", gr.Textbox(label="Question", lines=2, elem_id="talk-question"))
            with gr.Row():
                self.add("ask", gr.Button("Ask (A)", variant="primary", elem_id="talk-ask"))
                self.add("race", gr.Button("Play the race (R)", elem_id="talk-race"))
            with gr.Row():
                self.add("next", gr.Button("Next example (N)", elem_id="talk-next"))
                self.add(
                    "slowdown", gr.Radio(list(SLOWDOWNS), value="measured pace", label="Race", elem_id="talk-slowdown")
                )
            samples = [[example["question"]] for example in self.talk.examples]
            examples = gr.Dataset(
                components=[gr.Textbox(visible=False)],
                samples=samples,
                type="index",
                label="Examples (one click each)",
                samples_per_page=8,
                elem_id="talk-examples",
            )
            self.add("examples", examples)
            shipped = [path.name for path in RECORDINGS]
            self.add(
                "shipped", gr.Dropdown(shipped, value=None, label="Recorded runs (tiny model)", elem_id="talk-shipped")
            )
            with gr.Row():
                upload = gr.UploadButton("Load a recording…", file_types=[".json"], elem_id="talk-load")
                self.add("load", upload)
                self.add("export_recording", gr.DownloadButton("Download recording", elem_id="talk-save"))
            self.add("keys", gr.Markdown(SHORTCUTS, elem_id="talk-keys"))

    def render_side(self, side: str) -> None:
        mode = self.start.sides[side].mode
        titles, budgets, live = self.talk.side_choices(self.start, side)  # a side on a vLLM server: what it serves
        with gr.Column(scale=2):
            title = f"### {SIDE_NAMES[side]}: {mode.label}\n{self.start.sides[side].model}"
            self.add(f"{side}_title", gr.Markdown(title, elem_id=f"talk-{side}-title", elem_classes="talk-title"))
            with gr.Row(equal_height=True):
                for part, label, choices, value in (
                    ("method", "Method", titles, mode.method_title),
                    ("budget", "Budget", budgets, mode.name),
                ):
                    dropdown = gr.Dropdown(
                        choices, value=value, label=label, interactive=live, scale=3, elem_id=f"talk-{side}-{part}"
                    )
                    self.add(f"{side}_{part}", dropdown)
                self.add(f"{side}_down", gr.Button("−", scale=1, min_width=56, elem_id=f"talk-{side}-down"))
                self.add(f"{side}_up", gr.Button("+", scale=1, min_width=56, elem_id=f"talk-{side}-up"))
            # every budget the method allows on this image (issue 19, item 4): a preview, drawn on release
            slider = gr.Slider(1, 576, value=64, step=1, label="Budget", visible=False, elem_id=f"talk-{side}-scrub")
            self.add(f"{side}_scrub", slider)
            self.add(f"{side}_scrub_info", gr.Markdown("", elem_id=f"talk-{side}-scrub-info", elem_classes="talk-note"))
            self.add(f"{side}_figures", gr.HTML(figures_html(None, None), elem_id=f"talk-{side}-figures"))
            self.add(
                f"{side}_answer",
                gr.Markdown("", elem_id=f"talk-{side}-answer", elem_classes="talk-answer", min_height=120),
            )
            picture = dict(show_label=False, type="pil", interactive=False, height=380)
            self.add(f"{side}_overlay", gr.Image(label=f"{side} kept", elem_id=f"talk-{side}-overlay", **picture))
            self.add(f"{side}_chosen", gr.Markdown("", elem_id=f"talk-{side}-chosen", elem_classes="talk-note"))


SIDE_VIEWS = [f"{side}_{part}" for side in SIDES for part in ("title", "figures", "answer")]
VIEWS = ["state", "speedup", "status", *SIDE_VIEWS]
OVERLAYS = [f"{side}_{part}" for side in SIDES for part in ("overlay", "chosen")]
SLIDERS = [f"{side}_{part}" for side in SIDES for part in ("scrub", "scrub_info")]
CONTROLS = [f"{side}_{part}" for side in SIDES for part in ("method", "budget")]


def build_talk(registry: ModelRegistry, handlers: TalkHandlers, wiring_class: type[Wiring]) -> TalkPage:
    """The presenter view inside an open Blocks or route, with its events wired."""
    page = TalkPage(registry, new_conversation(registry), handlers)
    wire_talk(wiring_class(page, handlers), handlers)
    return page


def wire_talk(wiring: Wiring, talk: TalkHandlers) -> None:
    """Every presenter-view event (none public: the page's own API is the researcher page's)."""
    page, private, gpu = wiring.page, dict(api_visibility="private"), wiring.GPU
    views = [*VIEWS, *OVERLAYS]

    def then_preview(event) -> None:  # what the methods keep, from the vision tower, before anything is asked
        wiring.follow(
            event.success, talk.preview, ["state"], [*views, *SLIDERS], show_progress="hidden", **private, **gpu
        )

    media = wiring.on(
        [page["media"].upload], talk.set_media, ["media", "state"], views, preprocess=False, **private, **gpu
    )
    then_preview(media)
    picked = [*views, "media", "question", "example_index"]
    then_preview(
        wiring.on([page["examples"].click], talk.pick_example, ["examples", "state"], picked, **private, **gpu)
    )
    then_preview(
        wiring.on([page["next"].click], talk.next_example, ["example_index", "state"], picked, **private, **gpu)
    )
    asking = dict(show_progress="minimal", **private, **gpu)
    asked = wiring.on(
        [page["ask"].click, page["question"].submit], talk.ask, ["question", "state"], [*views, *SLIDERS], **asking
    )
    after = dict(show_progress="hidden", **private)
    wiring.follow(asked.success, talk.recording_after_turn, ["state"], ["export_recording"], **after)
    race = (talk.play_race, ["state", "slowdown"], ["status", *(f"{side}_answer" for side in SIDES)])
    wiring.on([page["race"].click], *race, **after)
    wiring.follow(asked.success, *race, **after)  # after a turn, and on a loaded recording, the race plays itself
    loaded = [*views, *CONTROLS, *SLIDERS, "media", "question"]
    for trigger, handler, source in (
        (page["load"].upload, talk.load_recording, "load"),
        (page["shipped"].input, talk.load_shipped, "shipped"),
    ):
        loading = wiring.on([trigger], handler, [source, "state"], loaded, **private, **gpu)  # it replaces the talk
        wiring.follow(loading.success, *race, **after)
    modes = ["state", "left_method", "left_budget", "right_method", "right_budget"]
    triggers = [page[f"{side}_{part}"].input for side in SIDES for part in ("method", "budget")]
    changed = wiring.on(
        triggers, talk.set_mode, modes, [*VIEWS, *CONTROLS], trigger_mode="always_last", **private, **gpu
    )
    then_preview(changed)
    scrubbing = dict(trigger_mode="always_last", show_progress="hidden", **private, **gpu)
    for side in SIDES:  # the slider redraws on release (not every step of a drag), from the tower's cache
        redrawn = [f"{side}_overlay", f"{side}_chosen", f"{side}_scrub_info"]
        wiring.on(
            [page[f"{side}_scrub"].release],
            getattr(talk, f"scrub_{side}"),
            ["state", f"{side}_scrub"],
            redrawn,
            **scrubbing,
        )
    for side in SIDES:  # the keys step presets (what runs); the preview after moves the slider to match
        for step, name in ((-1, "up"), (1, "down")):  # up: more tokens (presets go from most to fewest)
            stepper = _stepper(talk, side, step)
            then_preview(
                wiring.on([page[f"{side}_{name}"].click], stepper, ["state"], [*VIEWS, *CONTROLS], **private, **gpu)
            )


def _stepper(talk: TalkHandlers, side: str, step: int):
    def step_budget(conversation: Conversation) -> dict:
        return talk.step_budget(conversation, side, step)

    step_budget.__name__ = f"{side}_budget_{'up' if step < 0 else 'down'}"
    return step_budget
