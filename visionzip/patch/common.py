"""What the LLaVA and LLaVA-NeXT patches share: swapping `get_image_features` and the processor's
placeholder count on the instances (never the classes)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..settings import Handle, Settings


class _Override:
    """A callable stored on a processor instance.  Processors deep-copy their `__dict__` when
    saved or printed; this one must not drag the model along."""

    def __init__(self, function: Callable) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _Override:
        return self


def install(
    handle: Handle,
    reduced_features: Callable[..., Any],
    reduced_count: Callable[[Handle, tuple[int, int], Settings], int],
) -> Callable[[], None]:
    """Route image features and placeholder counts through the handle's method when it is enabled.
    Returns the function that restores the stock methods."""
    base, processor = handle.base, handle.processor
    if "get_image_features" in base.__dict__:
        raise ValueError("VisionZip is already applied to this model: reuse its handle, or call handle.remove() first")
    stock_features = base.get_image_features

    stock_signature = inspect.signature(stock_features)  # the family's own argument order

    def get_image_features(*args: Any, **kwargs: Any):
        settings = handle.settings
        if not settings.enabled:
            return stock_features(*args, **kwargs)  # the very call stock code would make
        arguments = stock_signature.bind(*args, **kwargs).arguments
        extra = dict(arguments.pop("kwargs", {}))
        layer = arguments.get("vision_feature_layer")
        if layer not in (None, base.config.vision_feature_layer):
            raise ValueError(
                f"VisionZip was applied at vision_feature_layer={base.config.vision_feature_layer}, this call asks for {layer}"
            )
        extra.pop("return_dict", None)
        extra.pop("output_hidden_states", None)
        return reduced_features(handle, arguments["pixel_values"], arguments.get("image_sizes"), settings, **extra)

    get_image_features.__signature__ = stock_signature  # generate() picks its inputs by these names
    base.get_image_features = get_image_features
    restores = [lambda: base.__dict__.pop("get_image_features", None)]

    if processor is not None:
        stock_replace = processor.replace_image_token
        stock_counts = processor._get_num_multimodal_tokens

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            settings = handle.settings
            if not settings.enabled:
                return stock_replace(image_inputs, image_idx, **kwargs)
            sizes = image_inputs.get("image_sizes")
            size = _as_size(sizes[image_idx]) if sizes is not None else None
            return processor.image_token * reduced_count(handle, size, settings)

        def get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
            settings = handle.settings
            if not settings.enabled or image_sizes is None:
                return stock_counts(image_sizes=image_sizes, **kwargs)
            counts = [reduced_count(handle, _as_size(size), settings) for size in image_sizes]
            return type(stock_counts(image_sizes=image_sizes, **kwargs))(
                num_image_tokens=counts, num_image_patches=[1] * len(counts)
            )

        processor.replace_image_token = _Override(replace_image_token)
        processor._get_num_multimodal_tokens = _Override(get_num_multimodal_tokens)
        restores.append(lambda: processor.__dict__.pop("replace_image_token", None))
        restores.append(lambda: processor.__dict__.pop("_get_num_multimodal_tokens", None))

    def unpatch() -> None:
        for restore in restores:
            restore()

    return unpatch


def _as_size(size: Any) -> tuple[int, int]:
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    return int(size[0]), int(size[1])
