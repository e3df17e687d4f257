"""Token budgets: the paper's presets and the checks that keep a budget possible."""

from __future__ import annotations

from dataclasses import dataclass

# (dominant, contextual) per 336x336 tile; `dominant` counts the CLS token.
PRESETS: dict[str, dict[int, tuple[int, int]]] = {
    "llava": {192: (162, 30), 128: (108, 20), 64: (54, 10)},
    # LLaVA-NeXT names are the paper's totals for a 2x2 grid (5 tiles); other grids differ.
    "llava_next": {640: (108, 20), 320: (54, 10), 160: (27, 5)},
    # LLaVA-OneVision: no paper budgets; LLaVA-NeXT's, so both families compare at equal counts (5 tiles,
    # a 2x2 grid); no CLS token, so `dominant` counts patches only.
    "llava_onevision": {640: (108, 20), 320: (54, 10), 160: (27, 5)},
    # Qwen2.5-VL: per image, no paper budgets (the authors did not run it); the 54:10 split at three sizes.
    "qwen2_5_vl": {256: (216, 40), 128: (108, 20), 64: (54, 10)},
}


@dataclass(frozen=True)
class Budget:
    dominant: int
    contextual: int

    @property
    def per_tile(self) -> int:
        return self.dominant + self.contextual

    def check(self, tokens_per_tile: int, cls_tokens: int = 1) -> Budget:
        """Raise a ValueError that states the limits if this budget cannot be met on a tile of
        `tokens_per_tile` tokens (`cls_tokens` CLS + patches); return self otherwise."""
        parts = f"1 CLS + {tokens_per_tile - 1} patches" if cls_tokens else f"{tokens_per_tile} patches, no CLS"
        limits = (
            f"a tile has {tokens_per_tile} tokens ({parts}): "
            f"need 1 <= dominant <= {tokens_per_tile} and 0 <= contextual <= {tokens_per_tile} - dominant"
        )
        for name, value in (("dominant", self.dominant), ("contextual", self.contextual)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}; {limits}")
        if self.dominant < 1 or self.dominant > tokens_per_tile:
            raise ValueError(f"dominant={self.dominant} is out of range; {limits}")
        if self.contextual < 0 or self.contextual > tokens_per_tile - self.dominant:
            raise ValueError(
                f"contextual={self.contextual} is out of range with dominant={self.dominant}: "
                f"only {tokens_per_tile - self.dominant} tokens remain to merge; {limits}"
            )
        return self


def preset_budget(family: str, name: int | str) -> Budget:
    """The paper's budget `name` (e.g. 640) for `family` ("llava" or "llava_next")."""
    table = PRESETS.get(family)
    if table is None:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(PRESETS)}")
    try:
        dominant, contextual = table[int(name)]
    except (KeyError, ValueError):
        raise ValueError(f"no preset {name!r} for {family}; presets: {sorted(table, reverse=True)}") from None
    return Budget(dominant, contextual)
