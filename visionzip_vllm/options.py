"""The server's reduction options: what `--hf-overrides` carries under the "visionzip" key, read into the
library's `Settings`.  No vLLM import here, so clients (the benchmark, the tests) can build the overrides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from visionzip.budget import Budget
from visionzip.settings import Settings

OPTIONS_KEY = "visionzip"
# our architecture name -> "module:class" of the reducing model class that serves it
ARCHITECTURES = {
    "VisionZipLlavaNextForConditionalGeneration": "visionzip_vllm.llava_next:VisionZipLlavaNextForConditionalGeneration",
}
STOCK_ARCHITECTURES = {"LlavaNextForConditionalGeneration": "VisionZipLlavaNextForConditionalGeneration"}
KNOWN_OPTIONS = ("method", "tokens", "dominant", "contextual", "merge", "seed")
# Methods that cannot run in vLLM's model, and why.
REFUSED = {
    "fastv": (
        "FastV drops image tokens inside the language model after layer K-1, from that layer's attention; vLLM's "
        "paged attention exposes no attention weights and keeps every prompt token's KV blocks, so it is refused"
    ),
    "cdpruner": (
        "CDPruner chooses an image's tokens by the question, but vLLM encodes an image apart from the prompt "
        "(and caches the encoding by image), so the question never reaches the vision side; it is refused"
    ),
}


def hf_overrides(method: str, stock_architecture: str = "LlavaNextForConditionalGeneration", **options: Any) -> dict:
    """The `--hf-overrides` (or `LLM(hf_overrides=...)`) value that serves `method` with `options` (tokens, or
    dominant and contextual for VisionZip; merge; seed) on a checkpoint of `stock_architecture`."""
    architecture = STOCK_ARCHITECTURES.get(stock_architecture)
    if architecture is None:
        raise ValueError(f"the plugin serves {sorted(STOCK_ARCHITECTURES)}, not {stock_architecture!r}")
    options_value = {"method": method, **options}
    server_settings({OPTIONS_KEY: options_value})  # refuse what the server would refuse, before starting it
    return {"architectures": [architecture], OPTIONS_KEY: options_value}


def server_settings(config: Any) -> Settings | None:
    """The library's `Settings` from a model config's "visionzip" options (an HF config, or a mapping of it),
    or None when it has none (the model then runs stock).  Unknown options and refused methods raise."""
    options = config.get(OPTIONS_KEY) if isinstance(config, Mapping) else getattr(config, OPTIONS_KEY, None)
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError(f'"{OPTIONS_KEY}" must be a mapping of {KNOWN_OPTIONS}, got {options!r}')
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(f'unknown "{OPTIONS_KEY}" options {unknown}; known: {list(KNOWN_OPTIONS)}')
    method = options.get("method", "visionzip")
    if method in REFUSED:
        raise ValueError(REFUSED[method])
    return Settings(
        enabled=True,
        budget=Budget(options.get("dominant", 54), options.get("contextual", 10)),
        merge=options.get("merge", "sum"),
        method=method,
        tokens=options.get("tokens"),
        seed=options.get("seed", 0),
    )
