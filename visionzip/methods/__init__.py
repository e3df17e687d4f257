"""Reduction methods behind one registry.  A method is one file here (a `Method` subclass: a small
descriptor and pure tensor functions; see `base.py`) plus one registration line below."""

from .base import CLS, MERGED, METHODS, Method, TileOutput, get_method, register
from .cdpruner import CDPruner
from .divprune import DivPrune
from .dominant import DominantOnly
from .fastv import FastV
from .pool import Pool
from .random_patches import RandomPatches
from .visionzip import VisionZipMethod
from .vispruner import VisPruner

register(VisionZipMethod())
register(DominantOnly())
register(RandomPatches())
register(Pool())
register(DivPrune())
register(VisPruner())
register(FastV())
register(CDPruner())

__all__ = ["CLS", "MERGED", "METHODS", "Method", "TileOutput", "get_method", "register"]
