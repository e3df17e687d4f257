"""`GET /visionzip` on vLLM's OpenAI-compatible server: the reduction the server runs, read back from its own
model config, so a client (the app's vLLM side) shows what the server does rather than what it was told.

vLLM adds it through its `--middleware` option (an import path; no entry point to allowlist)::

    python -m vllm.entrypoints.openai.api_server --model CHECKPOINT --hf-overrides '...' \
        --middleware visionzip_vllm.report.settings_endpoint

No vLLM import here: the function only reads the app state vLLM's server keeps (`state.vllm_config`).
"""

from __future__ import annotations

from typing import Any

from .options import ARCHITECTURES, OPTIONS_KEY, server_settings

PATH = "/visionzip"
MIDDLEWARE = "visionzip_vllm.report.settings_endpoint"  # the value of vLLM's --middleware


def settings_report(model_config: Any) -> dict:
    """What the endpoint answers for one vLLM `ModelConfig`: served names, architecture, the "visionzip" options
    (None: the server runs the model stock) and the image placeholder's token id (clients count it)."""
    config = model_config.hf_config
    options = getattr(config, OPTIONS_KEY, None)
    server_settings(config)  # the options the plugin runs, checked as the plugin checks them
    architecture = (getattr(config, "architectures", None) or [None])[0]
    names = model_config.served_model_name
    return {
        "plugin": "visionzip_vllm",
        "served_model_names": [names] if isinstance(names, str) else list(names),
        "architecture": architecture,
        "reducing_architecture": architecture in ARCHITECTURES,
        "options": dict(options) if options is not None else None,
        "image_token_id": getattr(config, "image_token_index", None) or getattr(config, "image_token_id", None),
    }


async def settings_endpoint(request, call_next):
    """vLLM `--middleware`: answers GET /visionzip, passes every other request on."""
    if request.url.path != PATH or request.method != "GET":
        return await call_next(request)
    from starlette.responses import JSONResponse  # vLLM's server runs on starlette (FastAPI)

    return JSONResponse(settings_report(request.app.state.vllm_config.model_config))
