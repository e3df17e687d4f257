"""`apply`: token reduction on a stock transformers LLaVA model and its processor, switchable per call.

One handle serves every registered method (`visionzip.methods`): each call picks a method and its
budget with `handle.use(...)`, so two chats can compare methods on one copy of the weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from torch import nn

from .budget import Budget
from .merge import MERGE_MODES
from .methods import METHODS, Method, get_method
from .patch import FAMILIES
from .selection import ImageSelection
from .settings import Call, Handle, Settings
from .tower import SignalHooks, encoder_layers, feature_layer_index

_UNSET: Any = object()


class VisionZip:
    """A handle on a model and processor that VisionZip was applied to.

    `enabled` and `set_budget` change the default for every caller; `use(...)` overrides them for
    the calls made inside its block, in this thread (or asyncio task) only.
    """

    def __init__(self, model: nn.Module, processor: Any, budget: Budget, merge: str, enabled: bool) -> None:
        base = model.model if hasattr(model, "model") and type(model.model).__name__ in FAMILIES else model
        family = FAMILIES.get(type(base).__name__)
        if family is None:
            raise TypeError(
                f"VisionZip supports LLaVA-NeXT and LLaVA-1.5 models and the other families in visionzip.patch "
                f"(base models {sorted(FAMILIES)}), got {type(model).__name__}"
            )
        self.model, self.processor, self.base, self.family = model, processor, base, family
        # A family whose tower is no plain ViT says how to read it (visionzip.patch.qwen2_5_vl.tower)
        self.side, self.cls_tokens, self.layer_index, make_hooks = getattr(family, "tower", vit_tower)(self)
        self.tokens_per_tile = self.side * self.side + self.cls_tokens  # CLS (if any) + patches
        self._default = self._checked(Settings(enabled, budget, merge))
        self._current: ContextVar[Call | None] = ContextVar(f"visionzip_call_{id(self)}", default=None)
        self._last_selection: list[ImageSelection] | None = None
        self._unpatch = family.patch(self)
        self._hooks = make_hooks()  # after the family's patch
        self._detach = [detach for method in METHODS.values() if (detach := method.attach(self)) is not None]

    # -- settings -------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        call = self._current.get()
        return call.settings if call is not None else self._default

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._default = replace(self._default, enabled=bool(value))

    @property
    def budget(self) -> Budget:
        return self.settings.budget

    @property
    def method(self) -> Method:
        return get_method(self.settings.method)

    def set_budget(self, dominant: int, contextual: int) -> None:
        self._default = self._checked(replace(self._default, budget=Budget(dominant, contextual)))

    def set_method(self, method: str, tokens: int | None = None, seed: int | None = None) -> None:
        """Make `method` (with its `tokens` budget; VisionZip takes set_budget's) every caller's default."""
        seed = self._default.seed if seed is None else seed
        self._default = self._checked(replace(self._default, method=method, tokens=tokens, seed=seed))

    @contextlib.contextmanager
    def use(
        self,
        enabled: bool | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        merge: str | None = None,
        *,
        method: str | None = None,
        tokens: int | None = _UNSET,
        seed: int | None = None,
        fastv_layer: int | None = None,
        text: str | None = _UNSET,
    ) -> Iterator[Call]:
        """Settings for the calls inside the block only; yields a `Call` that records them.

        `method` picks a registered method (default: the handle's); `tokens` is its budget (per tile
        or per image, by the method's rule), `dominant`/`contextual` VisionZip's; `seed` seeds the
        methods that draw at random; `fastv_layer` is FastV's K; `text` the question a text-dependent
        method (CDPruner) chooses by.  An impossible budget raises a ValueError before anything runs."""
        base = self.settings
        budget = Budget(
            base.budget.dominant if dominant is None else dominant,
            base.budget.contextual if contextual is None else contextual,
        )
        changes = dict(budget=budget, merge=base.merge if merge is None else merge)
        if enabled is not None:
            changes["enabled"] = bool(enabled)
        if method is not None:
            changes["method"] = method
            changes["tokens"] = None if tokens is _UNSET else tokens  # a budget of another method does not carry over
        elif tokens is not _UNSET:
            changes["tokens"] = tokens
        if seed is not None:
            changes["seed"] = seed
        if fastv_layer is not None:
            changes["fastv_layer"] = fastv_layer
        if text is not _UNSET:
            changes["text"] = text
        settings = self._checked(replace(base, **changes))
        call = Call(settings)
        token = self._current.set(call)
        try:
            yield call
        finally:
            self._current.reset(token)

    # -- what was chosen ------------------------------------------------------------------------
    @property
    def last_selection(self) -> list[ImageSelection] | None:
        """Per image of the last VisionZip call: inside `use()`, that block's; otherwise the
        latest in any thread (read `Call.selection` when several threads share the model)."""
        call = self._current.get()
        return call.selection if call is not None else self._last_selection

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens one image of (height, width) becomes under the current settings."""
        return self.family.num_image_tokens(self, image_size, self.settings)

    def remove(self) -> None:
        """Undo `apply`: the model and processor are stock again."""
        self._hooks.remove()
        for detach in self._detach:
            detach()
        self._unpatch()

    # -- internals used by the patches ------------------------------------------------------------
    def capture(self, attention: bool = True):
        return self._hooks.capture(attention)

    def current_call(self) -> Call | None:
        """The `use()` block this thread is in, if any."""
        return self._current.get()

    def record(self, selection: list[ImageSelection]) -> None:
        self._last_selection = selection
        call = self._current.get()
        if call is not None:
            call.selection = selection
            call.visual_tokens = [image.num_tokens for image in selection]

    def _checked(self, settings: Settings) -> Settings:
        return checked_settings(settings, self)


def checked_settings(settings: Settings, handle: Handle) -> Settings:
    """`settings` if every part of them can run on the handle's model, else a ValueError stating the limits.
    A family with budget rules of its own (no tiles: Qwen2.5-VL) checks the budget by its `check_settings`."""
    family_check = getattr(handle.family, "check_settings", None)
    if family_check is None:
        settings.budget.check(handle.side * handle.side + handle.cls_tokens, handle.cls_tokens)  # (CLS +) patches
    if settings.merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {settings.merge!r}")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int):
        raise ValueError(f"seed must be an integer, got {settings.seed!r}")
    method = get_method(settings.method)
    if method.budget_kind == "tokens" and settings.tokens is None:
        raise ValueError(f"{method.title} needs a budget: tokens=N ({method.budget_rule})")
    if family_check is None:
        method.check(settings, handle.side)
    else:
        family_check(handle, settings)
    method.check_model(settings, handle)
    return settings


def vit_tower(handle: Handle) -> tuple[int, int, int, Callable[[], SignalHooks]]:
    """A ViT tower's reading (CLIP, SigLIP), the default of a family's optional `tower(handle)`: patches
    per tile side (image_size // patch_size), CLS tokens per tile (one where the tower has a class
    embedding, CLIP; none where it has not, SigLIP), the feature layer's index among its encoder layers,
    and the function that makes the signal hooks there (called after the family's patch)."""
    base = handle.base
    vision_config = base.config.vision_config
    cls_tokens = int(any(name.endswith("class_embedding") for name, _ in base.vision_tower.named_parameters()))
    layers = encoder_layers(base.vision_tower)
    layer_index = feature_layer_index(base.config.vision_feature_layer, len(layers))
    side = vision_config.image_size // vision_config.patch_size
    return side, cls_tokens, layer_index, lambda: SignalHooks(layers[layer_index], cls_tokens)


def apply(
    model: nn.Module,
    processor: Any = None,
    dominant: int = 54,
    contextual: int = 10,
    *,
    merge: str = "sum",
    enabled: bool = True,
    method: str = "visionzip",
    tokens: int | None = None,
    seed: int = 0,
) -> VisionZip:
    """Apply token reduction to a stock `LlavaNextForConditionalGeneration` / `LlavaForConditionalGeneration`
    (or their base models) and, if given, its processor.  Weights are untouched and shared.

    The default method is VisionZip with `dominant` + `contextual` tokens per tile; `method` names
    another registered one (`visionzip.methods.METHODS`) with its budget in `tokens`."""
    handle = VisionZip(model, processor, Budget(dominant, contextual), merge, enabled)
    if method != "visionzip" or tokens is not None or seed:
        try:
            handle.set_method(method, tokens, seed)
        except Exception:
            handle.remove()  # an impossible budget must not leave the model patched
            raise
    return handle
