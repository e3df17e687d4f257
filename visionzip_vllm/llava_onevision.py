"""LLaVA-OneVision under vLLM with a reduction method: vLLM's model and processor (SigLIP tower, no CLS), with
the placeholder count and the image features of the library's OneVision family
(`visionzip.patch.llava_onevision`). Videos stay stock. vLLM packs every image of a prompt as an anyres
image, and so does the plugin: the library's refusal of several images in one transformers prompt (there
each is a lone tile) does not apply."""

from __future__ import annotations

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from visionzip.patch import llava_onevision

from .handle import LlavaOnevisionParts
from .options import SETTINGS_FIELD
from .processing import ReducingModel, ReducingProcessingInfo, ReducingProcessor


class VisionZipLlavaOnevisionProcessingInfo(ReducingProcessingInfo, LlavaOnevisionProcessingInfo):
    family = llava_onevision


class VisionZipLlavaOnevisionMultiModalProcessor(ReducingProcessor, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaOnevisionMultiModalProcessor,
    info=VisionZipLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class VisionZipLlavaOnevisionForConditionalGeneration(ReducingModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision whose images go through their reduction method (stock without options)."""

    family, parts = llava_onevision, LlavaOnevisionParts

    def embed_multimodal(self, **kwargs: object):
        rows = kwargs.pop(SETTINGS_FIELD, None)
        if self.visionzip is None or rows is None:
            return LlavaOnevisionForConditionalGeneration.embed_multimodal(self, **kwargs)
        embeddings = ()  # images and videos in the order of vLLM's inputs, as the stock model returns them
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image" and inputs["type"] == "pixel_values":
                embeddings += tuple(self.embed_images(inputs, rows))
            elif modality == "image":
                embeddings += tuple(self._process_image_input(inputs))
            else:
                embeddings += tuple(self._process_video_pixels(inputs))
        return embeddings
