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
    image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    with processors_without_torchvision():
        processor = processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=settings.get("chat_template") or tokenizer.chat_template,
            **arguments,
        )
    if getattr(image_processor, "temporal_patch_size", None):  # Qwen2.5-VL's: frames from its image processor
        processor.video_processor = FramePairVideoProcessor(image_processor)
    return processor


class FramePairVideoProcessor(transformers.utils.PushToHubMixin):  # the mixin: processors print its to_dict()
    """Qwen2-VL's video processor where transformers cannot build it (it needs torchvision): the same
    outputs from the checkpoint's image processor.  Each frame is resized, rescaled and normalised by
    the image processor (PIL, its own pixel bounds, which the real checkpoints' video processor also
    loads from their preprocessor config) and patchified as a still image, whose rows hold the frame
    `temporal_patch_size` times; frame pairs then fill those temporal slots in turn, an odd last frame
    repeated, as `Qwen2VLVideoProcessor.patchify` does.  Its resampling (PIL bicubic on uint8) differs
    from torchvision's on tensors by rounding, so pixels may differ slightly; shapes and grids agree."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.size = image_processor.size
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size

    def __call__(self, videos: Any, video_metadata: Any = None, return_tensors: Any = None, **kwargs: Any):
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import VideoMetadata, make_batched_videos

        clips = make_batched_videos(videos)  # (F, H, W, C) arrays
        if video_metadata is None:
            video_metadata = [None] * len(clips)
        elif not isinstance(video_metadata, (list, tuple)):
            video_metadata = [video_metadata]
        pixels, grids, metadata = [], [], []
        for clip, meta in zip(clips, video_metadata, strict=True):
            rows, grid = self.clip_patches(list(clip))
            pixels.append(rows)
            grids.append(grid)
            meta = VideoMetadata(**meta) if isinstance(meta, dict) else meta
            metadata.append(meta if meta is not None else VideoMetadata(total_num_frames=len(clip)))
        data = {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature(data={**data, "video_metadata": metadata}, tensor_type=None)

    def clip_patches(self, frames: list) -> tuple[torch.Tensor, list[int]]:
        """(T * N, C * tps * P * P) rows and [T, gh, gw] of one clip's frames."""
        out = self.image_processor(frames, return_tensors="pt")
        _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
        temporal, patch = self.temporal_patch_size, self.patch_size
        cells = grid_h * grid_w
        # (F, N, C, tps, P*P): each frame's patches, its temporal slots all alike; keep one slot per frame
        still = out["pixel_values"].view(len(frames), cells, -1, temporal, patch * patch)[:, :, :, 0]
        if pad := -len(frames) % temporal:
            still = torch.cat([still, still[-1:].expand(pad, -1, -1, -1)])
        slices = still.shape[0] // temporal  # (T, tps, N, C, P*P) -> (T, N, C, tps, P*P)
        paired = still.view(slices, temporal, cells, -1, patch * patch).permute(0, 2, 3, 1, 4)
        return paired.reshape(slices * cells, -1), [slices, grid_h, grid_w]

    def to_dict(self) -> dict[str, Any]:
        return {"video_processor_type": type(self).__name__, "from": type(self.image_processor).__name__}

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        bounds = (self.size["shortest_edge"], self.size["longest_edge"])
        resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=bounds[0], max_pixels=bounds[1])
        slices = -(-num_frames // self.temporal_patch_size)
        return slices * (resized_h // self.patch_size) * (resized_w // self.patch_size)
