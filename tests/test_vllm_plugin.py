"""The vLLM plugin: vLLM + visionzip_vllm generates what transformers + visionzip generates (greedy, the
tiny LLaVA-NeXT, the same image, method and budget), and vLLM's processor reserves exactly the features
the plugin's image path produces.  vLLM runs under .venv-vllm (`bash scripts/setup.sh --vllm`), in one
subprocess for every server setting (tests/vllm_generate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visionzip
from bench.phases import parse_budget
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nwhat is in the picture? ASSISTANT:"
)
IMAGES = [(480, 640, 0), (336, 336, 1), (300, 1000, 2)]  # (height, width, seed): a 2x2 grid, 1x2, 1x3
MAX_TOKENS = 8
# every text-agnostic method at its middle preset (LLaVA-NeXT's 320), and the stock model (None)
BUDGETS = [None, "visionzip:320", "visionzip_dominant:320", "random:320", "pool:320", "divprune:320", "vispruner:320"]
# VisPruner's choice is ill-conditioned on the random tiny model: its CLS attention has exact ties, and it orders
# all 544 unpicked patches by it for its duplicate rounds, so float32 rounding (a relative 1e-7 on the library's
# own signals changes 4 of 5 tiles) decides it. Its inputs are compared instead (test_tower_signals_match).
ILL_CONDITIONED = {"vispruner:320"}


def test_refused_methods_say_why():
    from visionzip_vllm import hf_overrides

    with pytest.raises(ValueError, match="attention weights"):
        hf_overrides("fastv", tokens=320)
    with pytest.raises(ValueError, match="question never reaches the vision side"):
        hf_overrides("cdpruner", tokens=64)
    with pytest.raises(ValueError, match='unknown "visionzip" options'):
        hf_overrides("divprune", token=320)
    with pytest.raises(ValueError, match="serves"):
        hf_overrides("divprune", stock_architecture="Qwen2VLForConditionalGeneration", tokens=320)


def test_every_text_agnostic_method_is_covered():
    covered = {parse_budget(name).method for name in BUDGETS if name}
    text_agnostic = {name for name, method in visionzip.METHODS.items() if not method.reads_text}
    assert covered == text_agnostic


@pytest.fixture(scope="module")
def signal_tiles(tiny_next, tmp_path_factory) -> Path:
    """The first image's tiles as transformers' processor makes them, in a file for the vLLM run."""
    _, processor = tiny_next
    height, width, seed = IMAGES[0]
    path = tmp_path_factory.mktemp("vllm") / "tiles.pt"
    torch.save(
        processor(images=random_image(height, width, seed), text="<image>", return_tensors="pt")["pixel_values"][0],
        path,
    )
    return path


@pytest.fixture(scope="module")
def vllm_results(tiny_cache, signal_tiles):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"needs the vLLM venv {VLLM_PYTHON.relative_to(ROOT)} (bash scripts/setup.sh --vllm)")
    from visionzip.tiny import hub_layout_checkpoint

    servers = [None if name is None else parse_budget(name).server_options() for name in BUDGETS]
    job = dict(
        checkpoint=str(hub_layout_checkpoint("llava_next")),
        prompt=PROMPT,
        images=IMAGES,
        servers=servers,
        max_tokens=MAX_TOKENS,
        signals=dict(tiles=str(signal_tiles), out=str(signal_tiles.with_name("signals.pt"))),
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_generate.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1200,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.stderr.write(run.stderr[-6000:])
        pytest.fail(f"vLLM run failed (exit {run.returncode}); its log's end is above")
    return dict(zip(BUDGETS, json.loads(lines[-1][len("RESULT ") :])["results"]))


def hf_generate(model, processor, handle, image, budget: str | None) -> tuple[list[int], int]:
    """Greedy tokens of transformers + the library, and the image's token count."""
    use = dict(enabled=False) if budget is None else parse_budget(budget).use()
    with handle.use(**use):
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        count = handle.num_image_tokens(image.size[::-1])
    return output[0, inputs["input_ids"].shape[1] :].tolist(), count


@pytest.mark.slow
def test_vllm_plugin_generates_what_transformers_generates(vllm_results, tiny_next):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)
    try:
        for budget in BUDGETS:
            for (height, width, seed), served in zip(IMAGES, vllm_results[budget]):
                tokens, count = hf_generate(model, processor, handle, random_image(height, width, seed), budget)
                where = f"{budget or 'stock'} on {height}x{width}"
                if budget not in ILL_CONDITIONED:
                    assert served["tokens"] == tokens, where
                assert served["placeholders"] == count, where
                if budget is not None:  # the features the plugin produced fill the reserved placeholders
                    assert served["features"] == count, where
    finally:
        handle.remove()


@pytest.mark.slow
def test_tower_signals_match(vllm_results, tiny_next, signal_tiles):
    """What every attention-based method reads, taken from vLLM's fused qkv, equals the library's reading of
    transformers' tower, to float32 rounding."""
    model, processor = tiny_next
    served = torch.load(signal_tiles.with_name("signals.pt"))
    handle = visionzip.apply(model, processor)
    try:
        with torch.inference_mode(), handle.capture(attention=True) as signals:
            model.model.vision_tower(torch.load(signal_tiles))
    finally:
        handle.remove()
    for name in ("cls_attn", "keys_mean", "hidden"):
        expected = getattr(signals, name)
        assert served[name].shape == expected.shape, name
        # float32 rounding of two towers' kernels: errors are a millionth of the signal's scale, not elementwise
        assert (served[name] - expected).abs().max() <= 1e-5 * expected.abs().max(), name
