"""`python -m bench.conversation`: the app's timing path as a table (contents, never speed), on the tiny model."""

import contextlib
import io
import json
import statistics

import pytest

from app.models import ModelRegistry
from bench import conversation as bench
from visionzip import preset_budget
from visionzip.tiny import load_tiny

TILES_672 = 5  # the benchmark image: base tile + 2x2 grid
STOCK_TOKENS_672 = 2928


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("app-bench")
    printed = io.StringIO()
    argv = [
        "--device",
        "cpu",
        "--turns",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--budgets",
        "320",
        "160",
        "--max-new-tokens",
        "3",
    ]
    with contextlib.redirect_stdout(printed):
        bench.main(argv + ["--out", str(out)])
    (json_path,) = out.glob("*.json")
    (csv_path,) = out.glob("*.csv")
    return json.loads(json_path.read_text()), printed.getvalue(), csv_path.read_text()


def test_every_budget_and_turn_has_a_row_with_the_real_counts(report):
    results, printed, csv_text = report
    rows = results["rows"]
    assert [(row["budget"], row["turn"]) for row in rows] == [("320", 1), ("320", 2), ("160", 1), ("160", 2)]
    for row in rows:
        assert row["full_visual_tokens"] == STOCK_TOKENS_672
        assert row["visionzip_visual_tokens"] == TILES_672 * preset_budget("llava_next", row["budget"]).per_tile
        assert row["full_context_tokens"] > row["full_visual_tokens"]
        assert f"| {row['budget']} | {row['turn']} | 2,928 -> {row['visionzip_visual_tokens']:,} |" in printed
    assert len(csv_text.strip().splitlines()) == 1 + len(rows)
    assert "CPU wall clock" in results["meta"]["timing"] and results["meta"]["repeats"] == 2


def test_medians_and_ratios_come_from_the_recorded_turns(report):
    results, _, _ = report
    for row in results["rows"]:
        turns = [conversation[row["turn"] - 1] for conversation in results["conversations"][row["budget"]]]
        assert len(turns) == 2 and all(turn["left"]["turn"] == row["turn"] for turn in turns)
        assert row["full_ttft_ms"] == statistics.median(turn["left"]["ttft_ms"] for turn in turns)
        assert row["visionzip_vision_ms"] == statistics.median(turn["right"]["vision_ms"] for turn in turns)
        ratios = [turn["left"]["ttft_ms"] / turn["right"]["ttft_ms"] for turn in turns]
        assert row["ttft_speedup"] == pytest.approx(statistics.median(ratios))
        # the second turn re-reads the first question and answer
        if row["turn"] == 2:
            first = results["conversations"][row["budget"]][0][0]["left"]
            assert turns[0]["left"]["text_tokens"] > first["text_tokens"]


def test_a_wide_checkpoint_is_built_once_and_loads_through_the_registry(tmp_path, monkeypatch):
    builds = []

    def build_small(layers, dtype, device):  # the tiny model stands in for the 7B-wide one
        builds.append(layers)
        return load_tiny("llava_next", dtype=dtype)

    monkeypatch.setenv("VISIONZIP_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "build_wide", build_small)
    folder = bench.wide_checkpoint(2, "float32", bench.resolve_device("cpu"))
    assert bench.wide_checkpoint(2, "float32", bench.resolve_device("cpu")) == folder and builds == [2]
    assert not list(tmp_path.glob("*.partial"))
    registry = ModelRegistry(str(folder), device="cpu")
    assert registry.get(registry.default).family == "llava_next"
