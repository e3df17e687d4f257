"""Serving the demo inside a test, with models that fail on purpose: one that runs out of memory,
one that never stops talking until told to, and a checkpoint whose weights are damaged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from app.models import TINY, LoadedModel, ModelRegistry
from app.ui import launch
from visionzip import preset_budget
from visionzip.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"  # bash scripts/setup.sh --vllm
ARTIFACTS = ROOT / "artifacts"  # screenshots, kept for a look after the run
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUT_OF_MEMORY = "Tiny LLaVA-NeXT that runs out of memory"
ENDLESS = "Tiny LLaVA-NeXT that talks until stopped"
DAMAGED = "LLaVA-NeXT checkpoint with damaged weights"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(demo: gr.Blocks) -> Iterator[str]:
    """The demo's URL while it is served from this process."""
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@contextmanager
def browser_page(
    url: str, size: tuple[int, int] = (1600, 1000), scale: float = 1, ready: str = "#message textarea"
) -> Iterator:
    """A Playwright page on `url` in Debian's Chromium, a CSS viewport of `size` at `scale` device pixels
    per CSS pixel, once `ready` shows; skips the test when Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]}, device_scale_factor=scale)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector(ready)
            yield page
        finally:
            browser.close()


class FaultyRegistry(ModelRegistry):
    """The app's registry plus three models that fail in known ways (each its own tiny copy, so the
    stock tiny model beside them is untouched)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.choices[OUT_OF_MEMORY] = TINY + "llava_next"
        self.choices[ENDLESS] = TINY + "llava_next"
        self.choices[DAMAGED] = str(damaged_checkpoint(folder))
        self.endless_started = threading.Event()  # the endless model streamed its first token
        self.endless_stopped = threading.Event()  # ...and was then told to stop
        self.endless_answers: list[threading.Event] = []  # one per answer it began, set at its first token

    def _load(self, label: str, source: str) -> LoadedModel:
        loaded = super()._load(label, source)
        real_generate = loaded.model.generate
        if label == OUT_OF_MEMORY:

            def generate(**kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            loaded.model.generate = generate
        elif label == ENDLESS:

            def generate(streamer=None, stopping_criteria=None, **kwargs):
                if streamer is None:  # the untimed warm-up pass
                    return real_generate(**kwargs)
                input_ids = kwargs["input_ids"]
                streamer.put(input_ids)  # the prompt, as generate() hands it over first
                token = torch.tensor(loaded.processor.tokenizer.encode(" la", add_special_tokens=False))
                answer = threading.Event()
                self.endless_answers.append(answer)
                while not stopping_criteria(input_ids, None).all():
                    streamer.put(token)
                    self.endless_started.set()
                    answer.set()
                    time.sleep(0.02)
                self.endless_stopped.set()
                streamer.end()

            loaded.model.generate = generate
        return loaded


def damaged_checkpoint(folder: Path) -> Path:
    """The tiny LLaVA-NeXT checkpoint with its weights file cut short: its config reads fine."""
    target = folder / "damaged-llava-next"
    if not target.exists():
        shutil.copytree(tiny_checkpoint("llava_next"), target)
        for weights in target.glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:4096])
    return target


def expected_visual_tokens(processor, width: int, height: int) -> tuple[int, int]:
    """(without VisionZip, with VisionZip 320) visual tokens for a width x height image on LLaVA-NeXT,
    from the processor and the budget arithmetic (never from the app): tiles x (D + C)."""
    stock = processor(images=Image.new("RGB", (width, height)), text="<image>", return_tensors="pt")
    full = int((stock["input_ids"] == processor.image_token_id).sum())
    tiles = image_size_to_num_patches([height, width], processor.image_processor.image_grid_pinpoints, 336)
    return full, tiles * preset_budget("llava_next", 320).per_tile


def run_in_vllm_venv(script: str, job: dict, what: str, timeout: int, **env: str) -> dict:
    """Run tests/`script` in the vLLM venv with `job` as JSON on its stdin; its last "RESULT {json}" line.
    A failed run fails the test with the end of its log."""
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / script)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **env),
        cwd=ROOT,
        timeout=timeout,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.stderr.write(run.stderr[-6000:])
        pytest.fail(f"{what} failed (exit {run.returncode}); its log's end is above")
    return json.loads(lines[-1][len("RESULT ") :])
