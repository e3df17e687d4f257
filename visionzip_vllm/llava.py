"""LLaVA-1.5 under vLLM with a reduction method: vLLM's model and processor, with the placeholder count and
the image features of the library's LLaVA family (`visionzip.patch.llava`): one 336x336 tile per image."""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from visionzip.patch import llava

from .handle import LlavaParts
from .processing import ReducingModel, ReducingProcessingInfo, ReducingProcessor


class VisionZipLlavaProcessingInfo(ReducingProcessingInfo, LlavaProcessingInfo):
    family = llava


class VisionZipLlavaMultiModalProcessor(ReducingProcessor, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaMultiModalProcessor,
    info=VisionZipLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaForConditionalGeneration(ReducingModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose images go through their reduction method (stock without options)."""

    family, parts = llava, LlavaParts
