"""VisionZip's reduction methods as an out-of-tree vLLM plugin.

Installed with the project (`bash scripts/setup.sh --vllm`), vLLM loads `register` from the
`vllm.general_plugins` entry point in every process.  It registers model classes under their own
architecture names, so stock models stay stock; a server picks one and its method with
`--hf-overrides`, for example::

    vllm serve CHECKPOINT --hf-overrides '{"architectures": ["VisionZipLlavaNextForConditionalGeneration"],
                                           "visionzip": {"method": "visionzip", "dominant": 54, "contextual": 10}}'

and, when started with "per_request": true (and vLLM's --trust-request-mm-kwargs), a request may choose its own
method and budget, up to the server's count for its image, with `mm_processor_kwargs={"visionzip": {...}}`.

This package imports vLLM; the `visionzip` library does not, and stays usable without it.
"""

from __future__ import annotations

from .options import ARCHITECTURES, OPTIONS_KEY, hf_overrides, request_settings

__all__ = ["ARCHITECTURES", "OPTIONS_KEY", "hf_overrides", "register", "request_settings"]


def register() -> None:
    """The `vllm.general_plugins` entry point: make the reducing model classes known to vLLM (lazily, by
    module path, so that loading the plugin imports no model code)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
