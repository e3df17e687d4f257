"""Tiny LLaVA-NeXT and LLaVA-1.5 checkpoints built offline: random weights, real geometry.

The vision tower is narrow and shallow, but its tiles (336x336), patches (14x14, so 24x24 + CLS)
and `image_grid_pinpoints` are those of CLIP-L/14-336 and the llava-hf checkpoints, so every token
count equals the real models'.  Its answers are noise; its counts and timings are real.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .workarounds import load_processor

TINY_VERSION = 2  # bump when the recipe changes, so caches rebuild (2: a 4-layer LM, so FastV's K means something)
LM_LAYERS = 4
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_TOKENS = ["<|startoftext|>", "<|endoftext|>"]  # CLIP wraps every text in these and pools the end one
TINY_CLIP_LABEL = "tiny random CLIP (offline)"
TINY_CLIP_WIDTH = 64  # the tiny vision tower's width, which the tiny CLIP's visual projection takes

# Vicuna v1 with llava-hf's content blocks: images first, then text, per message.
VICUNA_CHAT_TEMPLATE = (
    '{%- set ns = namespace(system="A chat between a curious human and an artificial intelligence assistant. '
    "The assistant gives helpful, detailed, and polite answers to the human's questions.\") -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for block in message['content'] if block['type'] in ('image', 'video') -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{{- '</s>' if message['role'] == 'assistant' else ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_WORDS = (
    "a an the this that these those is are was were be been has have had do does did what which who where when why "
    "how many much color colour red green blue yellow black white orange purple brown grey gray pink picture image "
    "photo video frame clip scene shown show describe detail details left right top bottom middle center background "
    "foreground person people man woman child dog cat bird car bus tree trees sky cloud clouds water sea river road "
    "street building house city field grass flower flowers mountain snow sun light dark large small big little one two "
    "three four five six seven eight nine ten number count text sign written say says read there here in on at of to "
    "for with and or not no yes it its they them he she we you your i me my please tell about answer question chat "
    "between curious human artificial intelligence assistant gives helpful detailed polite answers questions user "
    "visual token tokens zip kept merged dominant contextual fast faster speed model language vision"
).split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on generated English-like text."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(24)) + "." for _ in range(4000)]
    corpus.append(VICUNA_CHAT_TEMPLATE)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _vision_config(num_layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=64,
    )


def _text_config(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny(path: str | os.PathLike, family: str = "llava_next", seed: int = 0, vision_layers: int = 4) -> Path:
    """Write a tiny LLaVA-NeXT (`family="llava_next"`), LLaVA-1.5 (`"llava"`), LLaVA-OneVision or Qwen2.5-VL
    checkpoint to `path`."""
    if family == ONEVISION_FAMILY:
        return build_tiny_onevision(path, seed, vision_layers)
    if family == QWEN_FAMILY:
        return build_tiny_qwen(path, seed=seed)
    path = Path(path)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=_vision_config(vision_layers),
        text_config=_text_config(len(tokenizer), tokenizer),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    processor_args = dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    image_args = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD, crop_size={"height": 336, "width": 336})
    if family == "llava_next":
        config = LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common)
        model_class = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, image_grid_pinpoints=PINPOINTS, **image_args
        )
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_args)
    elif family == "llava":
        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, **image_args)
        processor = LlavaProcessor(image_processor=image_processor, **processor_args)
    else:
        raise ValueError(f"family must be 'llava_next' or 'llava', got {family!r}")

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def cache_folder() -> Path:
    """Where built checkpoints are kept: $VISIONZIP_CACHE, else ~/.cache/visionzip."""
    return Path(os.environ.get("VISIONZIP_CACHE") or Path.home() / ".cache" / "visionzip")


def tiny_checkpoint(family: str = "llava_next", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached tiny checkpoint, built on first use (a few seconds)."""
    path = Path(cache_dir or cache_folder()) / f"tiny-{family}-v{TINY_VERSION}"
    return _cached(path, lambda staging: build_tiny(staging, family))


def _cached(path: Path, build) -> Path:
    """`path`, made by `build(staging)` first if it holds no checkpoint yet."""
    if not (path / "config.json").exists():
        staging = path.with_name(path.name + f".tmp{os.getpid()}")
        build(staging)
        try:  # built apart and renamed, so a reader never sees half a checkpoint
            staging.replace(path)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
    return path


def hub_layout_checkpoint(family: str = "llava_next", cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny checkpoint with its weights named as in the llava-hf hub checkpoints
    (`vision_tower.vision_model.*`), which vLLM loads: transformers 5 saves the tower without `vision_model`."""
    source = tiny_checkpoint(family, cache_dir)

    def build(staging: Path) -> None:
        from safetensors.torch import load_file, save_file

        shutil.copytree(source, staging)
        weights = load_file(staging / "model.safetensors")
        prefix = "vision_tower."
        renamed = {
            (prefix + "vision_model." + name[len(prefix) :] if name.startswith(prefix) else name): tensor
            for name, tensor in weights.items()
        }
        save_file(renamed, staging / "model.safetensors", metadata={"format": "pt"})

    return _cached(source.with_name(source.name + "-hub"), build)


def load_tiny(family: str = "llava_next", dtype: torch.dtype = torch.float32):
    """(model, processor) of the tiny checkpoint, loaded with `from_pretrained` like any other."""
    path = tiny_checkpoint(family)
    if family == QWEN_FAMILY:
        return load_tiny_qwen(path, dtype)
    model_class = LlavaNextForConditionalGeneration if family == "llava_next" else LlavaForConditionalGeneration
    if family == ONEVISION_FAMILY:
        model_class = LlavaOnevisionForConditionalGeneration
    model = model_class.from_pretrained(path, dtype=dtype).eval()
    return model, load_processor(path)


# -- a tiny CLIP text tower and projections, for CDPruner on the tiny models ------------------------
def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer's vocabulary with CLIP's start and end tokens around every text."""
    backend = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(CLIP_TOKENS)
    start, end = (backend.token_to_id(token) for token in CLIP_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_TOKENS[0]} $A {CLIP_TOKENS[1]}", special_tokens=[(CLIP_TOKENS[0], start), (CLIP_TOKENS[1], end)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CLIP_TOKENS[0],
        eos_token=CLIP_TOKENS[1],
        pad_token=CLIP_TOKENS[1],
        unk_token="<unk>",
    )


def build_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random `CLIPModel` checkpoint (text tower, both projections, a small vision tower of
    the tiny LLaVA tower's width) and its tokenizer to `path`, laid out like openai/clip-vit-large-patch14-336."""
    path = Path(path)
    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=2 * TINY_CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,  # CLIP's: longer questions are split into 77-token segments
        projection_dim=TINY_CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = _vision_config(2)
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=TINY_CLIP_WIDTH
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_clip_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached tiny CLIP checkpoint, built on first use."""
    return _cached(Path(cache_dir or cache_folder()) / f"tiny-clip-v{TINY_VERSION}", build_tiny_clip)


# -- a tiny LLaVA-OneVision: SigLIP 384/14 (27x27 patches, no CLS), its anyres pinpoints, a Qwen2 LM ----
ONEVISION_FAMILY = "llava_onevision"
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>", "<video>"]
# llava-hf's OneVision template: per message, its images, then its text after a newline (string content too).
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + ' ' -}}"
    "{%- if message['content'] is string -%}{{- '\n' + message['content'] -}}"
    "{%- else -%}"
    "{%- for block in message['content'] if block['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- for block in message['content'] if block['type'] == 'video' -%}{{- '<video>' -}}{%- endfor -%}"
    "{%- for block in message['content'] if block['type'] == 'text' -%}{{- '\n' + block['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def build_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny vocabulary with Qwen2's chat markers and OneVision's `<video>` as special tokens; no BOS
    (Qwen2 adds none), `<|im_end|>` ends a turn."""
    backend = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(CHATML_TOKENS)
    backend.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )


def build_tiny_onevision(path: str | os.PathLike, seed: int = 0, vision_layers: int = 4) -> Path:
    """Write a tiny LLaVA-OneVision checkpoint to `path`: a narrow SigLIP tower with the real 384x384 tiles
    and 14-px patches (27x27, no CLS), the real 36 pinpoints up to 2304x2304 and "anyres_max_9", the
    real feature layer (-1) and strategy ("full"), and a 4-layer Qwen2 language model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .workarounds import processors_without_torchvision

    path = Path(path)
    tokenizer = build_chatml_tokenizer()
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Qwen2-7B
        max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    with processors_without_torchvision():  # no video processor: the tiny model takes images
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=(384 // 14) ** 2,
            vision_feature_select_strategy="full",
            chat_template=CHATML_CHAT_TEMPLATE,
        )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    settings = {key: getattr(processor, key) for key in ("num_image_tokens", "vision_feature_select_strategy")}
    settings.update(vision_aspect_ratio=processor.vision_aspect_ratio)
    save_image_processor_parts(
        path, "LlavaOnevisionProcessor", image_processor, tokenizer, CHATML_CHAT_TEMPLATE, settings
    )
    return path


def save_image_processor_parts(
    path: Path, processor_class: str, image_processor: Any, tokenizer: Any, chat_template: str, settings: dict
) -> None:
    """Write a processor that has no video processor: save_pretrained cannot, so its parts and its own
    `settings` under `processor_class`, which `workarounds.load_processor` builds it from again."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({**settings, "processor_class": processor_class}, indent=2))


# -- a tiny Qwen2.5-VL ------------------------------------------------------------------------------
QWEN_FAMILY = "qwen2_5_vl"
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2.5-VL's preprocessor_config.json: CLIP's
QWEN_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN_MIN_PIXELS = 56 * 56  # the processor's default
QWEN_MAX_PIXELS = 1280 * 28 * 28  # the bound Qwen's model card recommends (the default allows 16384 tokens)
# Qwen2.5-VL's chat template (its images and videos as vision_start, a pad, vision_end), without the
# "Picture k:" labels it adds only when asked.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif block['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer's vocabulary with Qwen2.5-VL's special tokens and no BOS (Qwen adds none)."""
    backend = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(QWEN_SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )


def build_tiny_qwen(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint to `path`: Qwen2.5-VL's vision geometry (14-px patches, temporal
    patch 2, 2x2 merge, 112-px windows, full attention in some blocks, the last one among them) and
    processor (dynamic resolution in multiples of 28 px), a narrow 4-block tower and a 4-layer Qwen2 LM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = build_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    vision = dict(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=128,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1, 3],  # the 7B's are [7, 15, 23, 31] of 32: the last block is a full one
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(
        image_mean=QWEN_MEAN,
        image_std=QWEN_STD,
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    save_image_processor_parts(path, "Qwen2_5_VLProcessor", image_processor, tokenizer, QWEN_CHAT_TEMPLATE, {})
    return path


def load_tiny_qwen(path: Path, dtype: torch.dtype = torch.float32):
    """(model, processor) of a tiny Qwen2.5-VL checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval(), load_processor(path)
