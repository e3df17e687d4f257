"""Run by tests/test_fast_processor.py in the vLLM venv, which has torchvision (so transformers 5 loads the
default, torchvision-backed "fast" image processors, as any GPU install does) and a torch that runs on
this CPU.  For each family the job (JSON on stdin) names, whose tiny checkpoint the calling test built in
VISIONZIP_CACHE, it loads the model as the app does (`app.models.ModelRegistry`) and reports, as one JSON line
on stdout ("RESULT {...}"): the processor classes the app and `AutoImageProcessor` picked, and for each image
size and method budget of the job, the predicted count, the prompt's placeholders and the features produced.
With "frame_pairs" in the job, it also runs the app's frame-pair video processor (visionzip.workarounds, PIL, used
where torchvision is missing) and Qwen2-VL's own torchvision video processor on the same clips and reports their
grids and mean pixel difference.  The calling test asserts; this script only measures."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from app.models import ModelRegistry
from visionzip.tiny import tiny_checkpoint

QUESTION = "What is in the picture?"


def image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def image_features(model, inputs) -> int:
    """Rows the model's get_image_features produces for the prompt's one image."""
    if "image_grid_thw" in inputs:  # Qwen2.5-VL
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    else:
        output = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return int(output.pooler_output[0].shape[0])


def counts(loaded, sizes, budgets) -> list[dict]:
    handle, processor, model = loaded.handle, loaded.processor, loaded.model
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    rows = []
    for index, size in enumerate(sizes):
        for method, budget in [("full", None), *budgets.items()]:
            use = dict(enabled=False) if budget is None else dict(enabled=True, method=method, **budget)
            with torch.inference_mode(), handle.use(**use):
                predicted = handle.num_image_tokens(size)
                inputs = processor(images=[image(*size, seed=index)], text=prompt, return_tensors="pt")
                placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
                produced = image_features(model, inputs)
            rows.append(
                dict(size=list(size), method=method, predicted=predicted, placeholders=placeholders, produced=produced)
            )
    return rows


def frame_pairs(clips: list[list[int]]) -> list[dict]:
    """For each [frames, H, W, seed]: both video processors' grids and their mean absolute pixel difference."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from visionzip.workarounds import FramePairVideoProcessor

    images = Qwen2VLImageProcessorPil.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")))
    stock = Qwen2VLVideoProcessor(
        size=dict(images.size), image_mean=images.image_mean, image_std=images.image_std, cap_pixels_per_frame=False
    )
    rows = []
    for frames, height, width, seed in clips:
        clip = [image(height, width, seed * 100 + k) for k in range(frames)]
        ours, theirs = FramePairVideoProcessor(images)(clip), stock(clip, return_tensors="pt")
        difference = (ours["pixel_values_videos"] - theirs["pixel_values_videos"]).abs().mean()
        rows.append(
            dict(
                clip=[frames, height, width],
                ours=ours["video_grid_thw"].tolist(),
                theirs=theirs["video_grid_thw"].tolist(),
                mean_difference=float(difference),
            )
        )
    return rows


def main() -> None:
    """The job on stdin: {family: {label, sizes: [[H, W], ...], budgets: {method: handle.use() budget}}}, and
    optionally "frame_pairs": [[frames, H, W, seed], ...]."""
    registry = ModelRegistry(device="cpu")
    job = json.load(sys.stdin)
    report = {"frame_pairs": frame_pairs(job.pop("frame_pairs"))} if "frame_pairs" in job else {}
    for family, case in job.items():
        loaded = registry.get(case["label"])
        sizes, budgets = [tuple(size) for size in case["sizes"]], case["budgets"]
        source = str(tiny_checkpoint(family))  # where the registry loaded it from (the calling test built it)
        picked = type(loaded.processor.image_processor)
        auto = type(AutoImageProcessor.from_pretrained(source))
        with open(f"{source}/preprocessor_config.json") as file:
            saved_type = json.load(file).get("image_processor_type")
        report[family] = dict(
            app_image_processor=picked.__name__,
            app_bases=[base.__name__ for base in picked.__mro__],
            auto_image_processor=auto.__name__,
            saved_type=saved_type,
            counts=counts(loaded, sizes, budgets),
        )
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
