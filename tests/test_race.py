"""The race (app/race.py): a replay reveals every token at its recorded time since its side's start,
within 5 % or 20 ms, and the sides finish in the recorded order; with a fake clock and in real time."""

import time
from pathlib import Path

import pytest

from app import race, recording
from app.conversation import Turn
from app.talk import RECORDINGS


class FakeClock:
    """A clock that moves only when slept on, overshooting each sleep as a busy machine does."""

    def __init__(self, overshoot_s: float = 0.004) -> None:
        self.now, self.overshoot_s = 100.0, overshoot_s

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.overshoot_s


def reveal_times(frames, times: dict[str, list[float]], clock) -> tuple[dict[str, list[float]], race.RaceFrame]:
    """When each token first showed (ms on `clock` since the first frame, read as each frame arrives),
    and the last frame."""
    revealed = {side: [] for side in times}
    start = frame = None
    for frame in frames:
        now = clock()
        start = now if start is None else start
        for side, count in frame.shown.items():
            revealed[side] += [(now - start) * 1000] * (count - len(revealed[side]))
    return revealed, frame


def assert_on_time(revealed: dict[str, list[float]], times: dict[str, list[float]], slowdown: float = 1.0) -> None:
    for side, recorded in times.items():
        assert len(revealed[side]) == len(recorded)
        for got, want in zip(revealed[side], recorded, strict=True):
            want *= slowdown
            assert abs(got - want) <= max(0.05 * want, 20.0), f"{side}: shown at {got:.1f} ms, recorded {want:.1f} ms"


def recorded_order(times: dict[str, list[float]]) -> tuple[str, ...]:
    return tuple(side for _, side in sorted((side_times[-1], side) for side, side_times in times.items()))


def shipped_timelines(tmp_path: Path) -> list[dict[str, list[float]]]:
    turns = [turn for path in RECORDINGS for turn in recording.read(path, tmp_path).turns]
    return [race.timelines(turn) for turn in turns]


SYNTHETIC = {
    "left": [812.0, 830.5, 851.0, 2400.0, 2410.0],  # a slow prefill, a stall in decoding
    "right": [95.0, 96.0, 97.0, 130.0, 131.0, 900.0],
}


@pytest.mark.parametrize("slowdown", [1.0, 10.0])
def test_fake_clock_reveals_every_token_on_time(tmp_path, slowdown):
    assert RECORDINGS, "no recordings shipped in assets/"
    for times in [SYNTHETIC, *shipped_timelines(tmp_path)]:
        clock = FakeClock()
        frames = race.pace(times, clock=clock, sleep=clock.sleep, slowdown=slowdown)
        revealed, last = reveal_times(frames, times, clock)
        assert_on_time(revealed, times, slowdown)
        assert last.finished == recorded_order(times)
        assert last.shown == {side: len(side_times) for side, side_times in times.items()}


def test_fake_clock_frame_times_are_slowed_replay_times():
    clock = FakeClock(overshoot_s=0.0)
    frames = list(race.pace(SYNTHETIC, clock=clock, sleep=clock.sleep, slowdown=10.0))
    # the replay clock is in measured ms; the wall clock ran 10x longer
    assert frames[-1].elapsed_ms == pytest.approx(2410.0, abs=race.FRAME_MS)
    assert clock.now - 100.0 == pytest.approx(24.10, abs=0.2)


def test_real_time_replay_keeps_the_recorded_times(tmp_path):
    turn = recording.read(RECORDINGS[0], tmp_path).turns[0]
    times = race.timelines(turn)
    frames = race.pace(times)  # the real clock and sleep
    revealed, last_frame = reveal_times(frames, times, time.perf_counter)
    assert_on_time(revealed, times)
    assert last_frame.finished == recorded_order(times)
    last = race.race_texts(
        turn, race.RaceFrame(0.0, {side: len(t) for side, t in times.items()}, recorded_order(times))
    )
    for side in times:
        assert turn.answers[side].strip() in last[side] and "finished" in last[side]
    first = recorded_order(times)[0]
    assert "finished 1st" in last[first]


def test_race_status_says_it_is_a_replay_of_measured_timings():
    turn = Turn(
        "q",
        measured_on=recording.measured_on("NVIDIA H200", "CUDA clock", "GPU check", {"left": False, "right": False}),
    )
    line = race.race_status(turn)
    assert "Replay of measured timings" in line and "NVIDIA H200" in line and "GPU check" in line
    assert "random weights" not in line
    tiny = Turn(
        "q", measured_on=recording.measured_on("a laptop", "wall clock", "here", {"left": True, "right": False})
    )
    assert "random weights" in race.race_status(tiny, slowdown=10.0) and "10x slower" in race.race_status(tiny, 10.0)
    wide = recording.measured_on(
        "NVIDIA H200", "CUDA clock", "GPU check", {"left": False, "right": False}, {"left": True, "right": True}
    )
    assert "Random weights" in race.race_status(Turn("q", measured_on=wide))  # a random model of real shape
