"""Reduction methods behind one registry.  A method is one file here (a `Method` subclass: a small
descriptor and pure tensor functions; see `base.py`) plus one registration line below."""

from .base import CLS, MERGED, METHODS, Method, TileOutput, get_method, register
from .cdpruner import CDPruner
from .dominant import DominantOnly
from .fastv import FastV
from .visionzip import VisionZipMethod

register(VisionZipMethod())
register(DominantOnly())
register(FastV())
register(CDPruner())

__all__ = ["CLS", "MERGED", "METHODS", "Method", "TileOutput", "get_method", "register"]
