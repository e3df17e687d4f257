"""VisionZip (CVPR 2025) and other token reducers for Hugging Face transformers LLaVA-NeXT, LLaVA-1.5 and LLaVA-OneVision.

handle = visionzip.apply(model, processor, dominant=54, contextual=10)
inputs = processor(images=image, text=prompt, return_tensors="pt")   # <image> -> reduced count
model.generate(**inputs)                                            # unchanged call
with handle.use(enabled=False):                                     # stock, this block only
    ...
"""

from .budget import PRESETS, Budget, preset_budget
from .core import Call, Settings, VisionZip, apply
from .merge import choose_tokens, cls_attention, merge_tokens
from .methods import METHODS, Method, get_method
from .selection import ImageSelection, TileSelection

__all__ = [
    "PRESETS",
    "Budget",
    "Call",
    "ImageSelection",
    "METHODS",
    "Method",
    "Settings",
    "TileSelection",
    "VisionZip",
    "apply",
    "choose_tokens",
    "cls_attention",
    "get_method",
    "merge_tokens",
    "preset_budget",
]
__version__ = "0.1.0"

_SUBMODULES = {"tiny", "tune", "projector", "video", "workarounds"}  # loaded on first use (they need Pillow)


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'visionzip' has no attribute {name!r}")
