"""Fixes for slow paths in the libraries underneath, kept apart from VisionZip itself."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn


def needs_dense_lm_head_input(device: torch.device, dtype: torch.dtype) -> bool:
    """torch 2.13's CPU bf16 matmul copies the whole LM-head weight when its input is a strided view
    (the last position: pytorch/pytorch#151934), about 1.2 s a call at 7B width in every mode.  The
    app and the benchmark (unless --stock-lm-head) feed the head a dense copy there."""
    return device.type == "cpu" and dtype == torch.bfloat16


def dense_lm_head_input(model: nn.Module) -> None:
    model.lm_head.register_forward_pre_hook(
        lambda module, args: (args[0].clone(memory_format=torch.contiguous_format),)
    )


@contextlib.contextmanager
def processors_without_torchvision() -> Iterator[None]:
    """transformers 5.24 type-checks every sub-processor of a processor, an absent one too, and the class
    it checks a video processor against exists only with torchvision installed: without it,
    `LlavaOnevisionProcessor` cannot be built or loaded even for images; with it, one cannot be built
    without a video processor (the tiny checkpoints take images only).  Inside this block an absent
    (None) sub-processor passes the check; a processor that is given one is checked as before, and
    video inputs still need torchvision."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        return None if argument is None else original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def load_processor(source: str, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained(source)`; where that fails only for want of torchvision (a
    processor with a video processor, such as LLaVA-OneVision's or Qwen2.5-VL's: an ImportError, or an
    OSError for a checkpoint saved without one), the same processor class built from the checkpoint's
    image processor, tokenizer and settings, with no video processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except (ImportError, OSError):
        if importlib.util.find_spec("torchvision") is not None:
            raise
    settings, _ = ProcessorMixin.get_processor_dict(source, **kwargs)
    processor_class = getattr(transformers, settings["processor_class"])
    accepted = inspect.signature(processor_class.__init__).parameters
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    parts = ("image_processor", "tokenizer", "video_processor", "chat_template")  # built here, not settings
    arguments = {key: value for key, value in settings.items() if key in accepted and key not in parts}
    with processors_without_torchvision():
        return processor_class(
            image_processor=AutoImageProcessor.from_pretrained(source, **kwargs),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=settings.get("chat_template") or tokenizer.chat_template,
            **arguments,
        )
