"""Plotly figures of a conversation's measurements and of the attention VisionZip ranks by.

Every figure has a title and axis titles, large fonts for a projector, and needs no network:
Gradio's `gr.Plot` ships plotly.js; `fig.to_html(include_plotlyjs=True)` embeds it.
"""

from __future__ import annotations

import plotly.colors as pcolors
import plotly.graph_objects as go

from app.overlay import signal_name, tile_names, tiles_in_view
from app.stats import TurnStats
from visionzip import ImageSelection

FONT_SIZE = 18
HEIGHT = 520
# per side: shades of one hue, dark for vision, medium for LLM prefill / text, light for decode
SIDE_SHADES = {"left": pcolors.sequential.Blues[-2:-8:-2], "right": pcolors.sequential.Oranges[-2:-8:-2]}
UNIFORM_COLOUR = "grey"


def _styled(figure: go.Figure, title: str, x_title: str, y_title: str, subtitle: str = "") -> go.Figure:
    figure.update_layout(
        title={
            "text": title,
            "font": {"size": FONT_SIZE + 6},
            "subtitle": {"text": subtitle, "font": {"size": FONT_SIZE}},
        },
        font={"size": FONT_SIZE},
        template="plotly_white",
        height=HEIGHT,
        margin={"l": 80, "r": 80, "t": 110, "b": 70},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
        xaxis_title_text=x_title,
        yaxis_title_text=y_title,
    )
    return figure


def _with_note(figure: go.Figure, note: str) -> go.Figure:
    """An empty chart that says why it is empty (axes keep their titles, lose their meaningless ticks)."""
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.add_annotation(
        text=note, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font={"size": FONT_SIZE + 2}
    )
    return figure


def _side_labels(turns: list[TurnStats]) -> dict[str, str]:
    """'left: full', 'right: VisionZip 54+10/tile'; the model is added when the sides differ in it."""
    first = {}
    for turn in turns:
        first.setdefault(turn.side, turn)
    models_differ = len({turn.model for turn in first.values()}) > 1
    return {
        side: f"{side}: {turn.mode}" + (f" · {turn.model}" if models_differ else "") for side, turn in first.items()
    }


def _ok_by_side(turns: list[TurnStats]) -> dict[str, list[TurnStats]]:
    by_side: dict[str, list[TurnStats]] = {}
    for turn in sorted(turns, key=lambda t: t.turn):
        if turn.ok:
            by_side.setdefault(turn.side, []).append(turn)
    return by_side


def decode_ms(turn: TurnStats) -> float:
    """Time spent generating after the first token, from the decode rate and the token count."""
    return 1000.0 * turn.new_tokens / turn.decode_tokens_per_s if turn.decode_tokens_per_s > 0 else 0.0


def _stacked(
    figure: go.Figure, side: str, label: str, turns: list[TurnStats], parts: list[tuple[str, list[float]]], unit: str
) -> None:
    """Bars stacked per turn within the side's own slot of the group (offsetgroup + base)."""
    x = [f"turn {turn.turn}" for turn in turns]
    base = [0.0] * len(turns)
    for (name, values), colour in zip(parts, SIDE_SHADES.get(side, pcolors.sequential.Greys[-2:-8:-2])):
        figure.add_bar(
            x=x,
            y=values,
            base=list(base),
            name=f"{label}: {name}",
            offsetgroup=side,
            legendgroup=side,
            marker_color=colour,
            hovertemplate=f"{label}<br>{name}: %{{y:,.0f}} {unit}<extra></extra>",
        )
        base = [b + v for b, v in zip(base, values)]


def tokens_chart(turns: list[TurnStats]) -> go.Figure:
    """Per turn, each side's visual and text tokens, stacked (the bar's height is the context prefilled)."""
    figure = go.Figure()
    labels, by_side = _side_labels(turns), _ok_by_side(turns)
    for side, side_turns in by_side.items():
        parts = [
            ("visual tokens", [float(t.visual_tokens) for t in side_turns]),
            ("text tokens", [float(t.text_tokens) for t in side_turns]),
        ]
        _stacked(figure, side, labels[side], side_turns, parts, "tokens")
    figure.update_layout(barmode="group")
    _styled(figure, "Tokens the language model reads, per turn", "turn", "tokens")
    return figure if by_side else _with_note(figure, "No finished turns yet")


def times_chart(turns: list[TurnStats]) -> go.Figure:
    """Per turn, each side's time: vision encode, then LLM prefill (the two make the time to first
    token), then decode; stacked, so the bar's height is the turn's whole time."""
    figure = go.Figure()
    labels, by_side = _side_labels(turns), _ok_by_side(turns)
    for side, side_turns in by_side.items():
        parts = [
            ("vision encode", [t.vision_ms for t in side_turns]),
            # timer jitter can put the vision time a hair above the time to first token: no negative bar
            ("LLM prefill", [t.llm_prefill_ms for t in side_turns]),
            ("decode", [decode_ms(t) for t in side_turns]),
        ]
        _stacked(figure, side, labels[side], side_turns, parts, "ms")
    figure.update_layout(barmode="group")
    _styled(figure, "Time per turn (vision + LLM prefill = time to first token)", "turn", "milliseconds")
    return figure if by_side else _with_note(figure, "No finished turns yet")


def quality_chart(turns: list[TurnStats]) -> go.Figure:
    """Per turn, each reducing side's KL divergence from the full model's first-token distribution
    (0: the next token is predicted as with every visual token)."""
    figure = go.Figure()
    labels = _side_labels(turns)
    for side, side_turns in _ok_by_side(turns).items():
        measured = [t for t in side_turns if t.kl_to_full is not None]
        if measured:
            shade = SIDE_SHADES[side][1]
            figure.add_bar(
                x=[t.turn for t in measured], y=[t.kl_to_full for t in measured], name=labels[side], marker_color=shade
            )
    figure.update_layout(barmode="group")
    subtitle = "KL(full || reduced) of the first answer token, nats; lower is closer to the full model"
    _styled(figure, "How far each reduction moves the next-token distribution", "turn", "nats", subtitle)
    return (
        figure if figure.data else _with_note(figure, "No KL measured yet: it needs a full side or the quality check")
    )


def speedup_chart(turns: list[TurnStats]) -> go.Figure:
    """Over the turns both sides finished: each side's cumulative time (seconds) and the speed-up,
    full over reduced (or left over right when neither side is "full"), of the total time and of
    the time to first token."""
    figure = go.Figure()
    ok = {(t.turn, t.side): t for t in turns if t.ok}
    sides = sorted({side for _, side in ok})
    if len(sides) != 2:
        _styled(figure, "Cumulative time and speed-up", "turn", "seconds, cumulative")
        return _with_note(figure, "Needs finished turns on both sides")
    full = [side for side in sides if any(t.mode == "full" for (_, s), t in ok.items() if s == side)]
    slow = full[0] if len(full) == 1 else "left"
    fast = next(side for side in sides if side != slow)
    shared = sorted(turn for turn, side in ok if side == slow and (turn, fast) in ok)
    labels = _side_labels([ok[key] for key in sorted(ok)])
    # A turn that reused both KV caches prefilled only its new text on both sides: it adds to the totals
    # (it is time the conversation took) but is no measure of the reduction, so the axis says which it was.
    cached = {turn for turn in shared if ok[(turn, slow)].cached_tokens and ok[(turn, fast)].cached_tokens}
    x = [f"turn {turn} (cached)" if turn in cached else f"turn {turn}" for turn in shared]
    totals, firsts = {}, {}
    for side in (slow, fast):
        total = first = 0.0
        totals[side], firsts[side] = [], []
        for turn in shared:
            stats = ok[(turn, side)]
            total += (stats.ttft_ms + decode_ms(stats)) / 1000
            first += stats.ttft_ms / 1000
            totals[side].append(total)
            firsts[side].append(first)
        figure.add_scatter(
            x=x,
            y=totals[side],
            name=f"{labels[side]}: time so far",
            mode="lines+markers",
            line={"color": SIDE_SHADES.get(side, ["black"])[0], "width": 4},
            hovertemplate="%{y:.2f} s<extra></extra>",
        )
    for name, series, dash in (("total time", totals, "solid"), ("time to first token", firsts, "dot")):
        figure.add_scatter(
            x=x,
            y=[s / f if f > 0 else None for s, f in zip(series[slow], series[fast])],
            name=f"speed-up, {name} ({slow} ÷ {fast})",
            mode="lines+markers",
            yaxis="y2",
            line={"color": "black", "width": 3, "dash": dash},
            hovertemplate="%{y:.1f}x<extra></extra>",
        )
    figure.update_layout(
        yaxis={"rangemode": "tozero"},
        yaxis2={
            "title": {"text": "speed-up (x)"},
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
            "tickformat": ".1f",
            "ticksuffix": "x",
            "showgrid": False,
        },
    )
    subtitle = "cached turns prefilled only their new text on both sides: they dilute the speed-up" if cached else ""
    title = "Cumulative time over the conversation, and the speed-up"
    _styled(figure, title, "turn", "seconds, cumulative", subtitle)
    return figure if shared else _with_note(figure, "No turn finished on both sides yet")


def attention_chart(selection: ImageSelection, cut: int, view: str = "base") -> go.Figure:
    """The redundancy view (the paper's figure 2): patches sorted by the CLS attention they receive,
    each one's share of it, and the cumulative share held by the top k, with the budget's cut after
    the top `cut` patches (VisionZip: dominant - 1, the CLS token is kept besides)."""
    tiles = [tile for panel in tiles_in_view(selection, view) for tile in panel]
    share_axis = "y2" if len(tiles) == 1 else "y"  # one tile: its bars on y, cumulative share on y2
    names = tile_names(selection)
    figure = go.Figure()
    notes = []
    for tile in tiles:
        attention = selection.tiles[tile].cls_attention.double().clamp(min=0)
        share = (attention / attention.sum()).sort(descending=True).values * 100
        cumulative = share.cumsum(0)
        ranks = list(range(1, len(share) + 1))
        if len(tiles) == 1:
            figure.add_bar(x=ranks, y=share.tolist(), name="share of each patch", marker_color=SIDE_SHADES["left"][1])
        figure.add_scatter(
            x=ranks,
            y=cumulative.tolist(),
            name=f"{names[tile]}: top-k cumulative share",
            mode="lines",
            yaxis=share_axis,
            line={"width": 4},
        )
        notes.append(f"{names[tile]}: {cumulative[cut - 1].item() if cut > 0 else 0.0:.0f}%")
    count = len(selection.tiles[tiles[0]].cls_attention)
    figure.add_scatter(
        x=[0, count],
        y=[0, 100],
        name="if attention were uniform",
        mode="lines",
        yaxis=share_axis,
        line={"color": UNIFORM_COLOUR, "dash": "dash", "width": 2},
    )
    figure.add_vline(
        x=cut + 0.5,
        line={"color": "red", "width": 3},
        annotation_text=f"budget: top {cut} patches kept",
        annotation_position="top right",
    )
    signal = signal_name(selection.tiles[0])  # SigLIP has no CLS: the attention each patch receives
    title = f"How concentrated is the {signal}? (feature layer)"
    subtitle = f"share held by the top {cut} patches of {count}: " + ", ".join(notes)
    if len(tiles) == 1:
        figure.update_layout(
            yaxis2={
                "title": {"text": "cumulative share (%)"},
                "overlaying": "y",
                "side": "right",
                "range": [0, 101],
                "tickmode": "linear",
                "dtick": 20,
                "showgrid": False,
            }
        )
        _styled(figure, title, f"patch rank by {signal}", f"share of the {signal} (%)", subtitle)
    else:
        figure.update_yaxes(range=[0, 101])
        _styled(figure, title, f"patch rank by {signal}", "cumulative share (%)", subtitle)
    return figure
