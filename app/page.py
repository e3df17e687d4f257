"""The page's layout: components made by one render method per region and kept by name, so the
wiring (`app.ui`) and the handlers (`app.handlers`) refer to them by the names the handlers return."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import charts, render
from app.conversation import SIDES, Conversation
from app.handlers import CUSTOM_START, CUSTOM_TOKENS_START, NO_DIFFERENCE, NO_IMAGE
from app.models import ModelRegistry
from app.modes import FULL, budget_labels, method_titles, mode_choices
from app.video import DEFAULT_FRAMES, MAX_FRAMES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VIDEO_TYPES = ["video", ".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"]
CSS = """
#banner { background: #fff4d6; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px; }
#summary p { font-size: 1.5rem !important; line-height: 1.4; }
#summary small { font-size: 1rem; }
.side-header { min-height: 6.2em; }  /* both columns' controls line up whatever the header's length */
.side-header h3 { margin: 0; }
.message-wrap .message { font-size: 1.05em; }
"""
PROBES = [
    "Is there a car in this picture? Answer yes or no.",
    "What does the text in the picture say?",
    "Now look at the top-left corner: what is there?",
]
PROBES_LABEL = "Questions that probe the weak spots: object existence, reading text, another region on a later turn"
INTRO = (
    "# VisionZip Live\nThe same question, answered twice on one copy of the weights: by default with every "
    "visual token (left) and with [VisionZip](https://arxiv.org/abs/2412.04467)'s few dominant + contextual "
    "tokens (right). Each side can run any method at any budget; **Match** sets one side to the other's "
    "visual-token count. Each side re-reads the whole conversation every turn, so the saving shows on every turn."
)


class Page:
    """Every component of the page by name (`page["left_chat"]`), made inside an open `gr.Blocks`."""

    def __init__(self, registry: ModelRegistry, start: Conversation, max_new_tokens: int) -> None:
        self.registry, self.start, self.max_new_tokens = registry, start, max_new_tokens
        self.components: dict[str, gr.components.Component | gr.blocks.BlockContext] = {}
        self.render()

    def __getitem__(self, name: str):
        return self.components[name]

    def add(self, name: str, component):
        self.components[name] = component
        return component

    def render(self) -> None:
        self.add("state", gr.State(self.start))
        self.add("selection_state", gr.State(None))  # the overlay's selection: view switches redraw without the model
        self.add("question", gr.Textbox(label="question", visible=False))  # the question, once the box is cleared
        gr.Markdown(INTRO)
        tiny = self.registry.is_tiny(self.registry.default)
        self.add("banner", gr.Markdown(render.TINY_BANNER, visible=tiny, label="banner", elem_id="banner"))
        with gr.Row(equal_height=False):
            self.render_media_column()
            for side in SIDES:
                self.render_side(side)
        self.render_message_row()
        self.add("summary", gr.Markdown(label="summary", elem_id="summary"))
        quality_label = (
            "Quality check: KL to the full model on every turn and the full answer scored (one more forward)"
        )
        with gr.Row():
            self.add("quality_check", gr.Checkbox(False, label=quality_label, elem_id="quality-check"))
            cache_label = (
                "Keep the KV cache between turns, as a chat server does (off: re-prefill every turn, so a "
                "text-dependent method re-selects for every question)"
            )
            self.add("keep_cache", gr.Checkbox(False, label=cache_label, elem_id="keep-cache"))
        self.add(
            "models_info", gr.Markdown(render.models_markdown(self.registry), label="models", elem_id="models-info")
        )
        with gr.Tabs():
            self.render_overlay_tab()
            self.render_difference_tab()
            self.render_charts_tab()
            self.render_export_tab()

    def render_media_column(self) -> None:
        with gr.Column(scale=1, min_width=260):
            media = self.add("media", gr.Image(type="filepath", label="Image", height=300, elem_id="media"))
            self.add("video", gr.File(label="… or a video", file_types=VIDEO_TYPES, height=140, elem_id="video"))
            formats = "Images: PNG, JPEG, WebP, GIF, BMP, TIFF. Videos: MP4, WebM, MOV, AVI, MKV, animated GIF."
            self.add("media_info", gr.Markdown(formats, label="media info", elem_id="media-info"))
            with gr.Group():
                frames_label = "Video frames, sampled uniformly"
                self.add(
                    "frames",
                    gr.Slider(1, MAX_FRAMES, value=DEFAULT_FRAMES, step=1, label=frames_label, elem_id="frames"),
                )
                same_label = "Same budget: a reducing side gets as many frames as fit in the full side's tokens"
                self.add("same_budget", gr.Checkbox(False, label=same_label, elem_id="same-budget"))
            examples = sorted(str(path) for path in ASSETS.glob("*.png"))
            if examples:
                gr.Examples(
                    examples=[[path] for path in examples], inputs=[media], cache_examples=False, label="Examples"
                )

    def render_side(self, side: str) -> None:
        start, registry = self.start, self.registry
        header = render.side_header(registry, start, side, self.max_new_tokens)
        with gr.Column(scale=2):
            self.add(
                f"{side}_header",
                gr.Markdown(header, label=f"{side} header", elem_id=f"{side}-header", elem_classes="side-header"),
            )
            mode = start.sides[side].mode
            with gr.Row():
                models = list(registry.choices)
                model = gr.Dropdown(
                    models, value=start.sides[side].model, label="Model", elem_id=f"{side}-model", scale=2
                )
                self.add(f"{side}_model", model)
                method = gr.Dropdown(method_titles(), value=mode.method_title, label="Method", elem_id=f"{side}-method")
                self.add(f"{side}_method", method)
                family = registry.family(start.sides[side].model)
                choices = mode_choices(family, mode.method if mode.enabled else FULL)
                labels = budget_labels(family, mode)  # in the unit the budget counts on this family
                # any method's budget can arrive through the API: make_mode checks the name
                budget = gr.Dropdown(
                    choices,
                    value=mode.name,
                    label="Budget",
                    info=labels["info"],
                    allow_custom_value=True,
                    elem_id=f"{side}-mode",
                    min_width=150,
                )
                self.add(f"{side}_mode", budget)
            match = gr.Button("Match the other side's visual-token count", size="sm", elem_id=f"{side}-match")
            self.add(f"{side}_match", match)
            tuned_info = "The same tokens, through a projector fine-tuned for VisionZip (the paper's VisionZip‡)"
            tuned = gr.Checkbox(**render.tuned_box(registry, start, side), info=tuned_info, elem_id=f"{side}-tuned")
            self.add(f"{side}_tuned", tuned)
            with gr.Row(visible=False) as custom_row:
                self.add(f"{side}_custom_row", custom_row)
                dominant = gr.Number(CUSTOM_START[0], label=labels["dominant"], precision=0, elem_id=f"{side}-dominant")
                self.add(f"{side}_dominant", dominant)
                contextual = gr.Number(
                    CUSTOM_START[1], label=labels["contextual"], precision=0, elem_id=f"{side}-contextual"
                )
                self.add(f"{side}_contextual", contextual)
            with gr.Row(visible=False) as tokens_row:
                self.add(f"{side}_tokens_row", tokens_row)
                tokens = gr.Number(CUSTOM_TOKENS_START, label=labels["tokens"], precision=0, elem_id=f"{side}-tokens")
                self.add(f"{side}_tokens", tokens)
            chat = gr.Chatbot(
                label=f"{render.SIDE_NAMES[side]} chat",
                show_label=False,
                height=460,
                elem_id=f"{side}-chat",
                buttons=["copy"],
            )
            self.add(f"{side}_chat", chat)

    def render_message_row(self) -> None:
        with gr.Row():
            placeholder = "Ask both sides about the image, e.g. 'What is in this picture?' (Enter to send)"
            self.add("message", gr.Textbox(placeholder=placeholder, show_label=False, scale=6, elem_id="message"))
            self.add("send", gr.Button("Send", variant="primary", scale=1, elem_id="send"))
            self.add("stop", gr.Button("Stop", variant="stop", scale=1, elem_id="stop"))
            self.add("regenerate", gr.Button("Regenerate", scale=1, elem_id="regenerate"))
            self.add("clear", gr.Button("Clear", scale=1, elem_id="clear"))
        # The known weak spots of token reduction: object existence (POPE), reading text, and a later
        # question about a region the first one did not ask about (where text-dependent methods fail).
        gr.Examples(examples=[[q] for q in PROBES], inputs=[self["message"]], label=PROBES_LABEL, cache_examples=False)

    def render_overlay_tab(self) -> None:
        with gr.Tab("What the method keeps", elem_id="tab-overlay"):
            self.add("view", gr.Dropdown(["all"], value="all", label="Tiles", elem_id="overlay-view"))
            filmstrip = gr.Gallery(label="Filmstrip", columns=6, height="auto", visible=False, elem_id="filmstrip")
            self.add("filmstrip", filmstrip)
            self.add("legend", gr.Markdown(NO_IMAGE, label="legend", elem_id="overlay-legend"))
            self.render_scrub()
            with gr.Column() as image_views:  # hidden, with the view, for a video: its frames are in the filmstrip
                self.add("image_views", image_views)
                with gr.Row():
                    picture = dict(show_label=False, type="pil", interactive=False)
                    self.add("overlay", gr.Image(label="Kept and merged tokens", elem_id="overlay", **picture))
                    self.add("heatmap", gr.Image(label="CLS attention", elem_id="heatmap", **picture))
                self.add("attention_plot", gr.Plot(label="attention", show_label=False, elem_id="attention-chart"))

    def render_scrub(self) -> None:
        """The budget slider: previews the reducing side's method at any budget from one tower run."""
        self.add("scrub", gr.Slider(1, 576, value=64, step=1, label="Budget", visible=False, elem_id="scrub"))
        self.add("scrub_info", gr.Markdown("", label="budget preview", elem_id="scrub-info"))

    def render_difference_tab(self) -> None:
        with gr.Tab("Where the sides differ", elem_id="tab-difference"):
            self.add("compare", gr.Button("Compare the two sides' choices", size="sm", elem_id="compare"))
            self.add("difference_table", gr.Markdown(NO_DIFFERENCE, label="overlap", elem_id="difference-table"))
            picture = dict(show_label=False, type="pil", interactive=False)
            self.add("difference_image", gr.Image(label="kept by left, right, both", elem_id="difference", **picture))
            self.add("difference_json", gr.JSON(label="overlap per tile", visible=False, elem_id="difference-json"))

    def render_charts_tab(self) -> None:
        with gr.Tab("Charts", elem_id="tab-charts"):
            self.add(
                "tokens_plot",
                gr.Plot(charts.tokens_chart([]), label="tokens", show_label=False, elem_id="tokens-chart"),
            )
            self.add(
                "times_plot", gr.Plot(charts.times_chart([]), label="times", show_label=False, elem_id="times-chart")
            )
            speedup = gr.Plot(charts.speedup_chart([]), label="speed-up", show_label=False, elem_id="speedup-chart")
            self.add("speedup_plot", speedup)
            quality = gr.Plot(charts.quality_chart([]), label="quality", show_label=False, elem_id="quality-chart")
            self.add("quality_plot", quality)

    def render_export_tab(self) -> None:
        with gr.Tab("Export", elem_id="tab-export"):
            with gr.Row():
                self.add("export_json", gr.DownloadButton("Download JSON", elem_id="export-json"))
                self.add("export_csv", gr.DownloadButton("Download CSV", elem_id="export-csv"))
                self.add("export_recording", gr.DownloadButton("Download recording", elem_id="export-recording"))
                load = gr.UploadButton("Replay a recording…", file_types=[".json"], elem_id="load-recording")
                self.add("load_recording", load)
            self.add("stats_json", gr.JSON(label="Per-turn measurements", elem_id="stats-json"))
