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

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..merge import take_tokens
from ..selection import kept_tiles
from ..similarity import cosine_gram
from .base import Method, TileOutput

if TYPE_CHECKING:
    from ..settings import Handle, Settings
    from ..tower import TowerSignals


# -- the method: pure tensor functions ------------------------------------------------------------
def relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """(T, N, P) image and (M, P) text embeddings -> (T, N) relevance, in the wider of their dtypes.

    r = mean over segments of -cos(image, text), then (r - min + 1e-6) / (max - min) with min and max
    over all T tiles together (the official code normalises the whole batch of tiles at once).  With
    `theta` (the paper's option, commented out in the official code): r -> exp(theta / (2 (1 - theta)) r).
    """
    dtype = torch.promote_types(image_embeds.dtype, text_embeds.dtype)
    image = image_embeds.to(dtype) / image_embeds.to(dtype).norm(dim=-1, keepdim=True)
    text = text_embeds.to(dtype) / text_embeds.to(dtype).norm(dim=-1, keepdim=True)
    scores = (-(image @ text.T)).mean(dim=-1)  # (T, N): the minus sign is the official one
    scores = (scores - scores.min() + 1e-6) / (scores.max() - scores.min())
    if theta is not None:
        scores = torch.exp(theta / (2 * (1 - theta)) * scores)
    return scores


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """(T, N, E) projector outputs, (T, N) relevance -> (T, N, N) L = diag(r) S diag(r), S the cosine
    similarity of the features, in float32 or wider (the official code casts to float32); every tile at
    once, from the symmetric half (`cosine_gram`)."""
    dtype = torch.promote_types(torch.promote_types(features.dtype, relevance.dtype), torch.float32)
    return cosine_gram(features.to(dtype), relevance)


def fast_greedy_map(kernel: torch.Tensor, steps: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al., 2018), one kernel per tile at once.

    kernel: (T, N, N) positive semi-definite.  Returns (T, steps) picks in the order picked.  Each step
    takes j = argmax of the remaining marginal gains d2 (first index on ties), then e = (L[j] - sum_t
    c_t[j] c_t) / sqrt(d2[j]), d2 -= e^2, d2[j] = -inf.  Past the kernel's numerical rank d2 turns 0 or
    negative and the official code goes NaN (repeated picks); here the rest are then the lowest unpicked
    indices, so the count stays exact (unreachable at the official budgets).
    """
    tiles, size, _ = kernel.shape
    rows = torch.arange(tiles, device=kernel.device)
    vectors = kernel.new_zeros(steps, tiles, size)  # (steps, T, N) the c_t
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (T, N) d2
    picks = torch.empty(steps, tiles, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(tiles, size, dtype=torch.bool, device=kernel.device)
    for step in range(steps):
        best = gains.argmax(dim=-1)  # (T,)
        picks[step] = best
        projected = torch.einsum("st,stn->tn", vectors[:step, rows, best], vectors[:step])  # (T, N)
        vector = (kernel[rows, best] - projected) / gains[rows, best].sqrt().unsqueeze(-1)
        vectors[step] = vector
        gains = gains - vector.square()
        taken[rows, best] = True
        # NaN only past the numerical rank: then below every open gain; picked ones stay -inf
        gains = torch.where(gains.isnan(), torch.finfo(gains.dtype).min, gains).masked_fill(taken, -torch.inf)
    return picks.T


# -- the method ---------------------------------------------------------------------------------------
class CDPruner(Method):
    name = "cdpruner"
    title = "CDPruner"
    stage = "projector"
    budget_rule = "per tile"
    reference = "arXiv 2506.10967; github.com/Theia-4869/CDPruner"
    reads_text = True
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
        from ..clip_text import clip_text_for

        if not isinstance(settings.text, str) or not settings.text.strip():
            raise ValueError("CDPruner chooses by the question: pass it per call, handle.use(..., text='...')")
        handle = signals.handle
        clip = clip_text_for(handle.base.config.vision_config)
        patches = signals.patches  # (T, N, C) the feature layer's patch states
        features = project(patches)  # (T, N, E): stock LLaVA's tokens, before any is dropped
        with torch.no_grad():  # the choice is discrete; gradients, if any, flow through the kept features
            image_embeds = clip.embed_patches(post_layernorm(handle.base.vision_tower)(patches))  # (T, N, P)
            scores = relevance(image_embeds, clip.embed_text(settings.text, patches.device), self.theta)
            kept = fast_greedy_map(dpp_kernel(features, scores), settings.tokens).sort(dim=1).values  # (T, k)
        tokens = take_tokens(features, kept)  # (T, k, E)
        call = handle.current_call()
        if call is not None:
            call.text_tower = clip.label
        return TileOutput(tokens, kept, kept_tiles(kept, signals.side))


def post_layernorm(vision_tower: nn.Module) -> nn.Module:
    """The CLIP tower's final LayerNorm, which LLaVA never runs but CLIP's image embedding starts with."""
    for name, module in vision_tower.named_modules():
        if name.endswith("post_layernorm"):
            return module
    raise ValueError(f"CDPruner needs the vision tower's post_layernorm; {type(vision_tower).__name__} has none")
