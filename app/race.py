"""The race: one turn's two answers played back side by side at the pace they were measured.

The two sides of a turn run one after the other (so their timings are comparable); the race replays
each side's tokens from that side's own start, at the times recorded when they streamed
(`Turn.tokens`: ms since the side's start; the first is its TTFT), so a room sees which side finishes
first.  `pace` is pure (its clock and sleep are parameters, so a test can drive it with a fake clock);
`race_texts` and `race_status` say what the page shows for one frame.  No Gradio here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from app.conversation import SIDES, Turn
from app.recording import weights_note

FRAME_MS = 10.0  # at most one update per this many ms: a browser redraws both answers each time (well under 20 ms)


@dataclass(frozen=True)
class RaceFrame:
    """What the race shows at `elapsed_ms` of replay time: tokens revealed per side, sides finished in order."""

    elapsed_ms: float  # replay clock (measured time: the slowdown is taken out)
    shown: dict[str, int]
    finished: tuple[str, ...]


def timelines(turn: Turn) -> dict[str, list[float]]:
    """Per side with recorded tokens: each token's ms since that side's start."""
    return {side: [ms for ms, _ in turn.tokens[side]] for side in SIDES if turn.tokens.get(side)}


def pace(
    times: dict[str, list[float]],
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    slowdown: float = 1.0,
    frame_ms: float = FRAME_MS,
) -> Iterator[RaceFrame]:
    """Frames of a race over `times` (side -> ascending ms): each token is revealed once `clock()` has
    run its recorded time (x `slowdown`) past the start; tokens due within one frame are revealed
    together.  The first frame shows nothing; the last shows every token."""
    events = sorted((ms, side) for side, side_times in times.items() for ms in side_times)
    shown = {side: 0 for side in times}
    finished: list[str] = []
    start = clock()
    yield RaceFrame(0.0, dict(shown), ())
    index, last_frame = 0, 0.0
    while index < len(events):
        due_s = max(events[index][0] * slowdown, last_frame + frame_ms) / 1000
        wait = due_s - (clock() - start)
        if wait > 0:
            sleep(wait)
        now_ms = (clock() - start) * 1000
        while index < len(events) and events[index][0] * slowdown <= now_ms:
            side = events[index][1]
            shown[side] += 1
            if shown[side] == len(times[side]):
                finished.append(side)  # events are in time order: an earlier finish is appended first
            index += 1
        last_frame = now_ms
        yield RaceFrame(now_ms / slowdown, dict(shown), tuple(finished))


def race_texts(turn: Turn, frame: RaceFrame) -> dict[str, str]:
    """Each side's answer as far as the frame reveals it, with its clock and, once done, its place."""
    texts = {}
    for side in SIDES:
        tokens = turn.tokens.get(side)
        if not tokens:
            texts[side] = "*(no timed tokens recorded for this side)*"
            continue
        count = frame.shown.get(side, 0)
        answer = "".join(text for _, text in tokens[:count]).strip()
        if side in frame.finished:
            place = "1st" if frame.finished[0] == side else "2nd"
            status = f"🏁 **finished {place}** at {tokens[-1][0]:,.0f} ms"
        elif count == 0:
            status = f"⏱ {frame.elapsed_ms:,.0f} ms · prefilling (first token at {tokens[0][0]:,.0f} ms)"
        else:
            status = f"⏱ {frame.elapsed_ms:,.0f} ms · {count} of {len(tokens)} tokens"
        texts[side] = f"{status}\n\n{answer}{'' if side in frame.finished else ' ▌'}"
    return texts


def race_status(turn: Turn, slowdown: float = 1.0) -> str:
    """The line the race shows above it: a replay of measured timings, where and on what."""
    where = turn.measured_on or {}
    pace_note = "at the measured pace" if slowdown == 1 else f"{slowdown:g}x slower than measured"
    line = (
        f"▶ **Replay of measured timings**, {pace_note}, each side from its own start (they ran one after the other)."
    )
    if where:
        line += f" Measured on **{where['hardware']}** ({where['where']})."
    return line + (" " + weights_note(where) if weights_note(where) else "")


def finish_line(turn: Turn) -> str:
    """Who finished first, and when, as recorded: the last frame's summary."""
    ends = sorted((tokens[-1][0], side) for side, tokens in turn.tokens.items() if tokens)
    if not ends:
        return ""
    parts = [f"{side} side finished at {ms:,.0f} ms" for ms, side in ends]
    return (
        "🏁 "
        + "; ".join(parts).capitalize()
        + (f" ({ends[-1][0] / ends[0][0]:.1f}× later)" if len(ends) == 2 and ends[0][0] > 0 else "")
    )
