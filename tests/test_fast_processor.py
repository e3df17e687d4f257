"""The real processor path: transformers 5's default image processors for Qwen2.5-VL and LLaVA-OneVision are
the torchvision-backed ("fast") ones, which the main venv (CPU torch, no torchvision) cannot load: it gets
the PIL ones.  The vLLM venv has torchvision and a torch that runs on this CPU, so tests/fast_processor_counts.py
runs there: it loads the tiny checkpoints as the app does and counts, with the fast processors, for several
image sizes and every method that runs on each family.  Here: the app's loader picked the class a real
checkpoint's config names (the torchvision one), and predicted counts == placeholders == features."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import VLLM_PYTHON, run_in_vllm_venv

import visionzip
from app.models import TINY_QWEN_LABEL
from tests.test_qwen import BUDGETS as QWEN_BUDGETS
from tests.test_qwen import SIZES as QWEN_SIZES

ROOT = Path(__file__).resolve().parent.parent
# `image_processor_type` in the real checkpoints' preprocessor_config.json (Qwen/Qwen2.5-VL-7B-Instruct,
# llava-hf/llava-onevision-qwen2-7b-ov-hf), which the tiny checkpoints write too
REAL_TYPES = {"qwen2_5_vl": "Qwen2VLImageProcessor", "llava_onevision": "LlavaOnevisionImageProcessor"}
REFUSED = {"cdpruner"}  # on both families: it needs CLIP's text tower (see README, "Model families")
# each family's image sizes (several grids) and every method that runs on it, at a budget its tiles allow
JOB = {
    "frame_pairs": [[5, 200, 300, 3], [4, 333, 517, 1], [1, 100, 150, 2]],  # odd, even and single-frame clips
    # (30, 40) holds fewer cells than FastV keeps: its refusal is tests/test_qwen.py's
    "qwen2_5_vl": dict(
        label=TINY_QWEN_LABEL, sizes=[size for size in QWEN_SIZES if min(size) >= 56], budgets=QWEN_BUDGETS
    ),
    "llava_onevision": dict(
        label="Tiny LLaVA-OneVision (random weights)",
        sizes=[(384, 384), (500, 700), (1000, 300)],  # grids 1x1, 2x2, 3x1
        budgets={
            "visionzip": dict(dominant=54, contextual=10),
            "visionzip_dominant": dict(tokens=64),
            "random": dict(tokens=64, seed=3),
            "pool": dict(tokens=81),  # a 27x27 SigLIP tile pools by 3 or 9
            "divprune": dict(tokens=200),
            "vispruner": dict(tokens=64),
            "fastv": dict(tokens=64),
        },
    ),
}


@pytest.fixture(scope="module")
def fast_counts(tiny_cache) -> dict:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"needs the vLLM venv {VLLM_PYTHON.relative_to(ROOT)} (torchvision; bash scripts/setup.sh --vllm)")
    from visionzip.tiny import tiny_checkpoint

    for family in REAL_TYPES:  # built here, offline, as the app builds them; the vLLM venv only loads them
        tiny_checkpoint(family)
    return run_in_vllm_venv("fast_processor_counts.py", JOB, "the fast-processor run", 900, VISIONZIP_CACHE=tiny_cache)


@pytest.mark.parametrize("family", sorted(REAL_TYPES))
def test_the_app_loads_the_processor_a_real_checkpoint_gets(fast_counts, family):
    report = fast_counts[family]
    assert report["saved_type"] == REAL_TYPES[family]  # the tiny checkpoint names what the real one names
    assert report["app_image_processor"] == report["auto_image_processor"] == REAL_TYPES[family]
    assert "TorchvisionBackend" in report["app_bases"]  # the fast one, not the PIL fallback


@pytest.mark.parametrize("family", sorted(REAL_TYPES))
def test_fast_processor_counts_predicted_equal_placeholders_equal_features(fast_counts, family):
    rows = fast_counts[family]["counts"]
    assert {row["method"] for row in rows} == {"full", *(set(visionzip.METHODS) - REFUSED)}
    assert len({tuple(row["size"]) for row in rows}) >= 3
    for row in rows:
        assert row["predicted"] == row["placeholders"] == row["produced"], row
    stock = {tuple(row["size"]): row["produced"] for row in rows if row["method"] == "full"}
    reduced = [row for row in rows if row["method"] not in ("full", "fastv")]
    assert any(row["produced"] < stock[tuple(row["size"])] for row in reduced)  # the reduction did reduce


def test_the_frame_pair_processor_matches_qwens_video_processor(fast_counts):
    """Where torchvision is missing the app builds Qwen2.5-VL's video inputs from the image processor (frames
    paired in time); Qwen2-VL's own torchvision video processor gives the same grids and, up to resampling,
    the same pixels."""
    for row in fast_counts["frame_pairs"]:
        assert row["ours"] == row["theirs"], row
        assert row["mean_difference"] < 0.05, row
