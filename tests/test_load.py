"""Eight visitors at once, each holding a three-turn conversation about their own picture: every
session sees only its own questions, answers and token counts."""

import threading
import time

import numpy as np
import pytest
from app_helpers import expected_visual_tokens
from gradio_client import Client, handle_file
from PIL import Image

SIZES = [(336, 336), (672, 672), (640, 480), (480, 640), (1008, 336), (336, 1008), (900, 500), (1280, 720)]  # (w, h)
TURNS = 3


@pytest.fixture(scope="module")
def max_new_tokens():
    return 2


def converse(url: str, picture: str, visitor: int, results: dict, errors: dict) -> None:
    try:
        client = Client(url, verbose=False)
        client.predict(handle_file(picture), api_name="/set_media")
        for turn in range(1, TURNS + 1):
            left, right, stats, _ = client.submit(f"Visitor {visitor}, question {turn}?", api_name="/ask").result(
                timeout=600
            )
        results[visitor] = (left, right, stats)
    except Exception as error:  # reported by the test, with the visitor it happened to
        errors[visitor] = error


def test_eight_visitors_at_once_keep_their_own_conversations(app_url, tmp_path, tiny_next):
    _, processor = tiny_next
    expected = {visitor: expected_visual_tokens(processor, *size) for visitor, size in enumerate(SIZES)}
    assert len({full for full, _ in expected.values()}) == len(SIZES)  # each picture's count is its own
    pictures = {}
    for visitor, (width, height) in enumerate(SIZES):
        pictures[visitor] = str(tmp_path / f"visitor{visitor}.png")
        pixels = np.random.default_rng(visitor).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pictures[visitor])

    results, errors = {}, {}
    visitors = [threading.Thread(target=converse, args=(app_url, pictures[v], v, results, errors)) for v in pictures]
    start = time.perf_counter()
    for thread in visitors:
        thread.start()
    for thread in visitors:
        thread.join()
    elapsed = time.perf_counter() - start
    print(f"\n{len(visitors)} visitors x {TURNS} turns x 2 sides on the tiny model: {elapsed:.1f} s")
    assert not errors, errors

    for visitor, (left, right, stats) in results.items():
        asked = [f"Visitor {visitor}, question {turn}?" for turn in range(1, TURNS + 1)]
        for history in (left, right):
            user = [message["content"] for message in history if message["role"] == "user"]
            assert [text if isinstance(text, str) else text[0]["text"] for text in user] == asked
        assert sorted((record["turn"], record["side"]) for record in stats) == [
            (turn, side) for turn in range(1, TURNS + 1) for side in ("left", "right")
        ]
        for record in stats:
            assert record["error"] is None
            full, reduced = expected[visitor]
            assert record["visual_tokens"] == (full if record["side"] == "left" else reduced)
