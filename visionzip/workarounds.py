"""Fixes for slow paths in the libraries underneath, kept apart from VisionZip itself."""

from __future__ import annotations

import torch
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
