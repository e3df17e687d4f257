"""Greedy generations of vLLM with this project's plugin, one engine per server setting, as JSON.

Run under .venv-vllm (by tests/test_vllm_plugin.py): reads a job from stdin
{"checkpoint", "stock_architecture", "prompt", "images": [[height, width, seed], ...],
"servers": [{"options": server options or null, "requests": [request options or null, ...]}], "max_tokens",
"signals": {"tiles", "out"} (optional: the first plugin server's tower signals on the tiles in file "tiles")}
and prints {"results": [[[{"tokens", "placeholders", "features"} or {"error"} per image] per request]
per server]}, where a request's options go in its `mm_processor_kwargs["visionzip"]` (null: none),
`placeholders` counts the image tokens vLLM's processor put in the prompt, `features` the rows the plugin's
image path produced (null for a stock server), and `error` is the message of a request vLLM refused."""

from __future__ import annotations

import gc
import json
import os
import sys
from functools import partial

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the worker
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one start less per server


def run_server(job: dict, server: dict) -> list[list[dict]]:
    from vllm import LLM, SamplingParams

    from visionzip_vllm import hf_overrides
    from visionzip_vllm.handle import tower_signals

    options = server["options"]
    overrides = None if options is None else hf_overrides(stock_architecture=job["stock_architecture"], **options)
    llm = LLM(
        model=job["checkpoint"],
        hf_overrides=overrides,
        max_model_len=4096,
        max_num_seqs=2,
        enforce_eager=True,
        dtype="float32",
        limit_mm_per_prompt={"image": 1},
        seed=0,
        distributed_executor_backend="uni",  # the worker in this process too
        # transformers' PIL image processor, as the test's transformers (without torchvision) uses: its
        # torchvision one resizes slightly differently, and DivPrune's choice follows such pixel changes
        mm_processor_kwargs=job.get("processor_kwargs", {"backend": "pil"}),
    )
    sampling = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
    results = [
        [generate(llm, job, image, request, sampling) for image in job["images"]] for request in server["requests"]
    ]
    if options is not None and job.get("signals"):  # the tower's signals on given tiles, saved for comparison
        import torch

        (signals,) = llm.apply_model(partial(tower_signals, tiles=torch.load(job["signals"]["tiles"])))
        torch.save(signals, job["signals"]["out"])
        job["signals"] = None  # once
    del llm
    gc.collect()
    return results


def generate(llm, job: dict, image: list[int], request: dict | None, sampling) -> dict:
    """One greedy generation of the job's prompt on a random-pixel image, under the request's options."""
    import numpy as np
    from PIL import Image

    from visionzip_vllm import OPTIONS_KEY
    from visionzip_vllm.handle import last_image_tokens

    height, width, seed = image
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    prompt = {"prompt": job["prompt"], "multi_modal_data": {"image": Image.fromarray(pixels)}}
    if request is not None:
        prompt["mm_processor_kwargs"] = {OPTIONS_KEY: request}
    try:
        output = llm.generate(prompt, sampling, use_tqdm=False)[0]
    except ValueError as error:  # what the API server answers with 400
        return {"error": str(error)}
    (features,) = llm.apply_model(last_image_tokens)
    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    return {
        "tokens": list(output.outputs[0].token_ids),
        "placeholders": output.prompt_token_ids.count(image_token),
        "features": None if features is None else features[0],
    }


def main() -> None:
    job = json.load(sys.stdin)
    results = [run_server(job, server) for server in job["servers"]]
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
