"""LLaVA-NeXT under vLLM with a reduction method: vLLM's model and processor, with the placeholder count
and the image features of the library's LLaVA-NeXT family (`visionzip.patch.llava_next`)."""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from visionzip.patch import llava_next

from .handle import LlavaNextParts
from .processing import ReducingModel, ReducingProcessingInfo, ReducingProcessor


class VisionZipLlavaNextProcessingInfo(ReducingProcessingInfo, LlavaNextProcessingInfo):
    family = llava_next


class VisionZipLlavaNextMultiModalProcessor(ReducingProcessor, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaNextMultiModalProcessor,
    info=VisionZipLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaNextForConditionalGeneration(ReducingModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images go through their reduction method (stock without options)."""

    family, parts = llava_next, LlavaNextParts
