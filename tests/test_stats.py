"""The summary line a speaker reads out: the ratio must point the right way."""

from dataclasses import replace
from pathlib import Path

from app.stats import TurnStats, cached_turn_line, export_csv, export_json, summary_line


def stats(side: str, visual: int, ttft_ms: float, error: str | None = None) -> TurnStats:
    return TurnStats(1, side, "m", "full", visual, 40, visual + 40, 5.0, ttft_ms, 10.0, 8, 1024, error=error)


def test_summary_says_faster_or_slower():
    assert (
        summary_line(stats("left", 2928, 710.0), stats("right", 320, 100.0))
        == "2928 -> 320 visual tokens, time to first token 7.1x faster"
    )
    assert summary_line(stats("left", 2304, 100.0), stats("right", 2304, 300.0)).endswith(
        "time to first token 3.0x slower"
    )


def test_summary_is_empty_when_a_side_failed():
    assert summary_line(stats("left", 2928, 700.0), stats("right", 0, 0.0, error="out of memory")) == ""


def test_a_cached_turn_says_what_it_measured_and_gives_no_speed_up():
    full = replace(stats("left", 2928, 40.0), prefilled_tokens=155, cached_tokens=2990)
    reduced = replace(stats("right", 320, 25.0), prefilled_tokens=156, cached_tokens=380)
    assert cached_turn_line(full, reduced) == (
        "2928 -> 320 visual tokens, both in the KV cache; new text only: 155 vs 156 tokens prefilled "
        "(no speed-up: neither side prefilled its visual tokens)"
    )
    everything = replace(full, prefilled_tokens=3145, cached_tokens=0)  # e.g. its cache was dropped
    assert cached_turn_line(everything, reduced) == (
        "2928 -> 320 visual tokens; prefilled 3,145 (everything) vs 156 (new text only) tokens "
        "(no speed-up: only one side prefilled its visual tokens)"
    )
    assert cached_turn_line(full, replace(reduced, error="out of memory")) == ""


def test_exports_carry_every_field():
    turns = [stats("left", 2928, 700.0), stats("right", 320, 100.0, error="x")]
    assert '"visual_tokens": 320' in export_json(turns) and '"error": "x"' in export_json(turns)
    header, first, second = export_csv(turns).strip().splitlines()
    assert header.startswith("turn,side,model,mode,visual_tokens") and first.startswith("1,left,m,full,2928")


def test_exports_keep_only_the_most_recent_sessions(tmp_path, monkeypatch):
    from app import render
    from app.conversation import Conversation

    monkeypatch.setattr(render, "EXPORTS", tmp_path)
    monkeypatch.setattr(render, "MAX_EXPORT_SESSIONS", 3)
    conversation = Conversation(sides={})
    written = [render.export_files(conversation, f"session-{n}")[0] for n in range(5)]
    kept = sorted(path.parent.name for path in tmp_path.glob("*/visionzip_turns.json"))
    assert len(kept) == 3
    assert sorted(Path(path).parent.name for path in written[-3:]) == kept  # the newest sessions stay
    again = render.export_files(conversation, "session-2")[0]  # a kept session writes again: nothing else goes
    assert Path(again).exists() and len(list(tmp_path.iterdir())) == 3
