"""Qwen2.5-VL: the vision tower (with the method's own work) and the LLM prefill, full against reduced.

    python -m bench.qwen_phases --preset tiny                               # the tiny offline model: a quick check
    python -m bench.qwen_phases --out benchmarks                           # real-width tower, 2 LM layers, CPU
    python -m bench.qwen_phases --llm-layers 28 --dtype bfloat16 --device cuda --out benchmarks
    python -m bench.qwen_phases --frames 4 --out benchmarks                # a clip: Qwen's own video path

A random Qwen2.5-VL of Qwen2.5-VL-7B's width and tower depth (tower: 1280 wide, 16 heads, 3420 MLP,
112-px windows, full attention in blocks 7/15/23/31 of 32; LM: 3584 wide, 28 heads, 4 KV heads, 18944
MLP, `--llm-layers` layers; the tiny checkpoint's vocabulary), bench.phases' 672x672 image (24x24 merged
cells, 576 tokens) and one question.  Every round runs every mode (order rotated each round), the first
`--warmup` rounds are dropped and each figure is the median of the rest; ratios compare runs made side
by side.  vision = tower + the method (get_image_features); prefill = the LLM forward on those
features; TTFT = both.  `--frames F`: a clip of F frames (the image shifted a little per frame) through
the model's video path instead (get_video_features): frames paired in time, every budget per frame pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import visionzip
from bench.phases import DTYPES, IMAGE_SIZE, bench_image, markdown_table
from visionzip.tiny import load_tiny

QUESTION = "What is shown in this image? Describe it in detail."
MODES = {  # name -> the use() arguments (None: the stock model)
    "full": None,
    "VisionZip 256": dict(method="visionzip", dominant=216, contextual=40),
    "VisionZip 128": dict(method="visionzip", dominant=108, contextual=20),
    "VisionZip 64": dict(method="visionzip", dominant=54, contextual=10),
    "DivPrune 128": dict(method="divprune", tokens=128),
    "Pool 64": dict(method="pool", tokens=64),
}


def build(llm_layers: int, dtype: torch.dtype, device: torch.device):
    """(model, processor): Qwen2.5-VL-7B's shapes with random weights, made from configs (no download)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny, processor = load_tiny("qwen2_5_vl")
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    )  # fmt: skip
    text = dict(
        vocab_size=tiny.config.text_config.vocab_size, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=llm_layers, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    ids = {name: getattr(tiny.config, name) for name in ("image_token_id", "video_token_id")}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return model.eval(), processor


def clip_frames(image, frames: int) -> list:
    """`frames` frames of the picture, each shifted 8 px further right (the content moves; the size is fixed)."""
    pixels = np.asarray(image)
    return [Image.fromarray(np.roll(pixels, 8 * k, axis=1)) for k in range(frames)]


def run_once(model, processor, handle, image, arguments: dict | None, sync, frames: int = 0) -> dict:
    kind = "video" if frames else "image"
    pixels_key, grid_key = ("pixel_values_videos", "video_grid_thw") if frames else ("pixel_values", "image_grid_thw")
    with handle.use(enabled=arguments is not None, **(arguments or {})):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        media = {"videos": [clip_frames(image, frames)]} if frames else {"images": [image]}
        inputs = processor(**media, text=prompt, return_tensors="pt").to(model.device)
        inputs[pixels_key] = inputs[pixels_key].to(model.dtype)
        encode = getattr(model.model, f"get_{kind}_features")
        with torch.inference_mode():
            start = time.perf_counter()
            features = encode(inputs[pixels_key], inputs[grid_key])
            sync()
            encoded = time.perf_counter()
            text = {key: value for key, value in inputs.items() if key != pixels_key}
            model(**text, mm_encoder_outputs={kind: features}, logits_to_keep=1)
            sync()
            done = time.perf_counter()
    visual = int((inputs["input_ids"] == getattr(model.config, f"{kind}_token_id")).sum())
    return {"visual_tokens": visual, "vision_ms": (encoded - start) * 1e3, "prefill_ms": (done - encoded) * 1e3}


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.preset == "tiny":
        model, processor = load_tiny("qwen2_5_vl", dtype=dtype)
        model = model.to(device)
    else:
        model, processor = build(args.llm_layers, dtype, device)
    handle = visionzip.apply(model, processor, enabled=False)
    image = bench_image()  # bench.phases' 672x672 noise picture: 24x24 merged cells
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(MODES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            result = run_once(model, processor, handle, image, MODES[name], sync, args.frames)
            if round_index >= args.warmup:
                runs[name].append(result)
    rows = []
    for name in names:
        row = {"mode": name, **{key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}}
        row["ttft_ms"] = row["vision_ms"] + row["prefill_ms"]
        rows.append(row)
    full = rows[0]
    for row in rows:
        row["token_ratio"] = full["visual_tokens"] / row["visual_tokens"]
        row["prefill_speedup"] = full["prefill_ms"] / row["prefill_ms"]
        row["ttft_speedup"] = full["ttft_ms"] / row["ttft_ms"]
        row["method_ms"] = row["vision_ms"] - full["vision_ms"]  # the method's own work beside the stock tower
    return rows


COLUMNS = [
    ("mode", "mode", "{}"),
    ("visual tokens", "visual_tokens", "{:,}"),
    ("vision ms", "vision_ms", "{:.0f}"),
    ("method's own ms", "method_ms", "{:+.0f}"),
    ("LLM prefill ms", "prefill_ms", "{:.0f}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"),
    ("tokens full/this", "token_ratio", "{:.1f}x"),
    ("prefill speed-up", "prefill_speedup", "{:.2f}x"),
    ("TTFT speed-up", "ttft_speedup", "{:.2f}x"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["wide", "tiny"], default="wide")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--frames", type=int, default=0, help="a clip of this many frames instead of the image")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = run(args)
    print(markdown_table(rows, COLUMNS))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        clip = f"_{args.frames}frames" if args.frames else ""
        name = (
            f"qwen_phases_{args.preset}_{args.device}_{args.dtype}_{args.llm_layers}layers_{IMAGE_SIZE[0]}px{clip}.json"
        )
        (args.out / name).write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
