"""Shared fixtures: the tiny offline checkpoints, built once per test session into a temp cache."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Every test builds and reads tiny checkpoints from one fresh cache folder."""
    if "VISIONZIP_CACHE" not in os.environ:
        os.environ["VISIONZIP_CACHE"] = str(tmp_path_factory.mktemp("visionzip-cache"))
    return os.environ["VISIONZIP_CACHE"]


@pytest.fixture(scope="session")
def tiny_next():
    from visionzip.tiny import load_tiny

    return load_tiny("llava_next")


@pytest.fixture(scope="session")
def tiny_llava():
    from visionzip.tiny import load_tiny

    return load_tiny("llava")


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def make_image():
    return random_image


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
