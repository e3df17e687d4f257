"""CLIP's text tower and projections, for methods that score image patches against the question (CDPruner).

No LLaVA checkpoint holds them.  `load_clip_text(source)` reads them with `from_pretrained` from a
local folder or a hub id, as the CDPruner authors do (`CLIPTextModelWithProjection`, its tokenizer,
and the `visual_projection` of `CLIPVisionModelWithProjection`, all float32).  `clip_text_for(config)`
picks the one a LLaVA model pairs with and keeps it loaded: $VISIONZIP_CLIP if set, the tiny random
CLIP of `visionzip.tiny` for the tiny models' tower width, else openai/clip-vit-large-patch14-336.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLIP_L_336 = "openai/clip-vit-large-patch14-336"
CLIP_L_WIDTH = 1024  # CLIP-L/14's vision width: the tower of every llava-hf LLaVA-1.5 / NeXT checkpoint


@dataclass
class ClipText:
    """CLIP's text side and visual projection, in float32."""

    source: str  # the folder or hub id it was loaded from
    label: str  # what a page says it is: the hub id or folder, or the tiny random one
    tokenizer: Any
    text_model: nn.Module  # CLIPTextModelWithProjection
    visual_projection: nn.Linear  # vision width -> projection width, no bias

    def embed_text(self, text: str, device: torch.device) -> torch.Tensor:
        """(M, P) text embeddings of `text`: as the authors, past the tower's 77 positions the ids are
        zero-padded to a multiple of 77 and split, one embedding per segment (M = 1 for short text).

        A short text runs at its own length, not padded to 77 as the authors do: the padding is masked
        and lies after every real token, which attend causally, so the embedding (read at the last
        token, EOS) is the same up to float rounding, and the fp32 tower costs 2-4x less on a CPU."""
        encoded = self.tokenizer([text], return_tensors="pt")
        length = encoded["input_ids"].shape[1]
        width = min(length, self.text_model.config.max_position_embeddings)  # a segment's positions
        padding = width * ((length - 1) // width + 1) - length
        inputs = {
            key: torch.cat([encoded[key], encoded[key].new_zeros(1, padding)], dim=1).reshape(-1, width).to(device)
            for key in ("input_ids", "attention_mask")
        }
        with torch.no_grad():
            return self.text_model.to(device)(**inputs).text_embeds

    def embed_patches(self, normed: torch.Tensor) -> torch.Tensor:
        """(..., C) post-layernormed patch states -> (..., P) CLIP image embeddings, in float32 or wider."""
        dtype = torch.promote_types(normed.dtype, torch.float32)
        weight = self.visual_projection.weight.to(device=normed.device, dtype=dtype)
        return nn.functional.linear(normed.to(dtype), weight)


def load_clip_text(source: str | os.PathLike, label: str | None = None) -> ClipText:
    """CLIP's text tower, tokenizer and visual projection from a local folder or a hub id (float32, eval)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    source = str(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        text_model = CLIPTextModelWithProjection.from_pretrained(source, dtype=torch.float32).eval()
        # The visual projection comes with the whole vision tower; only the projection is kept.
        projection = CLIPVisionModelWithProjection.from_pretrained(source, dtype=torch.float32).visual_projection
    except OSError as error:
        raise ValueError(
            f"CDPruner needs CLIP's text tower and projections, which no LLaVA checkpoint holds: could not load "
            f"{source!r} ({error}). Download {CLIP_L_336} or point $VISIONZIP_CLIP at a local copy."
        ) from error
    text_model.requires_grad_(False)
    projection.requires_grad_(False)
    # a page shows the label: a local folder by its name, never the server's path to it
    shown = label or (Path(source).name if Path(source).exists() else str(source))
    return ClipText(source, shown, tokenizer, text_model, projection.eval())


_LOADED: dict[str, ClipText] = {}
_LOCK = threading.Lock()


def clip_text_for(vision_config: Any) -> ClipText:
    """The CLIP text side for a LLaVA vision tower of this config, loaded on first use and kept."""
    from . import tiny

    source, label = os.environ.get("VISIONZIP_CLIP"), None
    width = vision_config.hidden_size
    if source is None and width == tiny.TINY_CLIP_WIDTH:
        source, label = str(tiny.tiny_clip_checkpoint()), tiny.TINY_CLIP_LABEL
    elif source is None and width == CLIP_L_WIDTH:
        source = CLIP_L_336
    elif source is None:
        raise ValueError(f"no CLIP text tower is known for a vision tower of width {width}: set $VISIONZIP_CLIP")
    with _LOCK:  # one load per source, even when two chats ask at once
        if source not in _LOADED:
            _LOADED[source] = load_clip_text(source, label)
    clip = _LOADED[source]
    if clip.visual_projection.in_features != width:
        raise ValueError(
            f"{clip.label}'s visual projection takes width {clip.visual_projection.in_features}, "
            f"this model's vision tower has {width}"
        )
    return clip
