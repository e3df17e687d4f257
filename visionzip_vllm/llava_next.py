"""LLaVA-NeXT under vLLM with a reduction method: vLLM's model and processor, with the placeholder count
and the image features of the library's LLaVA-NeXT family (`visionzip.patch.llava_next`)."""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from visionzip.patch import llava_next as family

from .handle import CountingHandle, VllmHandle
from .options import server_settings


class VisionZipLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Reserves the reduced count of placeholder tokens (and so of KV blocks) for each image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        settings = server_settings(config)
        if settings is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        counter = CountingHandle(config, self.get_hf_processor())
        return family.reduced_count(counter, (image_height, image_width), settings)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=VisionZipLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images go through the server's reduction method (stock without options)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = server_settings(self.config)
        self.visionzip = None if settings is None else VllmHandle(self, settings)

    def _process_image_input(self, image_input) -> torch.Tensor | list[torch.Tensor]:
        if self.visionzip is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]  # (images, max tiles, 3, H, W), or one (tiles, 3, H, W) each
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.cat(list(pixel_values))  # each image's real tiles, in order
        sizes = image_input["image_sizes"]  # (images, 2): height, width
        output = family.reduced_image_features(self.visionzip, pixel_values, sizes, self.visionzip.settings)
        return list(output.pooler_output)  # (tokens, hidden) per image, tokens = the reserved count
