"""What every reducing model family shares under vLLM: the processor's placeholder counts (the server's, or a
request's), the settings each image carries to the model, and the model's image path grouped by them.

vLLM hands a request's `mm_processor_kwargs` to the multimodal processor only; the model's `embed_multimodal`
receives just the tensors the processor returned for each image. So the processor checks the request's
"visionzip" options, counts the image's placeholders by them, and returns them as one more per-image tensor
(`SETTINGS_FIELD`), which vLLM batches, caches (its keys hash the request's processor kwargs) and passes
to the model with the pixels."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from visionzip.core import checked_settings
from visionzip.settings import Settings

from .handle import CountingHandle, LlavaParts, VllmHandle
from .options import (
    OPTIONS_KEY,
    SETTINGS_FIELD,
    allows_requests,
    decode_settings,
    encode_settings,
    request_settings,
    server_settings,
)


class ReducingProcessingInfo:
    """Mixed in before a vLLM `ProcessingInfo`: placeholder counts under the server's settings (what vLLM
    profiles its encoder and KV budgets with) or under a request's, which may not exceed them."""

    family: ModuleType  # the library's family module (`visionzip.patch.*`)

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(OPTIONS_KEY, None)  # ours, not an argument of the HF processor
        return super().get_hf_processor(**kwargs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        settings = server_settings(self.get_hf_config())
        if settings is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.image_tokens((image_height, image_width), settings)

    def image_tokens(self, size: tuple[int, int], settings: Settings) -> int:
        """Placeholders of an image of `size` (height, width) under `settings`; stock by vLLM's own count."""
        if not settings.enabled:
            return super().get_num_image_tokens(image_width=size[1], image_height=size[0])
        return self.family.reduced_count(self.counting_handle(), size, settings)

    def counting_handle(self) -> CountingHandle:
        return CountingHandle(self.get_hf_config(), self.get_hf_processor(), self.family)

    def image_settings(self, request: Any, size: tuple[int, int]) -> Settings:
        """The settings an image of `size` runs under: the server's, or the request's options (checked, and
        at most the server's count for this image); a ValueError, which the API answers with 400, otherwise."""
        config = self.get_hf_config()
        server = server_settings(config)
        if request is None:
            return server
        if not allows_requests(config):
            raise ValueError(
                f'this server runs {server.describe()} for every request (started without "per_request": true), '
                f'so a request cannot choose its own with mm_processor_kwargs["{OPTIONS_KEY}"]'
            )
        settings = request_settings(request)
        if settings.enabled:
            settings = checked_settings(settings, self.counting_handle())
        count, ceiling = self.image_tokens(size, settings), self.image_tokens(size, server)
        if count > ceiling:
            raise ValueError(
                f"{settings.describe()} gives this {size[0]}x{size[1]} image {count} tokens, more than the {ceiling} "
                f"of the server's {server.describe()}, which its KV cache and encoder budget are sized for"
            )
        return settings


def image_items(mm_items: Any) -> ImageProcessorItems | ImageEmbeddingItems | None:
    if "image" not in mm_items:
        return None
    return mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))


def item_size(images: ImageProcessorItems, index: int) -> tuple[int, int]:
    size = images.get_image_size(index)
    return (size.height, size.width)


class ReducingProcessor:
    """Mixed in before a vLLM multimodal processor: each image's settings as a tensor for the model, and
    its placeholders counted by them."""

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]):
        request = hf_kwargs.get(OPTIONS_KEY)
        hf_kwargs = {key: value for key, value in hf_kwargs.items() if key != OPTIONS_KEY}
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if request is not None and "video" in mm_items:
            raise ValueError("the plugin reduces images; a request with a video cannot choose a reduction")
        if server_settings(self.info.get_hf_config()) is None:
            if request is not None:
                raise ValueError(
                    f'this server runs the stock model: mm_processor_kwargs["{OPTIONS_KEY}"] is not served'
                )
            return processed
        images = image_items(mm_items)  # None when every image came from vLLM's processor cache
        if images is None:
            return processed
        if isinstance(images, ImageEmbeddingItems):
            if request is not None:
                raise ValueError("image embeddings are passed through as given: a request cannot reduce them")
            return processed
        rows = [encode_settings(self.info.image_settings(request, item_size(images, i))) for i in range(len(images))]
        processed[SETTINGS_FIELD] = torch.tensor(rows, dtype=torch.int64)  # (images, 7)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[SETTINGS_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        request, images = hf_processor_mm_kwargs.get(OPTIONS_KEY), image_items(mm_items)
        if request is None or not isinstance(images, ImageProcessorItems):
            return updates  # the server's count (get_num_image_tokens), or an embedding's own length
        image_token = self.info.get_hf_config().image_token_index

        def replacement(index: int) -> list[int]:
            size = item_size(images, index)
            return [image_token] * self.info.image_tokens(size, self.info.image_settings(request, size))

        return [
            PromptReplacement(modality="image", target=update.target, replacement=replacement)
            if update.modality == "image"
            else update  # OneVision's videos: stock
            for update in updates
        ]


class ReducingModel:
    """Mixed in before a vLLM LLaVA model class: each image through the settings it came with, images of
    the same settings in one call of the library's family code; stock models stay stock."""

    family: ModuleType
    parts: type[LlavaParts]

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = server_settings(self.config)
        self.visionzip = None if settings is None else VllmHandle(self, settings, self.family, self.parts(self))

    def embed_multimodal(self, **kwargs: object):
        rows = kwargs.pop(SETTINGS_FIELD, None)  # (images, 7), or one (7,) row each
        image_input = None if rows is None else self._parse_and_validate_image_input(**kwargs)
        if self.visionzip is None or image_input is None or image_input["type"] != "pixel_values":
            return super().embed_multimodal(**kwargs)
        return self.embed_images(image_input, rows)

    def embed_images(self, image_input: Any, rows: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The images' features, each under the settings of its row."""
        rows = rows if isinstance(rows, torch.Tensor) else torch.stack(list(rows))
        features = self.image_features(image_input, [decode_settings(row) for row in rows.tolist()])
        self.visionzip.last_image_tokens = [image.shape[0] for image in features]
        return features

    def image_features(self, image_input: Any, settings: list[Settings]) -> list[torch.Tensor]:
        """(tokens, hidden) per image, tokens = the placeholders its settings reserved."""
        pixel_values, sizes = image_input["pixel_values"], image_input.get("image_sizes")
        groups: dict[Settings, list[int]] = {}
        for index, image_settings in enumerate(settings):
            groups.setdefault(image_settings, []).append(index)
        features: list[torch.Tensor | None] = [None] * len(settings)
        for group_settings, indices in groups.items():
            # a tensor (images, [tiles,] 3, H, W), or a list of (tiles, 3, H, W) when images differ in tiles
            if isinstance(pixel_values, torch.Tensor):
                pixels = pixel_values[indices]
            else:
                pixels = [pixel_values[index] for index in indices]
            group_sizes = None if sizes is None else sizes[indices]
            if group_settings.enabled:
                stacked = pixels if isinstance(pixels, torch.Tensor) else torch.cat(pixels)
                output = self.family.reduced_image_features(self.visionzip, stacked, group_sizes, group_settings)
                group_features = output.pooler_output
            else:  # vLLM's own stock path
                stock_input = {"type": "pixel_values", "pixel_values": pixels, "image_sizes": group_sizes}
                group_features = self._process_image_input(stock_input)
            for index, image in zip(indices, group_features):
                features[index] = image
        return features
