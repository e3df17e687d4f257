"""bench.qwen_phases on the tiny Qwen2.5-VL: it runs every mode and reports the counts each budget gives."""

import json

from bench import qwen_phases


def test_the_benchmark_runs_every_mode_with_its_counts(tmp_path, capsys):
    assert qwen_phases.main(["--preset", "tiny", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    [written] = tmp_path.glob("qwen_phases_tiny_*.json")
    rows = {row["mode"]: row for row in json.loads(written.read_text())["rows"]}
    counts = {name: row["visual_tokens"] for name, row in rows.items()}
    # 672x672 px: 24x24 merged cells; Pool 64: 3x3 windows, an 8x8 grid
    assert counts == {
        "full": 576,
        "VisionZip 256": 256,
        "VisionZip 128": 128,
        "VisionZip 64": 64,
        "DivPrune 128": 128,
        "Pool 64": 64,
    }
    assert rows["full"]["token_ratio"] == 1 and rows["VisionZip 64"]["token_ratio"] == 9
    assert all(name in table for name in counts)


def test_a_clip_counts_every_budget_per_frame_pair(tmp_path, capsys):
    """--frames 5: three frame pairs (the last frame repeated), each pair 24x24 cells and each budget per pair."""
    assert (
        qwen_phases.main(
            ["--preset", "tiny", "--frames", "5", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)]
        )
        == 0
    )
    [written] = tmp_path.glob("qwen_phases_tiny_*_5frames.json")
    counts = {row["mode"]: row["visual_tokens"] for row in json.loads(written.read_text())["rows"]}
    per_pair = {
        "full": 576,
        "VisionZip 256": 256,
        "VisionZip 128": 128,
        "VisionZip 64": 64,
        "DivPrune 128": 128,
        "Pool 64": 64,
    }
    assert counts == {name: 3 * tokens for name, tokens in per_pair.items()}
