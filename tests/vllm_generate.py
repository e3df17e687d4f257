"""Greedy generations of vLLM with this project's plugin, one engine per server setting, as JSON.

Run under .venv-vllm (by tests/test_vllm_plugin.py and bench): reads a job from stdin
{"checkpoint", "prompt", "images": [[height, width, seed], ...], "servers": [options or null], "max_tokens",
"signals": {"tiles", "out"} (optional: the first plugin server's tower signals on the tiles in file "tiles")}
and prints {"results": [[{"tokens", "placeholders", "features"} per image] per server]}, where
`placeholders` counts the image tokens vLLM's processor put in the prompt and `features` the rows the
plugin's image path produced (null for a stock server)."""

from __future__ import annotations

import gc
import json
import os
import sys
from functools import partial

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the worker
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one start less per server


def run_server(job: dict, options: dict | None) -> list[dict]:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from visionzip_vllm import hf_overrides
    from visionzip_vllm.handle import last_image_tokens, tower_signals

    overrides = None if options is None else hf_overrides(**options)
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
        mm_processor_kwargs={"backend": "pil"},
    )
    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    sampling = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
    results = []
    for height, width, seed in job["images"]:
        pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
        request = {"prompt": job["prompt"], "multi_modal_data": {"image": Image.fromarray(pixels)}}
        output = llm.generate(request, sampling, use_tqdm=False)[0]
        (features,) = llm.apply_model(last_image_tokens)
        results.append(
            {
                "tokens": list(output.outputs[0].token_ids),
                "placeholders": output.prompt_token_ids.count(image_token),
                "features": None if features is None else features[0],
            }
        )
    if options is not None and job.get("signals"):  # the tower's signals on given tiles, saved for comparison
        import torch

        (signals,) = llm.apply_model(partial(tower_signals, tiles=torch.load(job["signals"]["tiles"])))
        torch.save(signals, job["signals"]["out"])
        job["signals"] = None  # once
    del llm
    gc.collect()
    return results


def main() -> None:
    job = json.load(sys.stdin)
    results = [run_server(job, options) for options in job["servers"]]
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
