"""The library's handle (`visionzip.settings.Handle`) over a vLLM LLaVA model, so the library's own family
code (`visionzip.patch.llava_next`, `visionzip.patch.llava`) runs the method on vLLM's vision tower and
projector."""

from __future__ import annotations

import contextlib
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from visionzip.core import checked_settings
from visionzip.selection import ImageSelection
from visionzip.settings import Call, Settings
from visionzip.tower import SignalHooks, encoder_layers, feature_layer_index


def patches_per_side(config: Any) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def cls_tokens(config: Any) -> int:
    """CLS tokens a tile: one for CLIP, none for SigLIP (LLaVA-OneVision)."""
    return 0 if config.vision_config.model_type == "siglip_vision_model" else 1


class LlavaParts:
    """vLLM's LLaVA parts under the names the family code reads of transformers' `LlavaModel`."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self.config = model.config
        self.vision_tower = model.vision_tower  # called without select_layers: the feature layer's output, CLS kept

    def multi_modal_projector(self, features: torch.Tensor) -> torch.Tensor:
        # vLLM's CPU linear layers (oneDNN) need rows of unit stride; a method may pass a view (Pool's, one tile)
        return self._model.multi_modal_projector(features.contiguous())


class LlavaNextParts(LlavaParts):
    """vLLM's LLaVA-NeXT parts under the names the family code reads of transformers' `LlavaNextModel`;
    the per-image methods pack with transformers' own `pack_image_features` (config and newline only)."""

    @property
    def image_newline(self) -> nn.Parameter:
        return self._model.image_newline

    def pack_image_features(self, *args: Any, **kwargs: Any):
        return LlavaNextModel.pack_image_features(self, *args, **kwargs)


class LlavaOnevisionParts(LlavaNextParts):
    """vLLM's LLaVA-OneVision parts; the per-image methods pack with transformers' OneVision packing."""

    def pack_image_features(self, *args: Any, **kwargs: Any):
        return LlavaOnevisionModel.pack_image_features(self, *args, **kwargs)


class CountingHandle:
    """What the family's counts and `checked_settings` read, on the processor's side: the config, the family,
    the tile side, the CLS count and the HF processor (for stock counts)."""

    def __init__(self, config: Any, processor: Any, family: ModuleType) -> None:
        self.base = SimpleNamespace(config=config)
        self.processor, self.family = processor, family
        self.side, self.cls_tokens = patches_per_side(config), cls_tokens(config)


class VllmHandle:
    """The library's handle on one vLLM model: signal hooks on its tower's feature layer (vLLM builds the
    tower only up to that layer), the server's `Settings`, and the features of the last images; each image's
    settings come with it (`visionzip_vllm.processing`), so there are no per-call settings."""

    def __init__(self, model: nn.Module, settings: Settings, family: ModuleType, base: LlavaParts) -> None:
        config = model.config
        self.model, self.processor, self.base, self.family = model, None, base, family
        self.side, self.cls_tokens = patches_per_side(config), cls_tokens(config)
        layers = encoder_layers(model.vision_tower)
        self.layer_index = feature_layer_index(config.vision_feature_layer, config.vision_config.num_hidden_layers)
        if self.layer_index != len(layers) - 1:
            raise ValueError(
                f"expected vLLM's tower to end at the feature layer {self.layer_index}, it has {len(layers)} layers"
            )
        attention = layers[self.layer_index].self_attn
        if getattr(attention, "num_heads_per_partition", attention.num_heads) != attention.num_heads:
            raise ValueError("VisionZip needs all heads of the tower's attention on one rank: no tensor-parallel tower")
        self._settings = checked_settings(settings, self)
        self._hooks = SignalHooks(layers[self.layer_index], self.cls_tokens)
        self.last_selection: list[ImageSelection] | None = None
        self.last_image_tokens: list[int] | None = None  # features per image of the last image batch

    @property
    def settings(self) -> Settings:
        return self._settings

    def capture(self, attention: bool = True):
        return self._hooks.capture(attention)

    def current_call(self) -> Call | None:
        return None  # each image brings its own settings

    def record(self, selection: list[ImageSelection]) -> None:
        self.last_selection = selection

    def remove(self) -> None:
        self._hooks.remove()

    @contextlib.contextmanager
    def use(self, *args: Any, **kwargs: Any):
        raise TypeError(
            "a vLLM server's reduction is chosen when it starts (--hf-overrides) or by a request's "
            "mm_processor_kwargs, not per call"
        )
        yield


def last_image_tokens(model: nn.Module) -> list[int] | None:
    """The features the plugin produced per image of the model's last image batch, None for a stock model;
    for `LLM.apply_model`, which runs it where the model is (an importable function, so it pickles)."""
    handle = getattr(model, "visionzip", None)
    return None if handle is None else handle.last_image_tokens


def tower_signals(model: nn.Module, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature layer's signals (CLS attention, head-mean keys, output) of (T, 3, H, W) tiles as the
    plugin reads them on vLLM's tower; for `LLM.apply_model` (comparing them with transformers')."""
    with torch.inference_mode(), model.visionzip.capture(attention=True) as signals:
        model.vision_tower(tiles.to(model.image_newline.dtype))
    return {"cls_attn": signals.cls_attn, "keys_mean": signals.keys_mean, "hidden": signals.hidden}
