"""The registry's memory policy, on the CPU with the GPU's memory figures simulated: when a model
does not fit, the least recently used ones are unloaded until it does, the page stops listing
them, and a GPU task that still asks for one is told why it is gone."""

from types import SimpleNamespace

import pytest
import torch

import app.models
from app.models import TINY, TINY_15_LABEL, TINY_LABEL, ModelLoadError, ModelRegistry
from app.render import models_markdown

COPY = "Tiny LLaVA-NeXT, second copy"
CUDA = torch.device("cuda", 0)


@pytest.fixture
def registry():
    """Three tiny models loaded on the CPU, used in the order copy, LLaVA-1.5, LLaVA-NeXT, copy:
    least recently used first, that is LLaVA-1.5, LLaVA-NeXT, copy."""
    registry = ModelRegistry(device="cpu")
    registry.choices[COPY] = TINY + "llava_next"
    for label in (COPY, TINY_15_LABEL, TINY_LABEL, COPY):
        registry.get(label)
    return registry


def loaded_bytes(registry: ModelRegistry) -> int:
    return sum(model.weight_bytes for model in registry.loaded())


def room_for(registry: ModelRegistry, unloaded: list[str]) -> int:
    """A model size that fits a full GPU only once exactly the models `unloaded` are gone."""
    sizes = {model.label: model.weight_bytes for model in registry.loaded()}
    return int(sum(sizes[label] for label in unloaded) / 1.2) - 1


def test_a_model_that_does_not_fit_unloads_the_least_recently_used(registry, monkeypatch):
    capacity = loaded_bytes(registry)  # the GPU is exactly full
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (capacity - loaded_bytes(registry), capacity))

    registry._make_room(room_for(registry, [TINY_15_LABEL, TINY_LABEL]), CUDA)

    assert [model.label for model in registry.loaded()] == [COPY]
    assert TINY_15_LABEL not in models_markdown(registry) and COPY in models_markdown(registry)
    with pytest.raises(ModelLoadError, match="unloaded to make room"):
        registry.ready(TINY_15_LABEL)


def test_on_zerogpu_the_slice_is_counted_against_the_loaded_weights(registry, monkeypatch):
    """ZeroGPU's server process holds no GPU memory (mem_get_info there is a constant), and each GPU
    call receives every loaded model: the slice's size less the loaded weights is what is free."""
    capacity = loaded_bytes(registry)

    def refuse(device):
        raise AssertionError("mem_get_info says nothing on ZeroGPU")

    monkeypatch.setattr(app.models, "ON_ZEROGPU", True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=capacity))

    needed = room_for(registry, [TINY_15_LABEL])
    registry._make_room(needed, CUDA)
    assert [model.label for model in registry.loaded()] == [TINY_LABEL, COPY]
    registry._make_room(needed, CUDA)  # it fits now: nothing more goes
    assert [model.label for model in registry.loaded()] == [TINY_LABEL, COPY]
