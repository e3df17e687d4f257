"""What a side runs (a `Mode`: full, or a method and its budget), the choices the page offers, and
the library's `use()` block that puts a mode in force for one call."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import visionzip
from app.models import LoadedModel
from visionzip.methods.base import NOMINAL_TILES, PAPER_TOTALS
from visionzip.projector import use_projector

FULL = "Full"  # every visual token: no reduction (as a method and as a budget)
CUSTOM = "Custom D/C"  # VisionZip with dominant/contextual per tile typed in
CUSTOM_TOKENS = "Custom tokens"  # another method with its token budget typed in
PRESET_PREFIX = "VisionZip "


@dataclass(frozen=True)
class Mode:
    """What one side runs: the stock model, or a reduction method (visionzip.METHODS) and its budget."""

    name: str  # as chosen in the UI: FULL, "<method title> <paper budget>" ("VisionZip 320"), CUSTOM, CUSTOM_TOKENS
    enabled: bool
    dominant: int = 0  # VisionZip's budget per tile
    contextual: int = 0
    tuned: str | None = None  # the tuned projector's description ("trained at 54+10, 200 steps"); None: the model's own
    method: str = "visionzip"  # a name in visionzip.METHODS
    tokens: int | None = None  # every other method's budget (per tile or per image, by its rule)
    seed: int = 0  # methods that draw at random
    family: str = ""  # the model family it was made for (a PRESETS key): what its budget counts; "": unknown

    @property
    def label(self) -> str:
        """The method and budget as the page puts it, in the family's unit ("VisionZip 54+10/tile" on
        LLaVA-NeXT, "VisionZip 108+20/image" on Qwen2.5-VL)."""
        settings = self.settings().describe(self.family or None)
        return settings + (f" + tuned projector ({self.tuned})" if self.tuned else "")

    @property
    def reducer(self) -> visionzip.Method:
        return visionzip.get_method(self.method)

    @property
    def method_title(self) -> str:
        return self.reducer.title if self.enabled else FULL

    @property
    def reads_text(self) -> bool:
        """A text-dependent method: it chooses by the question."""
        return self.enabled and self.reducer.reads_text

    @property
    def inside_llm(self) -> bool:
        """A method that prunes inside the language model (FastV)."""
        return self.enabled and self.reducer.stage == "language model"

    @property
    def key(self) -> tuple:
        return (
            self.enabled,
            self.method,
            self.dominant,
            self.contextual,
            self.tokens,
            self.seed,
            self.tuned is not None,
        )

    def settings(self, merge: str = "sum") -> visionzip.Settings:
        """The library's settings for this mode (not checked against a model: `use_mode` does that)."""
        budget = visionzip.Budget(self.dominant, self.contextual) if self.enabled else visionzip.Budget(1, 0)
        return visionzip.Settings(self.enabled, budget, merge, self.method, self.tokens, self.seed)


FULL_MODE = Mode(FULL, False)  # every visual token: the stock model


def method_titles() -> list[str]:
    """The page's method choices: FULL, then every registered method by title."""
    return [FULL] + [method.title for method in visionzip.METHODS.values()]


def method_by_title(title: str) -> visionzip.Method:
    for method in visionzip.METHODS.values():
        if method.title == title:
            return method
    raise ValueError(f"unknown method {title!r}; choose one of {method_titles()}")


def method_name(title: str | None) -> str:
    """The registry name of a method dropdown's title (FULL, or None, stays FULL)."""
    return FULL if title in (None, FULL) else method_by_title(title).name


def mode_choices(family: str, method: str = "visionzip") -> list[str]:
    """The budgets a side can pick for `method` (a registry name, or FULL): the paper's presets for
    this model family, largest first, then the custom entry."""
    if method == FULL:
        return [FULL]
    reducer = visionzip.get_method(method)
    custom = CUSTOM if reducer.budget_kind == "dominant+contextual" else CUSTOM_TOKENS
    return [f"{reducer.title} {name}" for name in reducer.presets(family)] + [custom]


def budget_labels(family: str, mode: Mode) -> dict[str, str]:
    """What a side's budget controls say on `family` for `mode`'s method: the Budget presets' tooltip
    ("info"), and the custom boxes' labels ("dominant", "contextual", "tokens"), each in the unit the budget
    counts there (per tile on LLaVA-NeXT's and OneVision's anyres for a per-tile method, else per image)."""
    reducer, tiles = mode.reducer, NOMINAL_TILES[family]
    unit = reducer.budget_unit(family)
    if not mode.enabled:
        info = "Every visual token: no reduction."
    elif unit == "per tile":
        info = (
            f"{reducer.title}'s budget is per tile: a preset names its total on a 2x2 grid ({tiles} tiles); "
            "an image's count follows its own grid."
        )
    elif tiles == 1:
        info = f"{reducer.title}'s budget is per image: this model does not tile the image."
    else:
        info = f"{reducer.title}'s budget is per image: the whole image's tokens, over all its tiles."
    cls = ", counts CLS" if _cls_tokens(TILE_TOKENS.get(family, 577)) else ""
    visionzip_unit = visionzip.get_method("visionzip").budget_unit(family)
    return {
        "info": info,
        "dominant": f"Dominant tokens {visionzip_unit} (D{cls})",
        "contextual": f"Contextual tokens {visionzip_unit} (C)",
        "tokens": f"Visual tokens {unit}" if mode.enabled else "Visual tokens",
    }


def _cls_tokens(tokens_per_tile: int | None) -> int:
    """1 where a tile's tokens hold a CLS token (577 = 24^2 + CLS), 0 where they do not (729 = 27^2, or no tiles)."""
    return int(tokens_per_tile is not None and math.isqrt(tokens_per_tile) ** 2 != tokens_per_tile)


# A tile's tokens where it is not CLIP-L/14-336's 577; None where budgets count an image's tokens (Qwen2.5-VL),
# which the model's handle checks (`checked_on`).
TILE_TOKENS: dict[str, int | None] = {"llava_onevision": 27 * 27, "qwen2_5_vl": None}


def make_mode(
    name: str,
    family: str,
    dominant: float | None = None,
    contextual: float | None = None,
    tokens_per_tile: int | None = None,
    tokens: float | None = None,
    method: str | None = None,
) -> Mode:
    """The Mode a UI choice names (`method`, a registry name, is needed only for CUSTOM_TOKENS);
    raises ValueError (with the limits) for a budget that a tile of `tokens_per_tile` tokens
    (CLS + patches; 577 for CLIP-L/14-336, 729 for SigLIP-384/14, which has no CLS) cannot meet; None:
    the family's (`TILE_TOKENS`), unchecked where it has no tiles."""
    if name == FULL:
        return FULL_MODE
    return replace(_named_mode(name, family, dominant, contextual, tokens_per_tile, tokens, method), family=family)


def _named_mode(
    name: str,
    family: str,
    dominant: float | None,
    contextual: float | None,
    tokens_per_tile: int | None,
    tokens: float | None,
    method: str | None,
) -> Mode:
    if tokens_per_tile is None:
        tokens_per_tile = TILE_TOKENS.get(family, 577)
    if name == CUSTOM:
        budget = visionzip.Budget(_whole(dominant, "dominant"), _whole(contextual, "contextual"))
        if tokens_per_tile is not None:
            budget = budget.check(tokens_per_tile, _cls_tokens(tokens_per_tile))
        return Mode(name, True, budget.dominant, budget.contextual)
    if name == CUSTOM_TOKENS:
        if method in (None, FULL, "visionzip"):
            raise ValueError(f"{CUSTOM_TOKENS} needs a method other than VisionZip (VisionZip takes {CUSTOM})")
        mode = Mode(name, True, method=visionzip.get_method(method).name, tokens=_whole(tokens, "tokens"))
        return _checked(mode, tokens_per_tile)
    title, _, preset = name.rpartition(" ")
    try:
        reducer = method_by_title(title)
        size = reducer.presets(family)[int(preset)]
    except (ValueError, KeyError):
        raise ValueError(
            f"unknown mode {name!r}; choose one of {mode_choices(family, method or 'visionzip')}"
        ) from None
    if reducer.name == "visionzip":
        budget = visionzip.preset_budget(family, preset)
        return Mode(name, True, budget.dominant, budget.contextual)
    return _checked(Mode(name, True, method=reducer.name, tokens=size), tokens_per_tile)


def _checked(mode: Mode, tokens_per_tile: int | None) -> Mode:
    if tokens_per_tile is not None:  # None: a model with budget rules of its own checks it (`checked_on`)
        mode.reducer.check(mode.settings(), math.isqrt(tokens_per_tile))  # side x side patches, + 1 CLS or not
    return mode


def tile_limit(loaded: LoadedModel) -> int | None:
    """The tokens per tile `make_mode` checks a budget against; None for a family whose budgets count an
    image's tokens (Qwen2.5-VL), which its handle checks instead (`checked_on`)."""
    return None if getattr(loaded.handle.family, "BUDGET_PER_IMAGE", False) else loaded.handle.tokens_per_tile


def checked_on(loaded: LoadedModel, mode: Mode) -> Mode:
    """`mode` if the model's handle can run it, else its ValueError stating the limits."""
    with use_mode(loaded, mode):
        return mode


def default_mode(method: str, family: str, like: Mode | None = None) -> Mode:
    """`method`'s preset of the same rank as `like`'s (the middle one otherwise): what a side runs
    right after its method is switched."""
    if method == FULL:
        return FULL_MODE
    presets = mode_choices(family, method)[:-1]
    rank = _preset_rank(like, family) if like is not None else None
    return make_mode(presets[len(presets) // 2 if rank is None else rank], family)


def _preset_rank(mode: Mode, family: str) -> int | None:
    """0 for the largest of the method's presets (in any family), 1 for the middle, 2 for the smallest;
    None for full and custom budgets."""
    _, _, preset = mode.name.rpartition(" ")
    if not mode.enabled or not preset.isdigit():
        return None
    method = mode.reducer
    for known in PAPER_TOTALS:
        names = list(method.presets(known))
        if int(preset) in names:
            return names.index(int(preset))
    return None


def matched_mode(loaded: LoadedModel, mode: Mode, image_size: tuple[int, int], target: int) -> Mode:
    """`mode`'s method with the budget that gives `target` visual tokens for an image of `image_size`,
    or the nearest count its budget rule allows (per tile: a whole number per tile; pooling: a square)."""
    if not mode.enabled:
        raise ValueError("Full uses every visual token: pick a method to match the other side's count")
    handle, method = loaded.handle, mode.reducer
    if getattr(handle.family, "BUDGET_PER_IMAGE", False):  # Qwen2.5-VL: every budget counts one image's tokens
        return _matched_per_image(loaded, mode, target)
    if method.budget_rule == "per image":
        matched = Mode(CUSTOM_TOKENS, True, method=method.name, tokens=target, family=loaded.family)
        return _checked(matched, handle.tokens_per_tile)
    tiles = handle.family.num_tiles(handle.base.config, image_size)
    per_tile = max(1, round((target - (1 if tiles == 1 else 0)) / tiles))
    if method.budget_kind == "dominant+contextual":  # VisionZip: the paper's 54:10 split of a tile's budget
        dominant = min(per_tile, max(1, round(per_tile * 54 / 64)))
        return make_mode(CUSTOM, loaded.family, dominant, per_tile - dominant, handle.tokens_per_tile)
    allowed = allowed_tile_tokens(method, handle.side, handle.tokens_per_tile)
    nearest = min(allowed, key=lambda n: (abs(n - per_tile), n))
    return make_mode(
        CUSTOM_TOKENS, loaded.family, tokens=nearest, tokens_per_tile=handle.tokens_per_tile, method=method.name
    )


def _matched_per_image(loaded: LoadedModel, mode: Mode, target: int) -> Mode:
    """`target` tokens as a per-image budget (pooling: the largest pooled grid within it), checked by the handle."""
    if mode.method == "visionzip":  # the paper's 54:10 split
        dominant = min(target, max(1, round(target * 54 / 64)))
        matched = make_mode(CUSTOM, loaded.family, dominant, target - dominant, loaded.handle.tokens_per_tile)
    else:
        matched = Mode(CUSTOM_TOKENS, True, method=mode.method, tokens=target, family=loaded.family)
    return checked_on(loaded, matched)


def allowed_tile_tokens(method: visionzip.Method, side: int, limit: int) -> list[int]:
    """The per-tile budgets 1..limit that `method` accepts on tiles of side x side patches, ascending."""
    return [tokens for tokens in range(1, limit + 1) if _allows(method, tokens, side)]


def _allows(method: visionzip.Method, tokens: int, side: int) -> bool:
    try:
        method.check(visionzip.Settings(True, visionzip.Budget(1, 0), method=method.name, tokens=tokens), side)
    except ValueError:
        return False
    return True


def translate_mode(mode: Mode, family: str) -> Mode:
    """The same mode for another model family: presets map by rank (640 <-> 192, 320 <-> 128,
    160 <-> 64), as the paper pairs them; full and custom budgets carry over."""
    if not mode.enabled:
        return mode
    if mode.name in (CUSTOM, CUSTOM_TOKENS) or mode.name in mode_choices(family, mode.method):
        return replace(mode, family=family)  # the same budget, counted as the new family counts it
    rank = _preset_rank(mode, family)
    if rank is None:
        raise ValueError(f"unknown preset {mode.name!r}")
    return replace(make_mode(mode_choices(family, mode.method)[rank], family), seed=mode.seed)


def tuned_mode(mode: Mode, loaded: LoadedModel, tuned: bool) -> Mode:
    """`mode` with `loaded`'s tuned projector, or with the model's own.  The projector's weights
    load here, so one that does not fit fails when chosen (ModelLoadError), not mid-turn."""
    if not tuned:
        return replace(mode, tuned=None)
    loaded.tuned_projector()
    return replace(mode, tuned=loaded.projector.describe())


def _whole(value: float | None, name: str) -> int:
    if value is None or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


@contextmanager
def use_mode(loaded: LoadedModel, mode: Mode, text: str | None = None) -> Iterator[visionzip.Call]:
    """The handle's `use()` block for `mode`, with the mode's projector (tuned or the model's own),
    for this thread only: the other side, on the same weights, keeps its own."""
    budget = {}
    if mode.enabled:
        budget = dict(method=mode.method, tokens=mode.tokens, seed=mode.seed)
        if mode.reads_text:
            budget["text"] = text  # the question it chooses by (None: it can count, not choose)
        if mode.method == "visionzip":
            budget.update(dominant=mode.dominant, contextual=mode.contextual)
    projector = loaded.tuned_projector() if mode.tuned else None
    if projector is not None and mode.enabled:
        budget["merge"] = projector.info.merge  # a projector runs under the merge it was trained with
    # a model without LLaVA's projector (Qwen2.5-VL's merger) has no tuned projector to route
    routed = use_projector(loaded.model, projector) if hasattr(loaded.model.model, "multi_modal_projector") else None
    with loaded.handle.use(enabled=mode.enabled, **budget) as call, routed or nullcontext():
        yield call
