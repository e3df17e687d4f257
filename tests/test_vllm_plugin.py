"""The vLLM plugin: vLLM + visionzip_vllm generates what transformers + visionzip generates (greedy, the
tiny LLaVA-NeXT and LLaVA-1.5, the same image, method and budget), whether a server or a request chose the
method, and vLLM's processor reserves exactly the features the plugin's image path produces. Bad request
options are refused with their reason, as a 400 by the OpenAI-compatible server. vLLM runs under .venv-vllm
(`bash scripts/setup.sh --vllm`), in one subprocess per model (tests/vllm_generate.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from app_helpers import VLLM_PYTHON, run_in_vllm_venv

import visionzip
from bench.phases import parse_budget
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parent.parent
NEEDS_VLLM = f"needs the vLLM venv {VLLM_PYTHON.relative_to(ROOT)} (bash scripts/setup.sh --vllm)"
PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nwhat is in the picture? ASSISTANT:"
)
IMAGES = [(480, 640, 0), (336, 336, 1), (300, 1000, 2)]  # (height, width, seed): a 2x2 grid, 1x2, 1x3
MAX_TOKENS = 8
# every text-agnostic method at its middle preset, and the stock model (None), chosen per request
TEXT_AGNOSTIC = ["visionzip", "visionzip_dominant", "random", "pool", "divprune", "vispruner"]
MIDDLE_PRESET = {"llava_next": 320, "llava": 128, "llava_onevision": 320}
POOL_PRESET = {"llava_next": 320, "llava": 64, "llava_onevision": 45}  # Pool's grids give other counts
BUDGETS = {
    family: [None] + [f"{name}:{POOL_PRESET[family] if name == 'pool' else preset}" for name in TEXT_AGNOSTIC]
    for family, preset in MIDDLE_PRESET.items()
}
STOCK_ARCHITECTURES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
# VisPruner's choice is ill-conditioned on the random tiny model: its CLS attention has exact ties, and it orders
# all unpicked patches by it for its duplicate rounds, so float32 rounding (a relative 1e-7 on the library's
# own signals changes 4 of 5 tiles) decides it. Its inputs are compared instead (test_tower_signals_match).
ILL_CONDITIONED = {"vispruner:320", "vispruner:128"}
PER_REQUEST_FULL = {"method": "full", "per_request": True}  # a server whose requests choose, up to full
# a request's options -> what its refusal says
BAD_REQUESTS = [
    ({"method": "fastv", "tokens": 64}, "attention weights"),
    ({"method": "tome", "tokens": 64}, "unknown method 'tome'"),
    ({"method": "divprune", "tokens": 0}, "out of range"),
    ({"method": "visionzip", "dominant": 54, "contextual": 10, "ratio": 2}, "unknown options \\['ratio'\\]"),
]


def request(budget: str | None, family: str = "llava_next") -> dict | None:
    return None if budget is None else parse_budget(budget, family).server_options()


def test_refused_options_say_why():
    from visionzip_vllm import hf_overrides, request_settings

    with pytest.raises(ValueError, match="attention weights"):
        hf_overrides("fastv", tokens=320)
    with pytest.raises(ValueError, match="question never reaches the vision side"):
        hf_overrides("cdpruner", tokens=64)
    with pytest.raises(ValueError, match="unknown options"):
        hf_overrides("divprune", token=320)
    with pytest.raises(ValueError, match="serves"):
        hf_overrides("divprune", stock_architecture="Qwen2VLForConditionalGeneration", tokens=320)
    with pytest.raises(ValueError, match="unknown options \\['per_request'\\]"):  # a server's choice only
        request_settings({"method": "divprune", "tokens": 64, "per_request": True})
    for options, message in BAD_REQUESTS[:2]:
        with pytest.raises(ValueError, match=message):
            request_settings(options)
    assert not request_settings({"method": "full"}).enabled


def test_request_settings_reach_the_model_unchanged():
    """The integer row a request's settings travel in to the model reads back as the same settings."""
    from visionzip_vllm.options import decode_settings, encode_settings, request_settings

    for options in ({"method": "full"}, {"method": "divprune", "tokens": 77, "seed": 3}):
        settings = request_settings(options)
        assert decode_settings(encode_settings(settings)) == settings
    settings = request_settings({"method": "visionzip", "dominant": 27, "contextual": 5, "merge": "mean"})
    assert decode_settings(encode_settings(settings)) == settings


def test_every_text_agnostic_method_is_covered():
    text_agnostic = {name for name, method in visionzip.METHODS.items() if not method.reads_text}
    for family, budgets in BUDGETS.items():
        assert {parse_budget(name, family).method for name in budgets if name} == text_agnostic, family


def run_vllm(
    family: str, servers: list[dict], signals: dict | None = None, processor_kwargs: dict | None = None
) -> list:
    """tests/vllm_generate.py's results for `servers` on the family's tiny checkpoint."""
    if not VLLM_PYTHON.exists():
        pytest.skip(NEEDS_VLLM)
    from visionzip.tiny import hub_layout_checkpoint

    job = dict(
        checkpoint=str(hub_layout_checkpoint(family)),
        stock_architecture=STOCK_ARCHITECTURES[family],
        prompt=PROMPT,
        images=IMAGES,
        servers=servers,
        max_tokens=MAX_TOKENS,
        signals=signals,
    )
    if processor_kwargs is not None:
        job["processor_kwargs"] = processor_kwargs
    return run_in_vllm_venv("vllm_generate.py", job, "vLLM run", 1200)["results"]


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
def next_results(tiny_cache, signal_tiles) -> dict:
    """LLaVA-NeXT: a full per-request server (every budget and the bad options as requests), and a VisionZip
    320 server for every request (a request without options, one with)."""
    per_request = [request(budget) for budget in BUDGETS["llava_next"]] + [options for options, _ in BAD_REQUESTS]
    fixed = [None, request("visionzip:160")]
    servers = [
        {"options": PER_REQUEST_FULL, "requests": per_request},
        {"options": request("visionzip:320"), "requests": fixed},
    ]
    signals = dict(tiles=str(signal_tiles), out=str(signal_tiles.with_name("signals.pt")))
    full, visionzip_320 = run_vllm("llava_next", servers, signals)
    count = len(BUDGETS["llava_next"])
    return dict(
        budgets=dict(zip(BUDGETS["llava_next"], full[:count])),
        bad=full[count:],
        server_320=dict(zip(["visionzip:320", "visionzip:160"], visionzip_320)),
    )


@pytest.fixture(scope="module")
def llava_results(tiny_cache) -> dict:
    budgets = BUDGETS["llava"]
    (full,) = run_vllm("llava", [{"options": PER_REQUEST_FULL, "requests": [request(b, "llava") for b in budgets]}])
    return dict(zip(budgets, full))


@pytest.fixture(scope="module")
def onevision_results(tiny_cache) -> dict:
    budgets = BUDGETS["llava_onevision"]
    servers = [{"options": PER_REQUEST_FULL, "requests": [request(b, "llava_onevision") for b in budgets]}]
    (full,) = run_vllm("llava_onevision", servers, processor_kwargs={})
    return dict(zip(budgets, full))


@pytest.fixture(scope="module")
def tiny_onevision():
    from visionzip.tiny import load_tiny

    return load_tiny("llava_onevision")


def hf_generate(model, processor, handle, image, budget: str | None, family: str) -> tuple[list[int], int]:
    """Greedy tokens of transformers + the library, and the image's token count."""
    use = dict(enabled=False) if budget is None else parse_budget(budget, family).use()
    with handle.use(**use):
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        count = handle.num_image_tokens(image.size[::-1])
    return output[0, inputs["input_ids"].shape[1] :].tolist(), count


def assert_served_as_transformers(served: dict, tiny, family: str) -> None:
    """Each budget's generations (a list per image) equal transformers + the library's, and the placeholders
    vLLM reserved equal both the library's count and the features the plugin produced."""
    model, processor = tiny
    handle = visionzip.apply(model, processor)
    try:
        for budget, images in served.items():
            for (height, width, seed), result in zip(IMAGES, images):
                tokens, count = hf_generate(model, processor, handle, random_image(height, width, seed), budget, family)
                where = f"{family} {budget or 'stock'} on {height}x{width}"
                if budget not in ILL_CONDITIONED:
                    assert result["tokens"] == tokens, where
                assert result["placeholders"] == count, where
                assert result["features"] == count, where
    finally:
        handle.remove()


@pytest.mark.slow
def test_llava_next_requests_choose_and_match_transformers(next_results, tiny_next):
    assert_served_as_transformers(next_results["budgets"], tiny_next, "llava_next")


@pytest.mark.slow
def test_llava_next_server_setting(next_results, tiny_next):
    """A server's own setting serves every request; one started without per_request refuses a request's own."""
    server = next_results["server_320"]
    assert_served_as_transformers({"visionzip:320": server["visionzip:320"]}, tiny_next, "llava_next")
    for result in server["visionzip:160"]:
        assert 'without "per_request": true' in result["error"], result


@pytest.mark.slow
def test_bad_request_options_are_refused_with_their_reason(next_results):
    for (options, message), images in zip(BAD_REQUESTS, next_results["bad"]):
        for result in images:
            assert "error" in result, options
            assert re.search(message, result["error"]), (options, result["error"])


@pytest.mark.slow
def test_llava_requests_choose_and_match_transformers(llava_results, tiny_llava):
    assert_served_as_transformers(llava_results, tiny_llava, "llava")


@pytest.mark.slow
def test_tower_signals_match(next_results, tiny_next, signal_tiles):
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


def chat(url: str, image, mm_kwargs: dict | None = None):
    """One chat completion of the OpenAI-compatible server: the image (a data: URL) and a question."""
    import base64
    import io

    import httpx

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "what is it?"}]
    body = {"model": "served", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


@pytest.mark.slow
def test_api_server_serves_request_budgets_and_answers_bad_ones_with_400(tiny_cache, tmp_path):
    """LLaVA-1.5 at DivPrune 64 with per_request: a request's lower budget is served (its prompt shorter by the
    difference), and one above the server's count, or naming an unknown method, gets a 400 that says why."""
    if not VLLM_PYTHON.exists():
        pytest.skip(NEEDS_VLLM)
    from bench.serve import served
    from visionzip.tiny import hub_layout_checkpoint
    from visionzip_vllm import OPTIONS_KEY, hf_overrides

    args = argparse.Namespace(
        vllm_python=VLLM_PYTHON, dtype="float32", clients=2, preset="tiny", kv_space_gib=1, start_timeout=600
    )
    overrides = hf_overrides("divprune", "LlavaForConditionalGeneration", per_request=True, tokens=64)
    image = random_image(480, 640, 0)
    with served(args, hub_layout_checkpoint("llava"), overrides, tmp_path / "server.log") as url:
        plain = chat(url, image)
        lower = chat(url, image, {OPTIONS_KEY: {"method": "random", "tokens": 40}})
        above = chat(url, image, {OPTIONS_KEY: {"method": "random", "tokens": 128}})
        unknown = chat(url, image, {OPTIONS_KEY: {"method": "tome", "tokens": 32}})
    assert plain.status_code == 200 and lower.status_code == 200, (plain.text, lower.text)
    assert plain.json()["usage"]["prompt_tokens"] - lower.json()["usage"]["prompt_tokens"] == 64 - 40
    assert above.status_code == 400
    assert "128 tokens, more than the 64 of the server's DivPrune 64/image" in above.json()["error"]["message"]
    assert unknown.status_code == 400 and "unknown method 'tome'" in unknown.json()["error"]["message"]


@pytest.mark.slow
def test_llava_onevision_requests_choose_and_match_transformers(onevision_results, tiny_onevision):
    assert_served_as_transformers(onevision_results, tiny_onevision, "llava_onevision")
