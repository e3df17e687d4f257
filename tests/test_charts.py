"""The plotly charts show the numbers of the turns they are given, skip failed turns, stay valid
when empty, and render without a network."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from app.charts import attention_chart, speedup_chart, times_chart, tokens_chart
from app.stats import TurnStats
from visionzip import ImageSelection, TileSelection

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FULL, REDUCED = "full", "VisionZip 54+10/tile"


def turn(
    number: int,
    side: str,
    mode: str,
    visual: int,
    text: int,
    vision: float,
    prefill: float,
    rate: float,
    new: int,
    error: str | None = None,
) -> TurnStats:
    return TurnStats(
        number, side, "tiny", mode, visual, text, visual + text, vision, prefill, rate, new, 0, "cpu", error
    )


@pytest.fixture
def conversation() -> list[TurnStats]:
    """Three turns; the reduced side failed turn 2.  Full: 800 ms to first token and 20 tokens at
    20/s (1.8 s a turn); reduced: 100 ms and 20 tokens at 25/s (0.9 s a turn)."""
    return [
        turn(1, "left", FULL, 2928, 40, 150, 800, 20, 20),
        turn(1, "right", REDUCED, 320, 40, 60, 100, 25, 20),
        turn(2, "left", FULL, 2928, 52, 150, 800, 20, 20),
        turn(2, "right", REDUCED, 0, 0, 0, 0, 0, 0, error="out of memory"),
        turn(3, "left", FULL, 2928, 61, 150, 800, 20, 20),
        turn(3, "right", REDUCED, 320, 61, 60, 100, 25, 20),
    ]


def save_html(figure: go.Figure, name: str) -> str:
    html = figure.to_html(include_plotlyjs=True, full_html=True)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_text(html)
    return html


def trace(figure: go.Figure, name: str):
    matches = [t for t in figure.data if t.name == name]
    assert len(matches) == 1, [t.name for t in figure.data]
    return matches[0]


def test_tokens_chart_stacks_visual_and_text_tokens_per_side_and_turn(conversation):
    figure = tokens_chart(conversation)
    left_visual, left_text = trace(figure, "left: full: visual tokens"), trace(figure, "left: full: text tokens")
    assert list(left_visual.x) == ["turn 1", "turn 2", "turn 3"]
    assert list(left_visual.y) == [2928, 2928, 2928] and list(left_text.y) == [40, 52, 61]
    assert list(left_text.base) == list(left_visual.y)  # text sits on top of visual: height = context
    right_visual = trace(figure, f"right: {REDUCED}: visual tokens")
    assert list(right_visual.x) == ["turn 1", "turn 3"]  # the failed turn is left out
    assert list(right_visual.y) == [320, 320]
    assert figure.layout.title.text and figure.layout.xaxis.title.text and figure.layout.yaxis.title.text
    save_html(figure, "chart_tokens.html")


def test_times_chart_splits_time_to_first_token_and_adds_decode(conversation):
    figure = times_chart(conversation)
    vision = trace(figure, "left: full: vision encode")
    prefill = trace(figure, "left: full: LLM prefill")
    decode = trace(figure, "left: full: decode")
    assert list(vision.y) == [150] * 3
    assert list(prefill.y) == [650] * 3 and list(prefill.base) == [150] * 3  # 800 ms to first token in all
    assert list(decode.y) == pytest.approx([1000] * 3) and list(decode.base) == [800] * 3  # 20 tokens at 20/s
    right_decode = trace(figure, f"right: {REDUCED}: decode")
    assert list(right_decode.x) == ["turn 1", "turn 3"] and list(right_decode.y) == pytest.approx([800, 800])
    save_html(figure, "chart_times.html")


def test_speedup_chart_accumulates_time_over_turns_both_sides_finished(conversation):
    figure = speedup_chart(conversation)
    full, reduced = trace(figure, "left: full: time so far"), trace(figure, f"right: {REDUCED}: time so far")
    assert list(full.x) == ["turn 1", "turn 3"]
    assert list(full.y) == pytest.approx([1.8, 3.6]) and list(reduced.y) == pytest.approx([0.9, 1.8])
    total = trace(figure, "speed-up, total time (left ÷ right)")
    first_token = trace(figure, "speed-up, time to first token (left ÷ right)")
    assert total.yaxis == "y2" and list(total.y) == pytest.approx([2.0, 2.0])
    assert list(first_token.y) == pytest.approx([8.0, 8.0])
    save_html(figure, "chart_speedup.html")


def test_speedup_is_full_over_reduced_whichever_side_is_full(conversation):
    swapped = [TurnStats(**{**t.__dict__, "side": "right" if t.side == "left" else "left"}) for t in conversation]
    figure = speedup_chart(swapped)
    assert list(trace(figure, "speed-up, total time (right ÷ left)").y) == pytest.approx([2.0, 2.0])


def test_speedup_chart_names_the_turns_that_reused_both_kv_caches(conversation):
    """A cached turn prefilled only its new text on both sides: its bar adds to the totals, but the axis and
    the subtitle say it measured no reduction, so a diluted (or noisy) speed-up is not read as the method's."""
    cached = [
        TurnStats(**{**t.__dict__, "cached_tokens": t.visual_tokens + 40}) if t.turn == 3 else t for t in conversation
    ]
    figure = speedup_chart(cached)
    assert list(trace(figure, "left: full: time so far").x) == ["turn 1", "turn 3 (cached)"]
    assert "cached turns prefilled only their new text" in figure.layout.title.subtitle.text
    assert not speedup_chart(conversation).layout.title.subtitle.text


@pytest.mark.parametrize("chart", [tokens_chart, times_chart, speedup_chart])
def test_charts_of_no_finished_turn_are_valid_and_say_so(chart, conversation):
    for turns in ([], [t for t in conversation if t.turn == 2 and t.side == "right"]):
        figure = chart(turns)
        assert len(figure.data) == 0
        assert any("No" in note.text or "Needs" in note.text for note in figure.layout.annotations)
        assert figure.layout.xaxis.title.text and figure.layout.yaxis.title.text
        go.Figure(figure.to_dict())  # round-trips through plotly's validation


def test_chart_html_needs_no_network(conversation):
    html = speedup_chart(conversation).to_html(include_plotlyjs=True, full_html=True)
    assert not re.search(r"<script[^>]*\bsrc=[\"']https?:", html)
    assert "Plotly.newPlot" in html


# -- the redundancy view ----------------------------------------------------------------------------
def tile_with_attention(attention: torch.Tensor) -> TileSelection:
    empty = torch.zeros(0, dtype=torch.long)
    return TileSelection(24, empty, empty, empty, empty, attention)


def concentrated_attention(seed: int) -> torch.Tensor:
    """10 patches hold half the attention (5 % each); the other 566 share the rest evenly."""
    attention = torch.full((576,), 0.5 / 566)
    attention[torch.randperm(576, generator=torch.Generator().manual_seed(seed))[:10]] = 0.05
    return attention * 0.9  # the CLS token's attention to itself is not in the patch row


def test_attention_chart_sorts_patches_and_marks_the_budget_cut():
    selection = ImageSelection(
        (672, 672), (2, 2), [tile_with_attention(concentrated_attention(s)) for s in range(5)], 320
    )
    figure = attention_chart(selection, 10, view="crop 2")
    shares = list(trace(figure, "share of each patch").y)
    assert shares[:10] == pytest.approx([5.0] * 10) and shares[10:] == pytest.approx([50 / 566] * 566)
    cumulative = trace(figure, "crop 2: top-k cumulative share")
    assert cumulative.y[9] == pytest.approx(50.0) and cumulative.y[-1] == pytest.approx(100.0)
    (cut,) = [shape for shape in figure.layout.shapes if shape.type == "line"]
    assert cut.x0 == cut.x1 == 10.5  # after the top dominant-1 = 10 patches
    assert "top 10" in figure.layout.title.subtitle.text and "50%" in figure.layout.title.subtitle.text
    save_html(figure, "chart_attention_crop2.html")

    every_tile = attention_chart(selection, 10, view="all")
    names = [t.name for t in every_tile.data]
    assert names == [f"crop {k}: top-k cumulative share" for k in range(1, 5)] + [
        "base: top-k cumulative share",
        "if attention were uniform",
    ]
