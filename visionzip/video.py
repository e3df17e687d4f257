"""Video on LLaVA-NeXT, LLaVA-1.5 and LLaVA-OneVision: every frame is one tile (no anyres grid; 336x336
and 576 tokens on CLIP-L, 384x384 and 729 on SigLIP) without reduction and the method's budget with it,
packed in time order behind "Frame k (t s):" labels (OneVision's own video path, 2x2-pooled frames
behind `<video>`, is not used: its frames would not pass through the reduction methods).

    pixels = frame_pixel_values(processor, frames)              # (F, 3, 336, 336)
    features = frame_features(handle, pixels)                   # (F, tokens_per_frame(handle), E)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = video_prompt(processor, messages, timestamps_s)      # the chat template, frames labelled
    input_ids = video_input_ids(processor, text, tokens_per_frame(handle))   # counts before any pixel
    model.generate(**video_inputs(model, input_ids, features), max_new_tokens=64)

The processor cannot expand a run of frames into placeholders, and the model's forward would pack
them as anyres images, so this module builds the placeholders and the input embeddings itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .encode import reduce_packed, reduce_tiles, stock_tile_features, tower_signals
from .methods import get_method
from .selection import ImageSelection

if TYPE_CHECKING:
    from .methods.base import TileOutput
    from .settings import Handle, Settings


def frame_pixel_values(processor: Any, frames: Sequence[Image.Image]) -> torch.Tensor:
    """(F, 3, H, W) tiles from the processor's own image processor: LLaVA-1.5's resized and
    centre-cropped image, LLaVA-NeXT's base tile (the whole frame resized to one tile)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    image_processor = processor.image_processor
    options = {}
    if getattr(image_processor, "image_grid_pinpoints", None) is not None:
        # Only the base tile is used: a one-tile grid keeps the crops it also makes to one.
        tile = image_processor.crop_size or image_processor.size  # LLaVA-OneVision sets only `size`
        options["image_grid_pinpoints"] = [[tile.height, tile.width]]
    pixel_values = image_processor(list(frames), return_tensors="pt", **options)["pixel_values"]
    return pixel_values[:, 0] if pixel_values.dim() == 5 else pixel_values


def tokens_per_frame(handle: Handle) -> int:
    """Visual tokens one frame becomes under the handle's current settings."""
    settings = handle.settings
    keeps_cls = handle.base.config.vision_feature_select_strategy != "default"
    stock = handle.side * handle.side + (handle.cls_tokens if keeps_cls else 0)  # SigLIP has none to keep
    if not settings.enabled:
        return stock
    method = get_method(settings.method)
    if method.budget_rule == "per tile":
        return method.tile_tokens(settings, handle.side)
    return method.image_tokens(settings, stock)


def frame_features(handle: Handle, pixel_values: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(F, tokens_per_frame(handle), E) projected features of (F, 3, H, W) frame tiles.

    With reduction enabled every frame is one tile for the method (a per-image method chooses among
    the frame's stock tokens), and one ImageSelection per frame (grid (0, 0), the tile's size) is
    recorded on the handle; disabled, it is stock LLaVA's per-tile path.  Frames go through the tower
    `batch_size` at a time; the frames are the tiles of one call whatever `batch_size` is (Random draws
    frame k's patches as the k-th tile of one seeded call; CDPruner normalises relevance over every frame).
    """
    if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"expected (frames, 3, H, W) pixel values, got shape {tuple(pixel_values.shape)}")
    settings = handle.settings
    tower = handle.base.vision_tower
    pixel_values = pixel_values.to(device=tower.device, dtype=tower.dtype)
    batches = [
        (start, pixel_values[start : start + batch_size]) for start in range(0, pixel_values.shape[0], batch_size)
    ]
    if settings.enabled and get_method(settings.method).budget_rule == "per tile":
        outputs = reduce_frame_tiles(handle, batches, settings)
        chunks = [output.features for output in outputs]
        # one record per frame, lazy: no host-GPU sync here
        tiles = [output.tiles[i : i + 1] for output in outputs for i in range(len(output.tiles))]
    else:
        chunks, tiles = [], []
        for _, batch in batches:
            stock = stock_tile_features(handle, batch)  # (B, P or 1 + P, E); the stock side pays for no CLS row
            if not settings.enabled:
                chunks.append(stock)
                continue
            patch_map = torch.arange(stock.shape[1]) - (stock.shape[1] - handle.side * handle.side)  # CLS -> -1
            frames = [reduce_packed(handle, frame, patch_map, 1, settings) for frame in stock]
            chunks.append(torch.stack([features for features, _ in frames]))
            tiles.extend(frame_tiles for _, frame_tiles in frames)
    features = torch.cat(chunks)
    if settings.enabled:
        tile_size = (pixel_values.shape[-2], pixel_values.shape[-1])
        method, describe = get_method(settings.method).name, settings.describe(handle.family.PRESETS_KEY)
        handle.record([ImageSelection(tile_size, (0, 0), tile, features.shape[1], method, describe) for tile in tiles])
    return features


def reduce_frame_tiles(handle: Handle, batches: list[tuple[int, torch.Tensor]], settings: Settings) -> list[TileOutput]:
    """A per-tile method on (first frame, frames) batches, as one call: a seeded draw goes on where the last
    batch left it, and a method that scales its scores over the call's tiles (CDPruner) gets their range
    over every frame, so no choice depends on the batch size."""
    method = get_method(settings.method)
    if not method.spans_call or len(batches) == 1:
        return [reduce_tiles(handle, batch, settings, first_tile=start) for start, batch in batches]
    captured = [tower_signals(handle, batch, settings, first_tile=start) for start, batch in batches]
    spans = [method.score_span(signals, settings) for signals in captured]
    span = (torch.stack([low for low, _ in spans]).min(), torch.stack([high for _, high in spans]).max())
    for signals in captured:
        signals.score_span = span
    return [method.reduce_tiles(signals, settings, handle.base.multi_modal_projector) for signals in captured]


def video_prompt(
    processor: Any,
    messages: list[dict],
    timestamps_s: Sequence[float],
    add_generation_prompt: bool = True,
) -> str:
    """The conversation through the processor's chat template, the clip standing where one
    `{"type": "video"}` content block is: one image placeholder per frame, each labelled
    "Frame k (t s): " in time order.  Later turns are plain text messages."""
    video_blocks = [
        (m, b)
        for m, message in enumerate(messages)
        if not isinstance(message["content"], str)
        for b, block in enumerate(message["content"])
        if block.get("type") == "video"
    ]
    if len(video_blocks) != 1:
        raise ValueError(f"the messages must hold exactly one {{'type': 'video'}} block, found {len(video_blocks)}")
    if not timestamps_s:
        raise ValueError("a video needs at least one frame")
    [(message_index, block_index)] = video_blocks
    expanded = [dict(message) for message in messages]
    content = list(messages[message_index]["content"])
    content[block_index : block_index + 1] = [{"type": "image"} for _ in timestamps_s]
    expanded[message_index]["content"] = content

    text = processor.apply_chat_template(expanded, add_generation_prompt=add_generation_prompt, tokenize=False)
    image_token = processor.image_token
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(timestamps_s):
        raise ValueError(
            f"the chat template wrote {len(pieces) - 1} {image_token} placeholders for {len(timestamps_s)} frames"
        )
    labelled = [
        f"Frame {k} ({seconds:.1f} s): {image_token}{piece}"
        for k, (seconds, piece) in enumerate(zip(timestamps_s, pieces[1:]), start=1)
    ]
    return pieces[0] + "".join(labelled)


def video_input_ids(processor: Any, text: str, tokens_per_frame: int) -> torch.Tensor:
    """(1, L) token ids of a `video_prompt` text with each frame's placeholder repeated
    `tokens_per_frame` times; L is the context the turn needs, known before any frame is encoded."""
    tokenizer = processor.tokenizer
    # Templates that write the BOS themselves must not get a second one.
    add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"][0]
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    repeats = torch.where(ids == image_token_id, tokens_per_frame, 1)
    return ids.repeat_interleave(repeats)[None]


def video_inputs(model: Any, input_ids: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """`inputs_embeds` and `attention_mask` for `model(**...)` / `model.generate(**...)`: the text
    embeddings with the frame placeholders replaced by `features` (F, N, E), frame by frame."""
    placeholders = input_ids == model.config.image_token_id
    if int(placeholders.sum()) != features.shape[0] * features.shape[1]:
        raise ValueError(
            f"{int(placeholders.sum())} frame placeholders in the prompt, but {features.shape[0]} frames x "
            f"{features.shape[1]} tokens of features: build both under the same VisionZip settings"
        )
    embeddings = model.get_input_embeddings()
    input_ids = input_ids.to(embeddings.weight.device)
    inputs_embeds = embeddings(input_ids)
    mask = placeholders.to(inputs_embeds.device).unsqueeze(-1).expand_as(inputs_embeds)
    inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds).reshape(-1))
    return {"inputs_embeds": inputs_embeds, "attention_mask": torch.ones_like(input_ids)}
