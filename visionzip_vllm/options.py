"""The reduction options: what `--hf-overrides` carries under the "visionzip" key for the server, and what a
request's `mm_processor_kwargs` carries under the same key, read into the library's `Settings`.  No vLLM
import here, so clients (the benchmark, the tests) can build the overrides and the request options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from visionzip.budget import Budget
from visionzip.merge import MERGE_MODES
from visionzip.methods import METHODS
from visionzip.settings import Settings

OPTIONS_KEY = "visionzip"
# our architecture name -> "module:class" of the reducing model class that serves it
ARCHITECTURES = {
    "VisionZipLlavaNextForConditionalGeneration": "visionzip_vllm.llava_next:VisionZipLlavaNextForConditionalGeneration",
    "VisionZipLlavaForConditionalGeneration": "visionzip_vllm.llava:VisionZipLlavaForConditionalGeneration",
    "VisionZipLlavaOnevisionForConditionalGeneration": (
        "visionzip_vllm.llava_onevision:VisionZipLlavaOnevisionForConditionalGeneration"
    ),
}
STOCK_ARCHITECTURES = {
    "LlavaNextForConditionalGeneration": "VisionZipLlavaNextForConditionalGeneration",
    "LlavaForConditionalGeneration": "VisionZipLlavaForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "VisionZipLlavaOnevisionForConditionalGeneration",
}
FULL = "full"  # a "method" that reduces nothing: the stock image path and count
REDUCTION_OPTIONS = ("method", "tokens", "dominant", "contextual", "merge", "seed")
KNOWN_OPTIONS = (*REDUCTION_OPTIONS, "per_request")
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
# The model receives each image's settings as one row of integers (a tensor field of vLLM's multimodal
# inputs, batched by image): the only per-request data that reaches a vLLM model's image path.
SETTINGS_FIELD = "visionzip_settings"
_METHOD_NAMES = sorted(METHODS)
_NO_TOKENS = -1


def hf_overrides(
    method: str,
    stock_architecture: str = "LlavaNextForConditionalGeneration",
    per_request: bool = False,
    **options: Any,
) -> dict:
    """The `--hf-overrides` (or `LLM(hf_overrides=...)`) value that serves `method` ("full": stock) with `options`
    (tokens, or dominant and contextual for VisionZip; merge; seed) on a checkpoint of `stock_architecture`;
    `per_request`: requests may choose their own method and budget, up to the server's count per image."""
    architecture = STOCK_ARCHITECTURES.get(stock_architecture)
    if architecture is None:
        raise ValueError(f"the plugin serves {sorted(STOCK_ARCHITECTURES)}, not {stock_architecture!r}")
    options_value = {"method": method, **options, **({"per_request": True} if per_request else {})}
    server_settings({OPTIONS_KEY: options_value})  # refuse what the server would refuse, before starting it
    return {"architectures": [architecture], OPTIONS_KEY: options_value}


def _server_options(config: Any) -> Mapping | None:
    options = config.get(OPTIONS_KEY) if isinstance(config, Mapping) else getattr(config, OPTIONS_KEY, None)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f'"{OPTIONS_KEY}" must be a mapping of {KNOWN_OPTIONS}, got {options!r}')
    return options


def server_settings(config: Any) -> Settings | None:
    """The library's `Settings` from a model config's "visionzip" options (an HF config, or a mapping of it),
    or None when it has none (the model then runs stock).  Unknown options and refused methods raise."""
    options = _server_options(config)
    if options is None:
        return None
    if not isinstance(options.get("per_request", False), bool):
        raise ValueError(f'"per_request" must be true or false, got {options["per_request"]!r}')
    return settings_from(options, KNOWN_OPTIONS, f'the server\'s "{OPTIONS_KEY}" options')


def allows_requests(config: Any) -> bool:
    """Whether the server lets a request choose its method and budget ("per_request": true)."""
    options = _server_options(config)
    return bool(options and options.get("per_request", False))


def request_settings(options: Any) -> Settings:
    """A request's `mm_processor_kwargs["visionzip"]` as `Settings`; a ValueError says what is wrong."""
    if not isinstance(options, Mapping):
        raise ValueError(f'mm_processor_kwargs["{OPTIONS_KEY}"] must be an object of {list(REDUCTION_OPTIONS)}')
    return settings_from(options, REDUCTION_OPTIONS, f'the request\'s mm_processor_kwargs["{OPTIONS_KEY}"]')


def settings_from(options: Mapping, known: Sequence[str], where: str) -> Settings:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown options {unknown} in {where}; known: {list(known)}")
    method = options.get("method", "visionzip")
    if method in REFUSED:
        raise ValueError(REFUSED[method])
    if method != FULL and method not in METHODS:
        served = [FULL] + [name for name in _METHOD_NAMES if name not in REFUSED]
        raise ValueError(f"unknown method {method!r} in {where}; served: {served}")
    return Settings(
        enabled=method != FULL,
        budget=Budget(options.get("dominant", 54), options.get("contextual", 10)),
        merge=options.get("merge", "sum"),
        method="visionzip" if method == FULL else method,
        tokens=options.get("tokens"),
        seed=options.get("seed", 0),
    )


def encode_settings(settings: Settings) -> list[int]:
    """One image's checked settings as the integer row the model receives (`decode_settings` reads it)."""
    tokens = _NO_TOKENS if settings.tokens is None else settings.tokens
    budget, method = settings.budget, _METHOD_NAMES.index(settings.method)
    return [
        int(settings.enabled),
        method,
        budget.dominant,
        budget.contextual,
        tokens,
        MERGE_MODES.index(settings.merge),
        settings.seed,
    ]


def decode_settings(row: Sequence[int]) -> Settings:
    enabled, method, dominant, contextual, tokens, merge, seed = (int(value) for value in row)
    return Settings(
        enabled=bool(enabled),
        budget=Budget(dominant, contextual),
        merge=MERGE_MODES[merge],
        method=_METHOD_NAMES[method],
        tokens=None if tokens == _NO_TOKENS else tokens,
        seed=seed,
    )
