"""The CUDA and 4-bit paths of the model registry and the timed turn. They run where a CUDA GPU
(and, for 4-bit, bitsandbytes) is present, and skip, naming what is missing, elsewhere."""

import threading

import pytest
import torch

from app.conversation import Conversation, SideConfig
from app.models import FOUR_BIT, ModelRegistry, has_bitsandbytes, resolve_device
from app.modes import FULL, make_mode
from app.turn import load_side_models, run_turn
from visionzip.tiny import tiny_checkpoint

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)
needs_bitsandbytes = pytest.mark.skipif(not has_bitsandbytes(), reason="needs the bitsandbytes package")


def one_turn(registry: ModelRegistry, label: str, picture) -> Conversation:
    sides = {
        "left": SideConfig(label, make_mode(FULL, "llava_next")),
        "right": SideConfig(label, make_mode("VisionZip 320", "llava_next")),
    }
    chat = Conversation(sides, media_path=str(picture))
    load_side_models(registry, chat)
    for _ in run_turn(registry, chat, "What is in the picture?", 4, threading.Event()):
        pass
    return chat


@pytest.fixture
def picture(tmp_path, make_image):
    path = tmp_path / "picture.png"
    make_image(672, 672, seed=3).save(path)
    return path


def test_four_bit_is_offered_only_where_it_can_load():
    registry = ModelRegistry(str(tiny_checkpoint("llava_next")))
    offered = any(label.endswith(FOUR_BIT) for label in registry.choices)
    assert offered == has_bitsandbytes()


@needs_cuda
def test_cuda_turn_in_half_precision_is_timed_on_the_gpu(picture):
    registry = ModelRegistry(str(tiny_checkpoint("llava_next")), device="cuda")
    loaded = registry.get(registry.default)
    assert loaded.device.type == "cuda" and loaded.dtype in (torch.bfloat16, torch.float16)
    torch.cuda.reset_peak_memory_stats()
    turn = one_turn(registry, registry.default, picture).turns[-1]
    for side, visual in (("left", 2928), ("right", 320)):
        stats = turn.stats[side]
        assert stats.ok, stats.error
        assert stats.visual_tokens == visual and stats.device.startswith("cuda")
        assert 0 < stats.vision_ms < stats.ttft_ms
    assert torch.cuda.max_memory_allocated() > 0


@needs_cuda
@needs_bitsandbytes
def test_four_bit_model_answers_on_the_gpu(picture):
    registry = ModelRegistry(str(tiny_checkpoint("llava_next")), device="cuda")
    label = registry.default + FOUR_BIT
    loaded = registry.get(label)
    assert loaded.quantized
    turn = one_turn(registry, label, picture).turns[-1]
    assert all(turn.stats[side].ok for side in ("left", "right"))


def test_auto_device_is_the_gpu_when_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
