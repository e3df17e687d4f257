"""CDPruner (Zhang et al., 2025): per tile, a conditional DPP over the projected patches, chosen by
fast greedy MAP inference; the kernel weighs each patch's cosine similarities by its relevance to the
question, scored with CLIP's text tower (`visionzip.clip_text`).

As the official code: similarity is the cosine of the projector outputs, relevance the mean over text
segments of MINUS the cosine between CLIP image and text embeddings (CLIP's penultimate patch states
anti-correlate with the text; the authors keep the sign on purpose), min-max normalised over all tiles
of the call together; the paper's theta reweighting is off by default.  On LLaVA-NeXT every tile
keeps T, with no unpadding and no newline tokens (the family's per-tile packing).

Shapes: T tiles, N patches per tile (CLS dropped), E projector width, P CLIP embedding width, M text
segments, k kept per tile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..merge import take_tokens
from ..selection import kept_tiles
from ..similarity import (
    bfloat16_matmul_pays,
    cosine_gram,
    weighted_unit_rows,
)
from .base import Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Handle, Settings
    from ..tower import TowerSignals

LOOKAHEAD = 32  # picks a screened guess runs ahead, every tile at once: each guess reads all float32 rows


# -- the method: pure tensor functions ------------------------------------------------------------
def relevance(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    theta: float | None = None,
    span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(T, N, P) image and (M, P) text embeddings -> (T, N) relevance, in the wider of their dtypes.

    r = mean over segments of -cos(image, text) (`raw_relevance`), then (r - min + 1e-6) / (max - min)
    with min and max over all T tiles together (the official code normalises the whole batch of tiles at
    once), or `span`: the (min, max) of r over all of a call's tiles when they come in chunks.  With
    `theta` (the paper's option, commented out in the official code): r -> exp(theta / (2 (1 - theta)) r).
    """
    return normalised_relevance(raw_relevance(image_embeds, text_embeds), theta, span)


def normalised_relevance(
    scores: torch.Tensor, theta: float | None = None, span: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """(T, N) `raw_relevance` -> (T, N) `relevance`: min-max over all T tiles, or over `span`; then theta."""
    low, high = span if span is not None else (scores.min(), scores.max())
    scores = (scores - low + 1e-6) / (high - low)
    if theta is not None:
        scores = torch.exp(theta / (2 * (1 - theta)) * scores)
    return scores


def raw_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(T, N, P), (M, P) -> (T, N) the mean over text segments of -cos(image, text), before normalising."""
    dtype = torch.promote_types(image_embeds.dtype, text_embeds.dtype)
    image = image_embeds.to(dtype) / image_embeds.to(dtype).norm(dim=-1, keepdim=True)
    text = text_embeds.to(dtype) / text_embeds.to(dtype).norm(dim=-1, keepdim=True)
    return (-(image @ text.T)).mean(dim=-1)  # the minus sign is the official one


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """(T, N, E) projector outputs, (T, N) relevance -> (T, N, N) L = diag(r) S diag(r), S the cosine
    similarity of the features, in float32 or wider (the official code casts to float32); every tile at
    once, from the symmetric half (`cosine_gram`)."""
    return cosine_gram(features, relevance)


def dpp_select(features: torch.Tensor, relevance: torch.Tensor, steps: int, screen: bool | None = None) -> torch.Tensor:
    """(T, N, E) projector outputs, (T, N) relevance -> (T, steps) each tile's picks in the order picked:
    `fast_greedy_map` of `dpp_kernel`.

    Two ways to the same picks (`screen`: None picks by device and budget): the dense one computes every
    tile's whole N x N float32 kernel; the screened one (`screened_greedy_map`), where a bfloat16 product
    is several times faster than a float32 one, computes float32 kernel rows only for the picks."""
    if screen is None:  # a screen pays off when few rows are picked (float32 rows: steps x N x E per tile)
        screen = steps * 4 <= features.shape[-2] and bfloat16_matmul_pays(features.device)
    if screen:
        return screened_greedy_map(features, relevance, steps)
    return fast_greedy_map(dpp_kernel(features, relevance), steps)


class GreedyMap:
    """Fast greedy MAP inference of a DPP (Chen et al., 2018), one kernel per tile at once: the state
    after each pick, advanced by the picked items' kernel rows.

    Each step takes j = argmax of the remaining marginal gains d2 (first index on ties), then e = (L[j] -
    sum_t c_t[j] c_t) / sqrt(d2[j]), d2 -= e^2, d2[j] = -inf.  Past the kernel's numerical rank d2 turns 0
    or negative and the official code goes NaN (repeated picks); here the rest are then the lowest
    unpicked indices, so the count stays exact (unreachable at the official budgets)."""

    def __init__(self, diagonal: torch.Tensor, steps: int) -> None:
        tiles, size = diagonal.shape  # (T, N): L's diagonal, the first gains
        self.tiles = torch.arange(tiles, device=diagonal.device)
        self.gains = diagonal.clone()  # (T, N) d2
        self.vectors = diagonal.new_zeros(tiles, steps, size)  # (T, steps, N) the c_t
        self.taken = torch.zeros(tiles, size, dtype=torch.bool, device=diagonal.device)
        self.step = 0

    def best(self) -> torch.Tensor:
        """(T,) each tile's next pick."""
        return self.gains.argmax(dim=-1)

    def take(self, best: torch.Tensor, kernel_rows: torch.Tensor) -> None:
        """Pick `best` (T,), whose kernel rows L[best] are `kernel_rows` (T, N)."""
        step, tiles = self.step, self.tiles
        done = self.vectors[:, :step]  # (T, step, N): a view, read by bmm in place
        projected = (done[tiles, :, best].unsqueeze(1) @ done).squeeze(1)  # (T, N) sum_t c_t[j] c_t
        vector = (kernel_rows - projected) / self.gains[tiles, best].sqrt().unsqueeze(-1)
        self.vectors[:, step] = vector
        self.taken[tiles, best] = True
        gains = self.gains - vector.square()
        # NaN only past the numerical rank: then below every open gain; picked ones stay -inf
        self.gains = torch.where(gains.isnan(), torch.finfo(gains.dtype).min, gains).masked_fill(self.taken, -torch.inf)
        self.step += 1

    def copy(self) -> GreedyMap:
        """A state to run ahead on (a guess) without moving this one: `take` replaces the gains, writes the rest."""
        twin = copy.copy(self)
        twin.vectors, twin.taken = self.vectors.clone(), self.taken.clone()
        return twin


def fast_greedy_map(kernel: torch.Tensor, steps: int) -> torch.Tensor:
    """kernel: (T, N, N) positive semi-definite -> (T, steps) picks in the order picked (`GreedyMap`)."""
    state = GreedyMap(torch.diagonal(kernel, dim1=1, dim2=2), steps)
    picks = []
    for _ in range(steps):
        picks.append(state.best())
        state.take(picks[-1], kernel[state.tiles, picks[-1]])
    return torch.stack(picks, dim=1)


def screened_greedy_map(
    features: torch.Tensor, relevance: torch.Tensor, steps: int, lookahead: int = LOOKAHEAD
) -> torch.Tensor:
    """`fast_greedy_map` of `dpp_kernel`, reading float32 kernel rows only where a pick depends on them.

    Every pick reads only float32 rows (of the rows picked so far) and the float32 diagonal, so the
    bfloat16 product of the features decides nothing; it only guesses which rows will be needed: the
    greedy runs `lookahead` picks ahead on its rows, and the float32 rows of those guesses are computed in
    one product for all tiles.  A pick outside the guess starts the next guess."""
    weighted = weighted_unit_rows(features, relevance)  # (T, N, E) r_i u_i, float32 or wider
    rounded = features.bfloat16()  # the model's own features when it runs in bfloat16
    products = rounded @ rounded.transpose(-1, -2)  # (T, N, N) bfloat16 v_i . v_j
    scale = relevance.to(weighted.dtype) / products.diagonal(dim1=-2, dim2=-1).to(weighted.dtype).sqrt()  # r / |v|
    rows = weighted.new_zeros(*weighted.shape[:-1], weighted.shape[-2])  # (T, N, N) float32 rows, as computed
    known = torch.zeros(rows.shape[:-1], dtype=torch.bool, device=weighted.device)  # (T, N)
    state = GreedyMap(torch.linalg.vector_norm(weighted, dim=-1).square_(), steps)  # the diagonal r_i^2 |u_i|^2
    tiles = state.tiles.unsqueeze(-1)  # (T, 1)
    picks = []
    for step in range(steps):
        best = state.best()
        if not bool(known[state.tiles, best].all()):  # guess no further than the picks still to make
            guesses = guess_picks(state.copy(), best, (products, scale), min(lookahead, steps - step))  # (T, g)
            rows[tiles, guesses] = weighted[tiles, guesses] @ weighted.transpose(-1, -2)  # (T, g, N)
            known[tiles, guesses] = True
        picks.append(best)
        state.take(best, rows[state.tiles, best])
    return torch.stack(picks, dim=1)


def guess_picks(
    state: GreedyMap, best: torch.Tensor, screen: tuple[torch.Tensor, torch.Tensor], count: int
) -> torch.Tensor:
    """(T, count): `best` and the picks the greedy would make after it on the screened kernel's rows
    (bfloat16 products (T, N, N) of the features, scaled by r_i / |v_i| (T, N))."""
    products, scale = screen
    guesses = [best]
    for _ in range(1, count):
        pick, tiles = guesses[-1], state.tiles
        row = products[tiles, pick].to(scale.dtype) * scale * scale[tiles, pick].unsqueeze(-1)  # (T, N)
        state.take(pick, row)
        guesses.append(state.best())
    return torch.stack(guesses, dim=1)


# -- the method ---------------------------------------------------------------------------------------
class CDPruner(Method):
    name = "cdpruner"
    title = "CDPruner"
    stage = "projector"
    budget_rule = "per tile"
    reference = "arXiv 2506.10967; github.com/Theia-4869/CDPruner"
    reads_text = True
    spans_call = True  # relevance is min-max normalised over all of a call's tiles
    kept_as = "relevant to the question and diverse (DPP)"  # how the app's overlay names them

    def __init__(self, theta: float | None = None) -> None:
        self.theta = theta  # the paper's relevance weighting; None (off) as the official code

    # The question is needed only to choose, not to count: a call that counts placeholders (the
    # processor, a page header) runs without one, and reduce_tiles refuses a choice without it.

    def check_model(self, settings: Settings, handle: Handle) -> None:
        """Refused on a tower that is not CLIP's: the relevance lives in CLIP's joint image-text space."""
        tower = handle.base.config.vision_config.model_type
        if tower != "clip_vision_model":
            raise ValueError(
                f"CDPruner scores each patch against the question in CLIP's joint space (CLIP's per-patch "
                f"image embedding and its text tower); this model's vision tower is {tower}, whose image "
                "embedding is pooled by an attention head with no per-patch projection into its text space "
                "(SigLIP), so there is no faithful relevance score: CDPruner does not run on this model"
            )

    def describe(self, settings: Settings, family: str | None = None) -> str:
        theta = "" if self.theta is None else f", theta={self.theta}"
        return f"CDPruner {settings.tokens}{self.unit(family)}{theta}"

    def tile_tokens(self, settings: Settings, side: int) -> int:
        return settings.tokens

    def reduce_tiles(
        self, signals: TowerSignals, settings: Settings, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> TileOutput:
        features = project(signals.patches)  # (T, N, E): stock LLaVA's tokens, before any is dropped
        with torch.no_grad():  # the choice is discrete; gradients, if any, flow through the kept features
            raw = signals.scores if signals.scores is not None else raw_relevance(*self.embeddings(signals, settings))
            scores = normalised_relevance(raw, self.theta, signals.score_span)  # (T, N)
            kept = dpp_select(features, scores, settings.tokens).sort(dim=1).values  # (T, k)
        tokens = take_tokens(features, kept)  # (T, k, E)
        return TileOutput(tokens, kept, kept_tiles(kept, signals.side))

    def score_span(self, signals: TowerSignals, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # kept on the signals: reduce_tiles scores these tiles with them, not again
            signals.scores = raw_relevance(*self.embeddings(signals, settings))  # (T, N)
        return signals.scores.min(), signals.scores.max()

    @staticmethod
    def embeddings(signals: TowerSignals, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, N, P) the patches' and (M, P) the question's CLIP embeddings; the question's once per call
        (every image, every chunk of a video's frames), kept on the call with the text tower's label."""
        from ..clip_text import clip_text_for

        if not isinstance(settings.text, str) or not settings.text.strip():
            raise ValueError("CDPruner chooses by the question: pass it per call, handle.use(..., text='...')")
        handle, patches = signals.handle, signals.patches  # (T, N, C) the feature layer's patch states
        clip = clip_text_for(handle.base.config.vision_config)
        with torch.no_grad():
            image_embeds = clip.embed_patches(post_layernorm(handle.base.vision_tower)(patches))  # (T, N, P)
            call = handle.current_call()
            if call is None or call.text_embeds is None or call.text_tower != clip.label:
                text_embeds = clip.embed_text(settings.text, patches.device)
                if call is not None:
                    call.text_tower, call.text_embeds = clip.label, text_embeds
            else:
                text_embeds = call.text_embeds
        return image_embeds, text_embeds


def post_layernorm(vision_tower: nn.Module) -> nn.Module:
    """The CLIP tower's final LayerNorm, which LLaVA never runs but CLIP's image embedding starts with."""
    for name, module in vision_tower.named_modules():
        if name.endswith("post_layernorm"):
            return module
    raise ValueError(f"CDPruner needs the vision tower's post_layernorm; {type(vision_tower).__name__} has none")
