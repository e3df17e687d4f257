"""What a reduction method is: a small descriptor plus one or two pure functions of tensors.

A method acts at one of two places, and implements the matching pair of functions:

- per tile ("vision tower" or "projector" stage): `tile_tokens(settings, side)` says how many tokens
  each 336x336 tile keeps, and `reduce_tiles(signals, settings, project)` turns the feature layer's
  signals of T tiles into T x k projected tokens.  The model family packs the tiles of an image.
- per image ("projector" stage, after the stock packing): `image_tokens(settings, stock_tokens)` and
  `reduce_image(features, settings)` choose rows of one image's stock packed features.

The count a method produces depends only on the image size (never on content), so the processor
can expand `<image>` before any pixel is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..selection import LazyTiles

if TYPE_CHECKING:
    from ..settings import Handle, Settings
    from ..tower import TowerSignals

# The paper's budget names (total visual tokens) per model family, and the tiles they assume: LLaVA-NeXT's
# totals are for a 2x2 grid (5 tiles), so a per-tile method's budget is the total / 5 there.
PAPER_TOTALS = {"llava_next": (640, 320, 160), "llava": (192, 128, 64), "qwen2_5_vl": (256, 128, 64)}
NOMINAL_TILES = {"llava_next": 5, "llava": 1, "qwen2_5_vl": 1}  # Qwen2.5-VL: every budget is per image
PAPER_TOTALS["llava_onevision"], NOMINAL_TILES["llava_onevision"] = PAPER_TOTALS["llava_next"], 5  # no paper budgets

# Token kinds in `TileOutput.positions`, besides a patch's raster index (>= 0).
CLS = -1
MERGED = -2  # a token that stands for several patches (a contextual token): no position of its own


@dataclass
class TileOutput:
    """What a per-tile method made of T tiles.

    features: (T, k, E) projected tokens, in the order the method puts them.
    positions: (T, k) the patch raster index of each token that is one patch (or one pooling window:
        its top-left patch), CLS for the CLS token, MERGED for a token with no single position.
        LLaVA-NeXT packs the crops' positioned tokens in raster order over the stitched grid, then
        their CLS tokens, then their merged tokens crop by crop (the VisionZip authors' layout).
    tiles: what was chosen, per tile, read lazily (no host-GPU sync in the forward).
    """

    features: torch.Tensor
    positions: torch.Tensor
    tiles: LazyTiles


class Method:
    """A reduction method's descriptor; subclasses set the class attributes and the functions of
    their `budget_rule`."""

    name: ClassVar[str]  # the registry key, e.g. "divprune"
    title: ClassVar[str]  # as shown on the page, e.g. "DivPrune"
    stage: ClassVar[str]  # "vision tower", "projector" or "language model"
    budget_rule: ClassVar[str]  # "per tile" or "per image"
    reference: ClassVar[str]  # paper and official code
    reads_text: ClassVar[bool] = False  # chooses by the question (text-dependent)
    needs_attention: ClassVar[bool] = False  # needs the feature layer's CLS row and head-mean keys
    spans_call: ClassVar[bool] = False  # scales its scores over all of a call's tiles (`score_span`)
    budget_kind: ClassVar[str] = "tokens"  # "tokens", or "dominant+contextual" (VisionZip)
    # How its choice reads on a picture (TileSelection): kept patches, merged groups, the CLS token.
    keeps_cls: ClassVar[bool] = False
    kept_as: ClassVar[str] = "kept"
    merged_as: ClassVar[str] = "merged group"

    def check(self, settings: Settings, side: int) -> None:
        """Raise a ValueError that states the limits when `settings` cannot run on tiles of
        side x side patches; called before any computation."""
        tokens = settings.tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise ValueError(f"{self.title} needs a whole number of tokens, got {tokens!r}")
        if not 1 <= tokens <= side * side:
            raise ValueError(f"{self.title}: tokens={tokens} is out of range; a tile has {side * side} patches")

    def budget_unit(self, family: str | None = None) -> str:
        """What this method's budget counts on `family` (a PRESETS key): "per tile" on a tiled family
        (LLaVA-NeXT's and OneVision's anyres) for a per-tile method, else "per image" (LLaVA-1.5's one tile
        is the whole image; Qwen2.5-VL has no tiles).  None: the method's own rule."""
        if family is not None and NOMINAL_TILES[family] == 1:
            return "per image"
        return self.budget_rule

    def unit(self, family: str | None = None) -> str:
        """`budget_unit` as the budget's suffix: "/tile" or "/image"."""
        return "/tile" if self.budget_unit(family) == "per tile" else "/image"

    def describe(self, settings: Settings, family: str | None = None) -> str:
        """The method and its budget on `family`, e.g. "DivPrune 320/image" (None: the method's own rule)."""
        return f"{self.title} {settings.tokens}{self.unit(family)}"

    def presets(self, family: str) -> dict[int, int]:
        """The paper's budget names for `family` (largest first) -> this method's `tokens`: the total
        itself for a per-image method, the total over the nominal tiles for a per-tile one."""
        tiles = NOMINAL_TILES[family] if self.budget_rule == "per tile" else 1
        return {total: total // tiles for total in PAPER_TOTALS[family]}

    # -- per tile -------------------------------------------------------------------------------
    def tile_tokens(self, settings: Settings, side: int) -> int:
        raise TypeError(f"{self.title} is not a per-tile method")

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        raise TypeError(f"{self.title} is not a per-tile method")

    def score_span(self, signals: TowerSignals, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
        """For a method that scales its scores by their range over all of a call's tiles (`spans_call`,
        CDPruner): the (min, max) over these tiles, so that a call reaching the tower in chunks (a video's
        frames) can pass the whole call's range to every chunk (`TowerSignals.score_span`).  It may keep the
        scores on the signals (`TowerSignals.scores`), so that reduce_tiles does not compute them again."""
        raise TypeError(f"{self.title} does not scale its scores over a call's tiles")

    # -- per image ------------------------------------------------------------------------------
    def image_tokens(self, settings: Settings, stock_tokens: int) -> int:
        raise TypeError(f"{self.title} is not a per-image method")

    def reduce_image(self, features: torch.Tensor, settings: Settings) -> torch.Tensor:
        """(N, E) one image's stock packed features -> (T,) ascending row indices to keep."""
        raise TypeError(f"{self.title} is not a per-image method")

    def image_order(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N,) every row of `features` in the order the method takes them, when its choice at any budget
        k is the first k of that order (ascending after): one call then serves every budget (a budget
        slider).  None for a method whose choices do not nest."""
        return None

    def image_record(self, kept: torch.Tensor, patch_map: torch.Tensor, num_tiles: int, side: int) -> LazyTiles:
        """Per-tile records of `reduce_image`'s rows `kept` (patch_map: (N,) from `layout.packed_patch_map`).
        A method that chooses later (FastV, inside the language model) returns records it fills in then."""
        from ..layout import tiles_from_kept  # layout imports this module

        return LazyTiles(num_tiles, lambda: tiles_from_kept(kept, patch_map, num_tiles, side))

    # -- methods that act beyond the vision side ------------------------------------------------
    def attach(self, handle: Handle) -> Callable[[], None] | None:
        """Install what the method needs on the handle's model for the handle's life (FastV: hooks on
        the language model's layers, idle unless a call runs FastV); return what removes it, or None."""
        return None

    def check_model(self, settings: Settings, handle: Handle) -> None:
        """Like `check`, for limits that depend on the model (FastV: K must be a language-model layer)."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown reduction method {name!r}; known: {sorted(METHODS)}") from None
