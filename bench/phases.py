"""Speed and memory of VisionZip against the stock model, the authors' approach and the FLOP limit.

    python -m bench.phases --preset tiny --out benchmarks
    python -m bench.phases --preset wide --dtype bfloat16 --out benchmarks          # 2 LM layers
    python -m bench.phases --preset wide --llm-layers 32 --dtype bfloat16 --device cuda --out benchmarks
    python -m bench.phases --preset real --model llava-hf/llava-v1.6-vicuna-7b-hf --dtype bfloat16 --device cuda
    python -m bench.phases --family llava_onevision --preset wide --dtype bfloat16 --out benchmarks
    python -m bench.phases --family qwen2_5_vl --preset wide --dtype bfloat16 --out benchmarks
    python -m bench.phases --plot benchmarks/*.json --out benchmarks                # TTFT figure

One 672x672 image and one chat question: LLaVA-NeXT and LLaVA-OneVision see 5 tiles (2928 and 3699
stock visual tokens), Qwen2.5-VL one 48x48-patch image (576 merged tokens). Modes: `full` is the
untouched stock model; 640 / 320 / 160 (Qwen2.5-VL: 256 / 128 / 64) are VisionZip budgets applied with
`visionzip.apply` and `handle.use(...)`, "METHOD:NAME" another method at its preset. Every round runs
every mode (order rotated each round), so ratios compare runs made side by side; the first `--warmup`
rounds are dropped and each figure is the median of the rest. The phases of time to first token are
timed inside one real forward by hooks on the modules (CUDA events on a GPU; VisionZip adds no host
sync mid-forward), which makes them add up to the whole. On Qwen2.5-VL the projector is the tower's own
2x2 merger, and the methods choose after the tower together with the M-RoPE positions and the packing:
there `pack ms` and `VZ ms` hold that choice, and selection + merge has no time of its own. The authors'
approach (their eager CLIP tower reading the CLS row) runs on LLaVA-NeXT only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

import visionzip
from app.hosting import machine_description  # noqa: F401 (bench.multiturn and bench.conversation import it from here)
from visionzip.budget import PRESETS, Budget, preset_budget
from visionzip.cost import llm_linear_params as _llm_linear_params
from visionzip.cost import prefill_flops
from visionzip.merge import choose_tokens, merge_tokens
from visionzip.tower import encoder_layers, feature_layer_index
from visionzip.workarounds import dense_lm_head_input, needs_dense_lm_head_input

IMAGE_SIZE = (672, 672)  # (H, W): a 2x2 anyres grid, 5 tiles, as in the paper's LLaVA-NeXT budgets
QUESTION = "What is shown in this image? Describe it in detail."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20
# what visionzip.cost's prefill_flops reads of an LM's config
LM_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LM_SHAPE_KEYS += ("num_key_value_heads", "vocab_size")


# -- FLOPs each phase must do (multiply-add = 2 FLOPs; norms, softmax and activations left out) ----
def cls_tokens_of(vision_config: Any) -> int:
    """CLS tokens a tile of this tower has: CLIP one, SigLIP none."""
    return 0 if vision_config.model_type == "siglip_vision_model" else 1


def tower_flops(vision_config: Any, tiles: int) -> float:
    """CLIP (or SigLIP) tower over `tiles` tiles: patch conv, then per layer the q/k/v/o and MLP matmuls
    2*S*(4C^2 + 2CF) and attention (QK^T and AV) 4*S^2*C, S = CLS + P tokens. Every layer counts:
    LLaVA runs the whole tower although it reads the second-to-last layer."""
    patch, side = vision_config.patch_size, vision_config.image_size // vision_config.patch_size
    patches, seq = side * side, side * side + cls_tokens_of(vision_config)
    width, mlp = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * (3 * patch * patch) * width
    layer = 2 * seq * (4 * width * width + 2 * width * mlp) + 4 * seq * seq * width
    return float(tiles * (embed + vision_config.num_hidden_layers * layer))


def projector_flops(config: Any, tokens: int) -> float:
    """Two-layer MLP projector, vision width Cv -> LM width E -> E: 2*N*(Cv*E + E*E)."""
    vision_width, width = config.vision_config.hidden_size, config.text_config.hidden_size
    return float(2 * tokens * (vision_width * width + width * width))


def visionzip_flops(vision_config: Any, tiles: int, budget: Budget) -> float:
    """VisionZip's own work per tile: the CLS query and all keys of the feature layer again
    (2C^2 + 2SC^2), the CLS attention row (2SC) and key similarity of merged tokens to targets (2MKd).
    Without a CLS token (SigLIP) every query again and every row of the map: 4SC^2 + 2S^2C."""
    side = vision_config.image_size // vision_config.patch_size
    cls = cls_tokens_of(vision_config)
    seq, width = side * side + cls, vision_config.hidden_size
    head_dim = width // vision_config.num_attention_heads
    merged = seq - budget.dominant - budget.contextual
    signal = (
        2 * width * width + 2 * seq * width * width + 2 * seq * width if cls else 4 * seq * width * (width + seq / 2)
    )
    per_tile = signal + 2 * merged * budget.contextual * head_dim
    return float(tiles * per_tile)


# Qwen2.5-VL: one image is a grid of patch rows x cols; its tower runs windows of merged cells in most
# blocks and the whole image in `fullatt_block_indexes`; its merger (the projector) runs inside the tower.
def qwen_window_patches(vision_config: Any, grid: tuple[int, int]) -> list[int]:
    """Patches in each attention window of a windowed block (the tower's `get_window_index`: windows of
    window_size px, in merged cells; the last row and column of windows are cut by the image's edge)."""
    merge = vision_config.spatial_merge_size
    side = vision_config.window_size // merge // vision_config.patch_size  # cells per window side
    rows, cols = grid[0] // merge, grid[1] // merge
    heights = [min(side, rows - top) for top in range(0, rows, side)]
    widths = [min(side, cols - left) for left in range(0, cols, side)]
    return [height * width * merge * merge for height in heights for width in widths]


def qwen_tower_flops(vision_config: Any, grid: tuple[int, int]) -> float:
    """Qwen2.5-VL's tower on one image of rows x cols patches, the merger left out (`qwen_merger_flops`):
    the patch conv (3 x temporal x p x p inputs), per block the fused qkv, the output and the gated MLP's
    matmuls 2*S*(4C^2 + 3CF), attention 4*s^2*C over each window s (or the whole image S in a
    full-attention block)."""
    patches, width = grid[0] * grid[1], vision_config.hidden_size
    pixels = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    embed = 2 * patches * pixels * width
    linear = 2 * patches * (4 * width * width + 3 * width * vision_config.intermediate_size)
    blocks, full = vision_config.depth, len(vision_config.fullatt_block_indexes)
    windows = sum(4 * size * size * width for size in qwen_window_patches(vision_config, grid))
    attention = (blocks - full) * windows + full * 4 * patches * patches * width
    return float(embed + blocks * linear + attention)


def qwen_merger_flops(vision_config: Any, cells: int) -> float:
    """The 2x2 merger on every cell (it runs before any method chooses): 4C -> 4C -> E, 2*N*(16C^2 + 4CE)."""
    merged = vision_config.hidden_size * vision_config.spatial_merge_size**2
    return float(2 * cells * (merged * merged + merged * vision_config.out_hidden_size))


def qwen_visionzip_flops(vision_config: Any, grid: tuple[int, int], budget: Budget) -> float:
    """VisionZip's own work on one image: the last full-attention block's qkv again on every patch
    (2*S*3C^2), every query's attention logits (2*S^2*C) for the attention each patch receives, and the
    head-mean key similarity of the merged cells to the targets (2MKd)."""
    patches, width = grid[0] * grid[1], vision_config.hidden_size
    cells = patches // vision_config.spatial_merge_size**2
    dominant, contextual = min(budget.dominant, cells), min(budget.contextual, cells - min(budget.dominant, cells))
    merged = cells - dominant - contextual
    head_dim = width // vision_config.num_heads
    return float(2 * patches * 3 * width * width + 2 * patches * patches * width + 2 * merged * contextual * head_dim)


def decode_flops(text_config: Any, context: int) -> float:
    """One new token after `context` cached ones: per layer 2*W + attention over context + 1 keys 4*h*(n+1),
    then the LM head."""
    width, layers = text_config.hidden_size, text_config.num_hidden_layers
    per_layer = 2 * _llm_linear_params(text_config) + 4 * width * (context + 1)
    return float(layers * per_layer + 2 * width * text_config.vocab_size)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes the cache object holds (keys and values of every layer), read from its tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# -- clocks and memory -----------------------------------------------------------------------------
class Clock:
    """Timestamps that can be taken inside hooks: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "CUDA events, read after synchronising" if self.cuda else "time.perf_counter"

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


class PeakMemory:
    """Peak memory a block needs above what is held when it starts (weights, inputs), in MiB.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the process's peak
    resident set (VmHWM) above its RSS at the start, with the peak reset through
    /proc/self/clear_refs (Linux) after gc and malloc_trim, so freed-but-cached heap pages must be
    touched again to count. It sees every allocation, torch's or not, unlike tracemalloc.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._trim: Callable[[int], int] | None = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above memory_allocated at start"
            return
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        try:
            self._reset_hwm()
            self.method = "peak RSS (VmHWM reset via /proc/self/clear_refs) above RSS at start" + (
                ", after gc + malloc_trim" if self._trim else ", after gc (no glibc: freed heap may be reused unseen)"
            )
        except OSError as error:
            self.method = f"not measured: cannot reset the peak RSS ({error})"

    @property
    def available(self) -> bool:
        return not self.method.startswith("not measured")

    @contextlib.contextmanager
    def measure(self) -> Iterator[Peak]:
        """Yields a Peak; `peak.so_far()` may be read inside the block (from a hook), `peak.mib` after it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            peak = Peak(lambda: (torch.cuda.max_memory_allocated(self.device) - start) / MIB)
        elif self.available:
            gc.collect()
            if self._trim:
                self._trim(0)
            self._reset_hwm()
            start = _proc_status_kib("VmRSS")
            peak = Peak(lambda: (_proc_status_kib("VmHWM") - start) / 1024)
        else:
            peak = Peak(lambda: None)
        yield peak
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak.mib = peak.so_far()

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


@dataclass
class Peak:
    so_far: Callable[[], float | None]  # MiB above the start, peak until now (allocator stats: no sync needed)
    mib: float | None = None  # the block's peak, set when it ends


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


@dataclass(frozen=True)
class ModelParts:
    """The modules whose hooks split one forward into phases."""

    tower: nn.Module
    projector: nn.Module  # LLaVA's multi-modal projector; Qwen2.5-VL's merger, which runs inside its tower
    signal_attention: nn.Module  # the attention whose pre-hook reads the methods' signal
    language_model: nn.Module
    projector_in_tower: bool = False


def model_parts(model: nn.Module) -> ModelParts:
    base = model.model
    if hasattr(base, "visual"):  # Qwen2.5-VL: the signal is read at the last full-attention block
        visual = base.visual
        attention = visual.blocks[visual.config.fullatt_block_indexes[-1]].attn
        return ModelParts(visual, visual.merger, attention, base.language_model, projector_in_tower=True)
    layers = encoder_layers(base.vision_tower)
    attention = layers[feature_layer_index(base.config.vision_feature_layer, len(layers))].self_attn
    return ModelParts(base.vision_tower, base.multi_modal_projector, attention, base.language_model)


class PhaseMarks:
    """Hooks that timestamp one forward's phases: the tower, VisionZip's signal hook (which runs
    inside the tower, on the feature layer's attention), selection + merge (tower end to projector),
    the projector, packing (projector end to the LM: packing, selection record, placing features in
    the prompt), the LM's decoder and its head; and the peak memory of everything before the LM.
    On Qwen2.5-VL the projector (merger) runs inside the tower and the methods choose after it.
    Register after `visionzip.apply` so the signal marks bracket its hook."""

    def __init__(self, model: nn.Module, clock: Clock, peak: Peak) -> None:
        parts = model_parts(model)
        self.projector_in_tower = parts.projector_in_tower
        self.marks: dict[str, Any] = {}
        self.vision_peak_mib: float | None = None

        def llm_start(*args: Any) -> None:
            self.marks["llm_start"] = clock.now()
            self.vision_peak_mib = peak.so_far()

        def mark(name: str) -> Callable[..., None]:
            return lambda *args: self.marks.__setitem__(name, clock.now())

        self._handles = [
            parts.tower.register_forward_pre_hook(mark("tower_start")),
            parts.tower.register_forward_hook(mark("tower_end")),
            parts.signal_attention.register_forward_pre_hook(mark("signals_start"), prepend=True),
            parts.signal_attention.register_forward_pre_hook(mark("signals_end")),
            parts.projector.register_forward_pre_hook(mark("projector_start")),
            parts.projector.register_forward_hook(mark("projector_end")),
            parts.language_model.register_forward_pre_hook(llm_start),
            parts.language_model.register_forward_hook(mark("decoder_end")),
        ]

    def vision_ms(self, clock: Clock, reduced: bool) -> dict[str, float | None]:
        """The vision step's parts in ms. Qwen2.5-VL: the tower less its merger; its methods choose between
        the tower and the LM together with the M-RoPE positions and the packing, so there `select_merge_ms`
        is None and `pack_ms` holds the choice too."""
        m = self.marks
        signals = clock.ms(m["signals_start"], m["signals_end"]) if "signals_end" in m and reduced else 0.0
        projector = clock.ms(m["projector_start"], m["projector_end"])
        tower = clock.ms(m["tower_start"], m["tower_end"]) - signals
        if self.projector_in_tower:
            return {"tower_ms": tower - projector, "signals_ms": signals, "select_merge_ms": None,
                    "projector_ms": projector, "pack_ms": clock.ms(m["tower_end"], m["llm_start"])}  # fmt: skip
        return {
            "tower_ms": tower,
            "signals_ms": signals,
            "select_merge_ms": clock.ms(m["tower_end"], m["projector_start"]),
            "projector_ms": projector,
            "pack_ms": clock.ms(m["projector_end"], m["llm_start"]),
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# -- models ----------------------------------------------------------------------------------------
@dataclass
class Subject:
    model: nn.Module
    processor: Any
    description: str


FAMILIES = ["llava_next", "llava_onevision", "qwen2_5_vl"]
FULL_DEPTH = {"llava_next": 32, "llava_onevision": 28, "qwen2_5_vl": 28}  # the 7B's LM layers
MODEL_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
TINY_DESCRIPTIONS = {
    "llava_next": "tiny random LLaVA-NeXT (CLIP 64 wide x 4 layers, Llama 128 wide x 2 layers; real tile geometry)",
    "llava_onevision": "tiny random LLaVA-OneVision (SigLIP 64 wide x 4 layers, Qwen2 128 wide; real tile geometry)",
    "qwen2_5_vl": "tiny random Qwen2.5-VL (tower 64 wide x 4 blocks, LM 128 wide; real patch, merge and window geometry)",
}
WIDE_DESCRIPTIONS = {
    "llava_next": "random-init LLaVA-NeXT of real width: CLIP-L/14-336 (24 layers, 1024 wide) + Llama "
    "4096 wide, 11008 MLP, 32 heads, vocab 32064, {layers} layers",
    "llava_onevision": "random-init LLaVA-OneVision of real width: SigLIP so400m/14-384 (26 layers, 1152 wide) "
    "+ Qwen2 3584 wide, 18944 MLP, 28 heads (4 KV), vocab 152064, {layers} layers",
    "qwen2_5_vl": "random-init Qwen2.5-VL-7B of real width: tower 32 blocks x 1280 wide, 3420 MLP, 112-px windows, "
    "full attention in blocks 7/15/23/31, 2x2 merger + LM 3584 wide, 18944 MLP, 28 heads (4 KV), "
    "the tiny checkpoint's vocabulary, {layers} layers",
}


def load_subject(
    preset: str,
    dtype: torch.dtype,
    device: torch.device,
    llm_layers: int,
    model_id: str | None,
    family: str = "llava_next",
) -> Subject:
    if preset == "tiny":
        from visionzip.tiny import load_tiny

        model, processor = load_tiny(family, dtype=dtype)
        description = TINY_DESCRIPTIONS[family]
    elif preset == "wide":
        builders = {"llava_next": build_wide, "llava_onevision": build_wide_onevision, "qwen2_5_vl": build_wide_qwen}
        model, processor = builders[family](llm_layers, dtype, device)
        description = WIDE_DESCRIPTIONS[family].format(layers=llm_layers)
        # CDPruner's text side: a random CLIP-L text tower of real size (SigLIP and Qwen's tower refuse CDPruner)
        if family == "llava_next" and "VISIONZIP_CLIP" not in os.environ:
            os.environ["VISIONZIP_CLIP"] = str(random_clip_l())
            description += "; CDPruner's CLIP text tower: random, CLIP-L/14-336's shape"
    elif preset == "real":
        if not model_id:
            raise SystemExit(f"--preset real needs --model PATH_OR_ID (a {family} checkpoint)")
        from visionzip.workarounds import load_processor

        processor = load_processor(model_id)
        model_class = getattr(transformers, MODEL_CLASSES[family])
        model = model_class.from_pretrained(model_id, dtype=dtype, attn_implementation="sdpa")
        description = f"{model_id} ({model.config.text_config.num_hidden_layers} LM layers)"
    else:
        raise SystemExit(f"unknown preset {preset!r}: tiny, wide or real")
    return Subject(model.to(device).eval(), processor, description)


def build_wide_qwen(llm_layers: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """Qwen2.5-VL-7B's shapes with random weights, from configs (no download); the tiny Qwen2.5-VL's
    processor (real 14-px patches, 2x2 merge, chat template) and vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visionzip.tiny import load_tiny

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
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, processor


def build_wide_onevision(llm_layers: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """llava-onevision-qwen2-7b-ov's shapes with random weights, from configs (no download); the tiny
    OneVision checkpoint's processor supplies the real tile geometry and the chat template."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from visionzip.tiny import load_tiny

    _, processor = load_tiny("llava_onevision")
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=llm_layers, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.tokenizer.convert_tokens_to_ids(processor.image_token),
        video_token_index=processor.tokenizer.convert_tokens_to_ids(processor.video_token),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, processor


def build_wide(llm_layers: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """LLaVA-NeXT-7B's shapes with random weights, made on `device` in `dtype` from configs (no
    download). The tiny checkpoint's processor supplies real tile geometry and the chat template."""
    from transformers import LlavaNextForConditionalGeneration

    from visionzip.tiny import load_tiny

    _, processor = load_tiny("llava_next")
    config = build_wide_config(llm_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, processor


def build_wide_config(llm_layers: int):
    """LLaVA-NeXT-7B's config (CLIP-L/14-336, a Llama of 4096 wide with `llm_layers` layers), with the tiny
    tokenizer's image token."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from visionzip.tiny import PINPOINTS, build_tokenizer

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=PINPOINTS,
        image_token_id=build_tokenizer().convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def random_clip_l(cache: Path | None = None) -> Path:
    """A random CLIP with openai/clip-vit-large-patch14-336's text tower (12 x 768) and projections, for
    CDPruner on a random model of real width (no hub here): its cost is the real one, its choice noise.
    The vision tower is one layer: CDPruner uses only its projection.  Built once in the cache folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from visionzip.tiny import build_clip_tokenizer, cache_folder

    path = Path(cache or cache_folder()) / "random-clip-l336-v1"
    if (path / "config.json").exists():
        return path
    tokenizer = build_clip_tokenizer()
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        **ids,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    torch.manual_seed(0)
    partial = path.with_name(path.name + ".partial")
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768)
    ).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)  # only a complete checkpoint gets the final name
    return path


def bench_image() -> Image.Image:
    """A fixed noise image: token counts and timings depend on its size only."""
    pixels = np.random.RandomState(0).randint(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# -- the modes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reduction:
    """A method and its budget: VisionZip's (dominant, contextual) per tile, or another method's tokens."""

    method: str
    budget: Budget | None = None
    tokens: int | None = None

    def use(self) -> dict[str, Any]:
        if self.method == "visionzip":
            return dict(enabled=True, dominant=self.budget.dominant, contextual=self.budget.contextual)
        text = QUESTION if visionzip.get_method(self.method).reads_text else None  # what CDPruner chooses by
        return dict(enabled=True, method=self.method, tokens=self.tokens, text=text)

    def server_options(self) -> dict[str, Any]:
        """The same reduction as the vLLM plugin's server options (`visionzip_vllm.hf_overrides`)."""
        if self.method == "visionzip":
            return dict(method="visionzip", dominant=self.budget.dominant, contextual=self.budget.contextual)
        return dict(method=self.method, tokens=self.tokens)


def parse_budget(name: str, family: str = "llava_next") -> Reduction:
    """ "640" is VisionZip's preset; "METHOD:NAME" (e.g. "divprune:320") another method's preset of that name."""
    method, _, preset = name.rpartition(":")
    method = method or "visionzip"
    if method == "visionzip":
        return Reduction("visionzip", preset_budget(family, preset))
    presets = visionzip.get_method(method).presets(family)
    if not preset.isdigit() or int(preset) not in presets:
        raise ValueError(f"{method} has no preset {preset!r}; presets: {sorted(presets, reverse=True)}")
    return Reduction(method, tokens=presets[int(preset)])


@dataclass
class Mode:
    name: str  # "full", the budget's name ("640": VisionZip) or "METHOD:NAME"
    reduction: Reduction | None  # None: the stock model
    inputs: dict[str, torch.Tensor]
    visual_tokens: int
    text_tokens: int
    tiles: int  # tiles the tower sees (base image + grid crops); Qwen2.5-VL: 1, the image
    grid: tuple[int, int] | None = None  # Qwen2.5-VL: the image's patch rows and columns; None with tiles

    @property
    def budget(self) -> Budget | None:
        """VisionZip's budget; None for the stock model and the other methods."""
        return self.reduction.budget if self.reduction is not None else None


@contextlib.contextmanager
def mode_context(model: nn.Module, processor: Any, reduction: Reduction | None) -> Iterator[visionzip.Call | None]:
    """The stock model as loaded when `reduction` is None; the method at its budget otherwise,
    removed again on exit so the next stock run sees an untouched model."""
    if reduction is None:
        yield None
        return
    handle = visionzip.apply(model, processor)
    try:
        with handle.use(**reduction.use()) as call:
            yield call
    finally:
        handle.remove()


def prepare_modes(
    subject: Subject, budgets: list[str], device: torch.device, dtype: torch.dtype, family: str = "llava_next"
) -> list[Mode]:
    processor, image_token_id = subject.processor, subject.model.config.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    image = bench_image()
    modes = []
    for name in ["full", *budgets]:
        reduction = None if name == "full" else parse_budget(name, family)
        with mode_context(subject.model, processor, reduction):
            inputs = processor(images=image, text=prompt, return_tensors="pt")
        inputs = {key: value.to(device, dtype if value.is_floating_point() else None) for key, value in inputs.items()}
        visual = int((inputs["input_ids"] == image_token_id).sum())
        text = inputs["input_ids"].shape[1] - visual
        if "image_grid_thw" in inputs:  # Qwen2.5-VL: (images=1, 3) frames, patch rows, patch columns
            _, rows, cols = inputs["image_grid_thw"][0].tolist()
            modes.append(Mode(name, reduction, inputs, visual, text, 1, (rows, cols)))
        else:
            modes.append(
                Mode(name, reduction, inputs, visual, text, inputs["pixel_values"].shape[1])
            )  # (1, tiles, ...)
    return modes


def run_prefill_decode(
    subject: Subject, mode: Mode, clock: Clock, memory: PeakMemory, new_tokens: int
) -> dict[str, float | None]:
    """One time-to-first-token forward with its phases, then `new_tokens` decode steps."""
    model = subject.model
    with mode_context(model, subject.processor, mode.reduction) as call:
        with memory.measure() as peak:
            marks = PhaseMarks(model, clock, peak)
            try:
                start = clock.now()
                output = model(**mode.inputs, use_cache=True, logits_to_keep=1)
                token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
                end = clock.now()
            finally:
                marks.remove()
        if call is not None and call.visual_tokens != [mode.visual_tokens]:
            fed, expected = call.visual_tokens, mode.visual_tokens
            raise RuntimeError(f"{mode.name} fed {fed} visual tokens; the prompt holds {expected}")
        cache, steps = output.cache, []
        kv_bytes = kv_cache_bytes(cache)
        for _ in range(new_tokens):
            step_start = clock.now()
            output = model(input_ids=token, cache=cache, use_cache=True)
            token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps.append((step_start, clock.now()))
    m = marks.marks
    result = {
        **marks.vision_ms(clock, mode.reduction is not None),
        "vision_ms": clock.ms(start, m["llm_start"]),
        "decoder_ms": clock.ms(m["llm_start"], m["decoder_end"]),
        "head_ms": clock.ms(m["decoder_end"], end),  # LM head on the last position + argmax
        "prefill_ms": clock.ms(m["llm_start"], end),
        "ttft_ms": clock.ms(start, end),
        "decode_ms_per_token": statistics.median(clock.ms(a, b) for a, b in steps) if steps else None,
        "vision_peak_mib": marks.vision_peak_mib,
        "peak_mib": peak.mib,
        "kv_cache_bytes": kv_bytes,
    }
    if mode.budget:  # selection (the signal hook inside the tower, top-k, grouping) + merge (Qwen: + packing)
        after_tower = result["select_merge_ms"] if result["select_merge_ms"] is not None else result["pack_ms"]
        result["visionzip_ms"] = result["signals_ms"] + after_tower
    # Any method's own work, and stock's packing: the vision step less the tower's and the projector's
    result["own_ms"] = result["vision_ms"] - result["tower_ms"] - result["projector_ms"]
    return result


def authors_image_features(model: nn.Module, pixel_values: torch.Tensor, budget: Budget) -> torch.Tensor:
    """The authors' route to the same tokens, for one image: the tower with eager attention returning
    every layer's attention map (their code patches CLIP so), the CLS row read from the feature
    layer's map, head-mean keys kept from that layer's k_proj; then the same selection, merge and
    projector. Returns (tiles, D + C, E). Call inside `eager_tower`."""
    base = model.model
    layers = encoder_layers(base.vision_tower)
    index = feature_layer_index(base.config.vision_feature_layer, len(layers))
    attention = layers[index].self_attn
    kept: dict[str, torch.Tensor] = {}
    hook = attention.k_proj.register_forward_hook(lambda module, args, output: kept.__setitem__("keys", output))
    try:
        tower = base.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    tiles, seq, _ = kept["keys"].shape
    keys_mean = kept["keys"].view(tiles, seq, attention.num_heads, attention.head_dim).mean(dim=2)
    cls_attn = tower.attentions[index][:, :, 0].float().sum(dim=1)  # (tiles, S)
    choice = choose_tokens(cls_attn, keys_mean, budget.dominant, budget.contextual)
    return base.multi_modal_projector(merge_tokens(tower.hidden_states[index + 1], choice))


@contextlib.contextmanager
def eager_tower(model: nn.Module) -> Iterator[None]:
    """The vision tower with eager attention (needed for output_attentions), restored on exit."""
    previous = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({"vision_config": previous})


def run_authors(subject: Subject, mode: Mode, clock: Clock, memory: PeakMemory) -> dict[str, float | None]:
    """Image features by the authors' approach, timed and measured like the vision phase of the others."""
    with eager_tower(subject.model), memory.measure() as peak:
        start = clock.now()
        authors_image_features(subject.model, mode.inputs["pixel_values"], mode.budget)
        end = clock.now()
    return {"vision_ms": clock.ms(start, end), "vision_peak_mib": peak.mib}


# -- the benchmark ---------------------------------------------------------------------------------
def run_benchmark(
    preset: str = "tiny",
    dtype: str = "float32",
    device: str = "cpu",
    llm_layers: int | None = None,
    model_id: str | None = None,
    budgets: list[str] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    new_tokens: int = 8,
    authors: bool = True,
    threads: int | None = None,
    stock_lm_head: bool = False,
    family: str = "llava_next",
) -> dict[str, Any]:
    """Run every mode `warmup + repeats` times, interleaved; return medians, derived ratios and targets."""
    if threads:
        torch.set_num_threads(threads)
    budgets = budgets or [str(name) for name in sorted(PRESETS[family], reverse=True)]
    # VisionZip's budgets largest first (the last is the smallest), then the other methods' in the order given
    budgets = sorted((b for b in budgets if ":" not in b), key=int, reverse=True) + [b for b in budgets if ":" in b]
    torch_device = torch.device(device)
    llm_layers = llm_layers or (FULL_DEPTH[family] if torch_device.type == "cuda" else 2)
    clock, memory = Clock(torch_device), PeakMemory(torch_device)
    with torch.inference_mode():
        subject = load_subject(preset, DTYPES[dtype], torch_device, llm_layers, model_id, family)
        dense_head = needs_dense_lm_head_input(torch_device, DTYPES[dtype]) and not stock_lm_head
        if dense_head:
            dense_lm_head_input(subject.model)
        modes = prepare_modes(subject, budgets, torch_device, DTYPES[dtype], family)
        visionzip_modes = [mode for mode in modes if mode.budget is not None]
        smallest = visionzip_modes[-1] if visionzip_modes else None
        # the authors' approach is VisionZip's on CLIP: their code reads a CLS row, which SigLIP lacks
        authors = authors and smallest is not None and family == "llava_next"
        load_before = os.getloadavg()
        runs = timed_rounds(subject, modes, smallest if authors else None, clock, memory, warmup + repeats, new_tokens)
        runs = {name: results[warmup:] for name, results in runs.items()}
    config = subject.model.config
    settings = dict(family=family, preset=preset, dtype=dtype, repeats=repeats, warmup=warmup, new_tokens=new_tokens)
    lm_head_input = "dense copy (CPU bf16 workaround, as the app)" if dense_head else "stock"
    meta = run_meta(subject, torch_device, settings, modes[0].text_tokens, clock, memory, lm_head_input, load_before)
    rows = [mode_row(mode, runs[mode.name], config) for mode in modes]
    add_ratios(rows)
    vision = vision_rows(rows, runs, smallest if authors else None)
    # Per-round values too: on a shared machine the spread says how far to trust a median.
    # The LM's shape, for FLOP counts made later from these results (bench.gpu_measure: FastV's own work)
    text = {key: getattr(config.text_config, key) for key in LM_SHAPE_KEYS}
    return {
        "meta": meta,
        "rows": rows,
        "vision": vision,
        "targets": targets(rows, vision),
        "runs": runs,
        "text_config": text,
    }


def run_meta(
    subject: Subject,
    device: torch.device,
    settings: dict[str, Any],
    text_tokens: int,
    clock: Clock,
    memory: PeakMemory,
    lm_head_input: str,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    """What a result file says about its run: the model, the machine, the software and how it was timed."""
    config = subject.model.config
    return {
        "family": settings["family"],
        "preset": settings["preset"],
        "model": subject.description,
        "parameters": sum(p.numel() for p in subject.model.parameters()),
        "weights_mib": round(sum(p.numel() * p.element_size() for p in subject.model.parameters()) / MIB, 1),
        "llm_layers": config.text_config.num_hidden_layers,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "machine": machine_description(device),
        "dtype": settings["dtype"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "visionzip": visionzip.__version__,
        "python": platform.python_version(),
        "image_size": list(IMAGE_SIZE),
        "text_tokens": text_tokens,
        "repeats": settings["repeats"],
        "warmup": settings["warmup"],
        "new_tokens": settings["new_tokens"],
        "timing": clock.method + "; medians over repeats after warm-up rounds, modes interleaved per round",
        "memory": memory.method,
        "lm_head_input": lm_head_input,
        "load_average": f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (1-minute, whole machine)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def vision_rows(rows: list[dict[str, Any]], runs: dict[str, list], authors: Mode | None) -> list[dict[str, Any]]:
    """The vision phase (start of the forward to the LM) of the stock and VisionZip runs, beside the
    authors' approach at `authors`' budget (theirs leaves out embedding and packing: a head start)."""
    vision = [
        {"approach": approach, "budget": row["mode"], **{key: row[key] for key in ("vision_ms", "vision_peak_mib")}}
        for approach, row in (("stock", rows[0]), ("visionzip", [r for r in rows if r["mode"].isdigit()][-1]))
    ]
    if authors is not None:
        vision.append({"approach": "authors", "budget": authors.name, **_medians(runs["authors"])})
    return vision


def timed_rounds(
    subject: Subject,
    modes: list[Mode],
    authors: Mode | None,
    clock: Clock,
    memory: PeakMemory,
    rounds: int,
    new_tokens: int,
) -> dict[str, list[dict[str, float]]]:
    """Every mode (and the authors' approach at `authors`' budget) once per round, the order rotated
    each round so drift favours no mode; mode name -> its results, round by round."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [mode.name for mode in modes] + ["authors"]}
    for round_index in range(rounds):
        shift = round_index % len(modes)
        for mode in modes[shift:] + modes[:shift] + ([None] if authors is not None else []):
            if mode is None:
                runs["authors"].append(run_authors(subject, authors, clock, memory))
            else:
                runs[mode.name].append(run_prefill_decode(subject, mode, clock, memory, new_tokens))
    return runs


def _medians(runs: list[dict[str, float]]) -> dict[str, float | None]:
    keys = runs[0].keys()
    return {
        key: (None if any(run[key] is None for run in runs) else statistics.median(run[key] for run in runs))
        for key in keys
    }


def vision_gflop(config: Any, mode: Mode) -> dict[str, float]:
    """The vision step's work: the tower, VisionZip's own (0 for the others) and the projector's. LLaVA:
    the stock model (and a per-image method) projects every patch, VisionZip its kept tokens; Qwen2.5-VL's
    merger runs on every cell before any method chooses."""
    vision, budget = config.vision_config, mode.budget
    if mode.grid is not None:
        cells = mode.grid[0] * mode.grid[1] // vision.spatial_merge_size**2
        tower, projector = qwen_tower_flops(vision, mode.grid), qwen_merger_flops(vision, cells)
        own = qwen_visionzip_flops(vision, mode.grid, budget) if budget else 0.0
    else:
        patches = (vision.image_size // vision.patch_size) ** 2
        tower = tower_flops(vision, mode.tiles)
        projector = projector_flops(config, mode.tiles * (budget.per_tile if budget else patches))
        own = visionzip_flops(vision, mode.tiles, budget) if budget else 0.0
    return {"tower_gflop": tower / 1e9, "visionzip_gflop": own / 1e9, "projector_gflop": projector / 1e9}


def mode_row(mode: Mode, runs: list[dict[str, float]], config: Any) -> dict[str, Any]:
    context = mode.visual_tokens + mode.text_tokens
    row: dict[str, Any] = {
        "mode": mode.name,
        "dominant": mode.budget.dominant if mode.budget else None,
        "contextual": mode.budget.contextual if mode.budget else None,
        "visual_tokens": mode.visual_tokens,
        "text_tokens": mode.text_tokens,
        "context_tokens": context,
        **_medians(runs),
        **vision_gflop(config, mode),
        "prefill_gflop": prefill_flops(config.text_config, context) / 1e9,
        "decode_gflop_per_token": decode_flops(config.text_config, context) / 1e9,
    }
    own = row.setdefault("visionzip_ms", None)
    row["visionzip_pct_of_tower"] = None if own is None else 100 * own / row["tower_ms"]
    row["own_pct_of_tower"] = 100 * row["own_ms"] / row["tower_ms"] if row.get("own_ms") is not None else None
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against the `full` row of the same run: token ratio, prefill and TTFT speed-ups, and the
    TTFT speed-up the FLOP counts allow (the tower's work does not shrink, so it bounds the gain)."""
    full = rows[0]

    def work(row: dict[str, Any]) -> float:
        return row["tower_gflop"] + row["visionzip_gflop"] + row["projector_gflop"] + row["prefill_gflop"]

    for row in rows:
        row["token_ratio"] = full["context_tokens"] / row["context_tokens"]
        row["decoder_speedup"] = full["decoder_ms"] / row["decoder_ms"]
        row["decoder_speedup_vs_token_ratio"] = row["decoder_speedup"] / row["token_ratio"]
        row["prefill_speedup"] = full["prefill_ms"] / row["prefill_ms"]
        row["prefill_speedup_vs_token_ratio"] = row["prefill_speedup"] / row["token_ratio"]
        row["ttft_speedup"] = full["ttft_ms"] / row["ttft_ms"]
        row["ttft_speedup_flop_bound"] = work(full) / work(row)
        row["ttft_speedup_vs_bound"] = row["ttft_speedup"] / row["ttft_speedup_flop_bound"]
        # No budget can beat this: the whole TTFT's work over the tower's alone.
        row["ttft_speedup_tower_limit"] = work(full) / row["tower_gflop"]


def targets(rows: list[dict[str, Any]], vision: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's targets, evaluated on this run (they are set for `wide` in bfloat16)."""
    visionzip_rows = [row for row in rows if row["mode"].isdigit()]
    if not visionzip_rows:  # the targets are VisionZip's
        return []
    smallest = visionzip_rows[-1]  # VisionZip's smallest budget
    by_approach = {entry["approach"]: entry for entry in vision}
    name = smallest["mode"]
    checks = [
        (f"LM prefill speed-up at {name} / token ratio", smallest["prefill_speedup_vs_token_ratio"], ">=", 0.85),
        ("  the same, decoder layers only (no LM head)", smallest["decoder_speedup_vs_token_ratio"], ">=", 0.85),
        (f"VisionZip's own time at {name}, % of the tower", smallest["visionzip_pct_of_tower"], "<=", 3.0),
    ]
    if "authors" in by_approach:
        ours, theirs = by_approach["visionzip"], by_approach["authors"]
        time_ratio = ours["vision_ms"] / theirs["vision_ms"]
        checks.append(("vision phase time, VisionZip / authors' approach", time_ratio, "<", 1.0))
        if ours["vision_peak_mib"] is not None and theirs["vision_peak_mib"]:
            ratio = ours["vision_peak_mib"] / theirs["vision_peak_mib"]
            checks.append(("vision phase peak memory, VisionZip / authors'", ratio, "<", 1.0))
    compare = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    return [
        {"target": name, "value": value, "goal": f"{op} {goal}", "met": bool(compare[op](value, goal))}
        for name, value, op, goal in checks
    ]


# -- output ----------------------------------------------------------------------------------------
TABLE = [  # (header, key, format)
    ("mode", "mode", "{}"),
    ("visual", "visual_tokens", "{}"),
    ("context", "context_tokens", "{}"),
    ("tower ms", "tower_ms", "{:.1f}"),
    ("VZ ms", "visionzip_ms", "{:.2f}"),
    ("VZ %tower", "visionzip_pct_of_tower", "{:.2f}"),
    ("own ms", "own_ms", "{:.2f}"),  # any method's work besides tower and projector (stock: its packing)
    ("own %tower", "own_pct_of_tower", "{:.2f}"),
    ("pack ms", "pack_ms", "{:.1f}"),
    ("decoder ms", "decoder_ms", "{:.1f}"),
    ("LM head ms", "head_ms", "{:.1f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("decode ms/tok", "decode_ms_per_token", "{:.2f}"),
    ("peak MiB", "peak_mib", "{:.0f}"),
    ("KV MiB", "kv_cache_bytes", "mib"),
    ("GFLOP tower", "tower_gflop", "{:.1f}"),
    ("GFLOP prefill", "prefill_gflop", "{:.1f}"),
    ("GFLOP/tok decode", "decode_gflop_per_token", "{:.3f}"),
]
RATIOS = [
    ("mode", "mode", "{}"),
    ("token ratio", "token_ratio", "{:.2f}x"),
    ("prefill speed-up", "prefill_speedup", "{:.2f}x"),
    ("/ token ratio", "prefill_speedup_vs_token_ratio", "{:.2f}"),
    ("decoder speed-up", "decoder_speedup", "{:.2f}x"),
    ("/ token ratio", "decoder_speedup_vs_token_ratio", "{:.2f}"),
    ("TTFT speed-up", "ttft_speedup", "{:.2f}x"),
    ("FLOP bound", "ttft_speedup_flop_bound", "{:.2f}x"),
    ("/ bound", "ttft_speedup_vs_bound", "{:.2f}"),
    ("tower limit", "ttft_speedup_tower_limit", "{:.2f}x"),
]
VISION = [
    ("approach", "approach", "{}"),
    ("budget", "budget", "{}"),
    ("vision ms", "vision_ms", "{:.1f}"),
    ("peak MiB", "vision_peak_mib", "{:.0f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / MIB:.1f}" if fmt == "mib" else fmt.format(value)


def markdown_table(entries: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(entry.get(key), fmt) for _, key, fmt in columns) + " |" for entry in entries]
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The header, the three tables and the targets, as Markdown (readable as plain text too)."""
    header = [f"- {key}: {value}" for key, value in results["meta"].items()]
    checks = [
        f"- {check['target']}: {check['value']:.3f} (goal {check['goal']}): {'met' if check['met'] else 'NOT met'}"
        for check in results["targets"]
    ]
    return "\n\n".join(
        [
            "\n".join(header),
            markdown_table(results["rows"], TABLE),
            markdown_table(results["rows"], RATIOS),
            markdown_table(results["vision"], VISION),
            "\n".join(checks),
        ]
    )


def result_name(meta: dict[str, Any]) -> str:
    layers = f"-{meta['llm_layers']}L" if meta["preset"] != "tiny" else ""
    threads = f"-{meta['threads']}t" if meta["device"] == "cpu" else ""
    family = {"llava_onevision": "onevision-", "qwen2_5_vl": "qwen-"}.get(meta.get("family"), "")
    return f"{family}{meta['preset']}{layers}-{meta['dtype']}-{meta['device']}{threads}"


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """<name>.json (everything, per-round values included), <name>.csv (one row per mode) and
    <name>-vision.csv, each CSV under '# key: value' header lines (pandas: read_csv(path, comment='#'))."""
    out.mkdir(parents=True, exist_ok=True)
    name = result_name(results["meta"])
    paths = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}-vision.csv"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    for path, entries in ((paths[1], results["rows"]), (paths[2], results["vision"])):
        with path.open("w", newline="") as handle:
            handle.writelines(f"# {key}: {value}\n" for key, value in results["meta"].items())
            writer = csv.DictWriter(handle, fieldnames=list(entries[0]))
            writer.writeheader()
            writer.writerows(entries)
    return paths


def ttft_figure(results: list[dict[str, Any]]):
    """Plotly figure: time to first token against visual tokens, one line per run, with the TTFT the
    FLOP counts allow (full TTFT scaled by work) dashed and the tower's time dotted."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    figure = go.Figure()
    for result, color in zip(results, qualitative.Plotly * len(results)):
        rows, label = result["rows"], result_name(result["meta"])
        tokens = [row["visual_tokens"] for row in rows]
        lines = {
            "measured": [row["ttft_ms"] for row in rows],
            "FLOP-proportional": [rows[0]["ttft_ms"] / row["ttft_speedup_flop_bound"] for row in rows],
            "vision tower": [row["tower_ms"] for row in rows],
        }
        for (kind, values), dash in zip(lines.items(), ("solid", "dash", "dot")):
            figure.add_trace(
                go.Scatter(
                    x=tokens,
                    y=values,
                    mode="lines+markers" if kind == "measured" else "lines",
                    line={"color": color, "dash": dash},
                    name=f"{label}: {kind}",
                    legendgroup=label,
                )
            )
    figure.update_layout(
        title="Time to first token vs visual tokens (672x672 image; full = the stock model)",
        xaxis_title="visual tokens fed to the language model",
        yaxis_title="time to first token (ms, log scale)",
        yaxis_type="log",
        template="plotly_white",
    )
    return figure


def write_figure(json_paths: list[Path], out: Path) -> list[Path]:
    """ttft.json (the figure, offline: plotly.io.read_json) and ttft.html (plotly.js from its CDN)."""
    import plotly.io

    figure = ttft_figure([json.loads(Path(path).read_text()) for path in json_paths])
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ttft.json", out / "ttft.html"]
    plotly.io.write_json(figure, paths[0])
    figure.write_html(paths[1], include_plotlyjs="cdn")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "wide", "real"], default="tiny")
    parser.add_argument("--family", choices=FAMILIES, default="llava_next")
    parser.add_argument("--model", help="checkpoint path or id of the family for --preset real")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--llm-layers", type=int, help="LM layers for --preset wide (default 2 on CPU, the 7B's 32 or 28 on CUDA)"
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        help="budget names (default: VisionZip's presets of the family, 640 320 160 or Qwen2.5-VL's 256 128 64): "
        '"640" is VisionZip\'s, "METHOD:NAME" another method\'s (e.g. divprune:320)',
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every mode)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps timed after the first token")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' approach (eager tower)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default torch's); 1 is steadier on a CPU shared with other jobs"
    )
    parser.add_argument(
        "--stock-lm-head", action="store_true", help="keep torch's slow CPU bf16 LM head (no dense-input workaround)"
    )
    parser.add_argument("--out", type=Path, help="folder for the CSV/JSON results (or the figure with --plot)")
    parser.add_argument("--plot", nargs="+", type=Path, metavar="RESULT_JSON", help="draw the TTFT figure from results")
    args = parser.parse_args(argv)
    if args.plot:
        for path in write_figure(args.plot, args.out or Path(".")):
            print(f"wrote {path}")
        return 0
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    results = run_benchmark(
        preset=args.preset,
        dtype=args.dtype,
        device=args.device,
        llm_layers=args.llm_layers,
        model_id=args.model,
        budgets=args.budgets,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        authors=not args.no_authors,
        threads=args.threads,
        stock_lm_head=args.stock_lm_head,
        family=args.family,
    )
    print(report(results))
    if args.out:
        for path in write_results(results, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
