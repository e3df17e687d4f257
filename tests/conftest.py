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


# -- the served demo: one definition; a module overrides `registry` or `max_new_tokens` to change it ----
@pytest.fixture(scope="module")
def app_main():
    """app.py (a script beside the `app` package, so loaded from its file)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("app_main", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def registry():
    from app.models import ModelRegistry

    return ModelRegistry()


@pytest.fixture(scope="module")
def max_new_tokens():
    return 8


@pytest.fixture(scope="module")
def app_url(registry, max_new_tokens):
    from app_helpers import served

    from app.ui import build_demo

    with served(build_demo(registry, max_new_tokens=max_new_tokens)) as url:
        yield url


@pytest.fixture
def client(app_url):
    """A fresh browser-like session: its own conversation state."""
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def page(app_url):
    """One Chromium page on the served demo for the whole module; screenshots go to artifacts/."""
    from app_helpers import ARTIFACTS, browser_page

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(app_url) as page:
        yield page


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
