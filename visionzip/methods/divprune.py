"""DivPrune (Alvar et al., CVPR 2025): on one image's stock packed projector output (LLaVA-NeXT: base
tile, unpadded grid and newline vectors; LLaVA-1.5: the 576 patches), keep the T most diverse rows by
greedy max-min cosine distance, in ascending order.  The budget is an absolute count per image.

Newline rows are candidates like any other (the official code's behaviour): all of an image's
newline vectors are one vector, so at most one normally survives, and none can be the first pick
(its nearest neighbour, another newline, is at distance 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..similarity import cosine_gram
from .base import Method

if TYPE_CHECKING:
    from ..settings import Settings


def divprune_select(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, E) rows -> (tokens,) ascending indices of the rows greedy max-min diversity keeps."""
    return divprune_order(features, tokens).sort().values


def divprune_order(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, E) rows -> (tokens,) the indices of the rows greedy max-min diversity picks, in pick order:
    the choice at any smaller budget is a prefix of it (the greedy loop only stops earlier).

    D = 1 - cosine similarity.  First pick: the row whose nearest neighbour (itself excluded) is
    farthest; every next pick: the row farthest from its nearest already-picked row (max over j of
    min over picked s of D[s, j]); ties go to the first index, as torch.argmax gives them.

    Distances are computed in at least float32, where the official code uses the model's dtype
    (fp16): in bf16 the self-distances are not 0 and near-ties flip.  Picked rows leave the race by
    their own distance, set to -inf after the first pick (a running minimum keeps it), where the
    official code relies on their ~0 self-distance to lose; with duplicate rows that self-distance can
    tie and win, picking a row twice.

    Cost: the first pick needs every row's nearest neighbour, so the N x N distances are computed once
    (`cosine_gram`: half of one full product, by symmetry); each later pick then folds one row of them
    into the running minimum (an N-vector read, cheaper than the N x E matrix-vector product that would
    recompute it).  Three small operations per pick, none over the candidates in Python, and no `.item()`:
    the host never waits for the GPU.
    """
    num_rows = features.shape[0]
    if not 1 <= tokens <= num_rows:
        raise ValueError(f"DivPrune keeps 1 to {num_rows} of these {num_rows} rows, got tokens={tokens}")
    distance = cosine_gram(features).neg_().add_(1.0)  # (N, N) 1 - cos, symmetric
    distance.fill_diagonal_(float("inf"))  # the first pick's nearest neighbour is another row
    nearest = distance.min(dim=1).values  # (N,) each row's nearest-neighbour distance; inf when N = 1
    distance.fill_diagonal_(-float("inf"))  # from here on: a picked row's running minimum is -inf
    pick = nearest.argmax().view(1)
    picks = [pick]
    closest = distance.index_select(0, pick).squeeze(0)  # (N,) distance of each row to the picked set
    for _ in range(1, tokens):
        pick = closest.argmax().view(1)  # ties to the first index
        picks.append(pick)
        closest = torch.minimum(closest, distance.index_select(0, pick).squeeze(0))
    return torch.cat(picks)


class DivPrune(Method):
    name = "divprune"
    title = "DivPrune"
    stage = "projector"
    budget_rule = "per image"
    reference = "arXiv 2503.02175 (CVPR 2025); github.com/vbdi/divprune"

    def check(self, settings: Settings, side: int) -> None:
        tokens = settings.tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(
                f"{self.title}: tokens={tokens!r} is out of range; it keeps 1 to N of an image's N stock tokens "
                f"(LLaVA-1.5 and video frames: {side * side}; LLaVA-NeXT: by the image size, e.g. 2928 at 672x672)"
            )

    def image_tokens(self, settings: Settings, stock_tokens: int) -> int:
        if settings.tokens > stock_tokens:
            raise ValueError(
                f"{self.title}: tokens={settings.tokens} is more than this image's {stock_tokens} stock tokens; "
                f"need 1 <= tokens <= {stock_tokens}"
            )
        return settings.tokens

    def reduce_image(self, features: torch.Tensor, settings: Settings) -> torch.Tensor:
        return divprune_select(features, self.image_tokens(settings, features.shape[0]))

    def image_order(self, features: torch.Tensor) -> torch.Tensor:
        return divprune_order(features, features.shape[0])
