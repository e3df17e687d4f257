"""Tuned projectors at run time: the file format, loading one checked against a model, and using
it per call.

    tuned = load_projector(model, "runs/llava-64/projector.safetensors")
    with use_projector(model, tuned):      # this thread / asyncio task only
        model.generate(**inputs)           # every other caller keeps the base projector

`use_projector` routes the projector per call through a ContextVar (like `VisionZip.use`), so one
model serves "VisionZip" and "VisionZip + tuned projector" to concurrent requests without copying
the model or swapping weights under a running call.  Enter it inside the thread that runs the model.
The trainer that writes these files is `visionzip.tune` (`python -m visionzip.tune`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .budget import Budget

FORMAT = "visionzip-projector/1"


@dataclass(frozen=True)
class ProjectorInfo:
    """What a tuned projector file records about its training."""

    base_model: str  # the id or path the base model was loaded from
    model_type: str  # "llava" or "llava_next"
    vision_hidden_size: int
    text_hidden_size: int
    budget: Budget  # VisionZip (dominant, contextual) per tile it was trained under
    merge: str
    steps: int

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "model_type": self.model_type,
            "vision_hidden_size": str(self.vision_hidden_size),
            "text_hidden_size": str(self.text_hidden_size),
            "dominant": str(self.budget.dominant),
            "contextual": str(self.budget.contextual),
            "merge": self.merge,
            "steps": str(self.steps),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, source: str) -> ProjectorInfo:
        if not metadata or metadata.get("format") != FORMAT:
            raise ValueError(f"{source} is not a VisionZip tuned projector (no '{FORMAT}' metadata)")
        return cls(
            metadata["base_model"],
            metadata["model_type"],
            int(metadata["vision_hidden_size"]),
            int(metadata["text_hidden_size"]),
            Budget(int(metadata["dominant"]), int(metadata["contextual"])),
            metadata["merge"],
            int(metadata["steps"]),
        )


@dataclass
class TunedProjector:
    module: nn.Module  # a copy of the model's projector holding the tuned weights
    info: ProjectorInfo


def _base_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    base = inner if hasattr(inner, "multi_modal_projector") else model
    if not hasattr(base, "multi_modal_projector"):
        raise TypeError(f"{type(model).__name__} has no multi_modal_projector")
    return base


def _model_info(model: nn.Module, budget: Budget, merge: str, steps: int) -> ProjectorInfo:
    config = _base_model(model).config
    return ProjectorInfo(
        base_model=str(getattr(model, "name_or_path", "") or config._name_or_path),
        model_type=config.model_type,
        vision_hidden_size=config.vision_config.hidden_size,
        text_hidden_size=config.text_config.hidden_size,
        budget=budget,
        merge=merge,
        steps=steps,
    )


def save_projector(model: nn.Module, path: str | Path, budget: Budget, merge: str, steps: int) -> Path:
    """Write the model's projector alone (fp32 safetensors) with what it was trained for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    projector = _base_model(model).multi_modal_projector
    tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in projector.state_dict().items()}
    save_file(tensors, str(path), metadata=_model_info(model, budget, merge, steps).to_metadata())
    return path


def load_projector(model: nn.Module, path: str | Path, *, strict: bool = False) -> TunedProjector:
    """A tuned projector for `model`, checked against it; the model itself is left untouched.

    Refuses a projector saved for other hidden sizes; for another base model id (the same model can
    live at another path) warns, or refuses when `strict`."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as file:
        info = ProjectorInfo.from_metadata(file.metadata(), str(path))
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    expected = _model_info(model, info.budget, info.merge, info.steps)
    sizes = (info.vision_hidden_size, info.text_hidden_size)
    model_sizes = (expected.vision_hidden_size, expected.text_hidden_size)
    if sizes != model_sizes:
        raise ValueError(
            f"{path} was trained for a model with vision/text hidden sizes {sizes} "
            f"({info.base_model}); this model has {model_sizes} ({expected.base_model})"
        )
    if info.base_model != expected.base_model:
        message = f"{path} was trained on base model {info.base_model!r}, this model is {expected.base_model!r}"
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)

    base = _base_model(model).multi_modal_projector
    module = copy.deepcopy(base)
    module.__dict__.pop("forward", None)  # a copied instance forward would still run the original's weights
    reference = next(base.parameters())
    try:
        module.load_state_dict({name: tensor.to(reference.dtype) for name, tensor in tensors.items()})
    except RuntimeError as error:  # same hidden sizes, another projector design
        raise ValueError(f"{path} does not fit {type(base).__name__}: {error}") from None
    return TunedProjector(module.to(reference.device).eval().requires_grad_(False), info)


_PROJECTOR_OVERRIDES: ContextVar[dict[nn.Module, nn.Module] | None] = ContextVar("visionzip_projector", default=None)


@contextlib.contextmanager
def use_projector(model: nn.Module, projector: TunedProjector | nn.Module | None) -> Iterator[None]:
    """Run `model`'s multimodal projector as `projector` (None: the base one) for the calls made
    inside this block, in this thread or asyncio task only (contextvars do not follow a new
    `threading.Thread`: enter the block inside it).  Base weights are never modified."""
    base = _base_model(model).multi_modal_projector
    if not getattr(base.__dict__.get("forward"), "routes_projector", False):
        stock_forward = base.forward  # the class's, or one wrapped by accelerate's hooks

        def forward(*args: Any, **kwargs: Any) -> Any:
            override = (_PROJECTOR_OVERRIDES.get() or {}).get(base)
            return override(*args, **kwargs) if override is not None else stock_forward(*args, **kwargs)

        forward.routes_projector = True
        base.forward = forward  # an instance attribute: the class and other models are untouched
    module = projector.module if isinstance(projector, TunedProjector) else projector
    overrides = dict(_PROJECTOR_OVERRIDES.get() or {})
    if module is None:
        overrides.pop(base, None)
    else:
        overrides[base] = module
    token = _PROJECTOR_OVERRIDES.set(overrides)
    try:
        yield
    finally:
        _PROJECTOR_OVERRIDES.reset(token)
