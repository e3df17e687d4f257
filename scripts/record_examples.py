"""Write the recordings shipped in assets/ (`python scripts/record_examples.py`): conversations about the
example pictures and clip held on the tiny random-weight model on this machine, through the app's own
turn code (bench.conversation.record_conversation).  Their answers are noise; their timings are real
measurements of the tiny model, and every place that shows them says so."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.models import ModelRegistry  # noqa: E402
from bench.conversation import record_conversation  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_NEW_TOKENS = 24
RECORDINGS = {
    "tiny-house_and_car.vzrec.json": (
        ("Full", "VisionZip 320"),
        "house_and_car.png",
        ["Is there a car in this picture? Answer yes or no.", "What colour is the roof?"],
    ),
    "tiny-price_board.vzrec.json": (
        ("VisionZip 160", "DivPrune 160"),
        "price_board.png",
        ["What does the board say the green tea costs?"],
    ),
    "tiny-clock_and_door.vzrec.json": (
        ("Full", "FastV 320"),
        "clock_and_door.png",
        ["What time does the clock show?", "What number is on the door?"],
    ),
    "tiny-rolling_ball.vzrec.json": (
        ("Full", "VisionZip 320"),
        "rolling_ball.gif",
        ["Which way does the blue ball roll, and does it pass the flag?"],
    ),
}


def main() -> None:
    registry = ModelRegistry()
    label = registry.default
    for name, ((left, right), media, questions) in RECORDINGS.items():
        modes = {"left": (label, left), "right": (label, right)}
        path = record_conversation(
            registry, modes, ASSETS / media, questions, MAX_NEW_TOKENS, ASSETS / name, "scripts/record_examples.py"
        )
        print(f"{path.name}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
