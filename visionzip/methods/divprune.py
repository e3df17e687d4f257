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

from ..similarity import bfloat16_matmul_pays, cosine_gram, screening_products, unit_rows
from .base import Method

if TYPE_CHECKING:
    from ..settings import Settings

SCREEN_MIN_ROWS = 1024  # below this the dense float32 matrix is cheap (a LLaVA-1.5 image has 576 rows)
SCREEN_BAND = 256  # rows of the screened products converted at once: a band stays in cache
LOOKAHEAD = 64  # picks a screened guess runs ahead (2,928 rows, 320 picks: 7 products, 320 rows in all)


def divprune_select(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, E) rows -> (tokens,) ascending indices of the rows greedy max-min diversity keeps."""
    return divprune_order(features, tokens).sort().values


def divprune_order(features: torch.Tensor, tokens: int, screen: bool | None = None) -> torch.Tensor:
    """(N, E) rows -> (tokens,) the indices of the rows greedy max-min diversity picks, in pick order:
    the choice at any smaller budget is a prefix of it (the greedy loop only stops earlier).

    D = 1 - cosine similarity.  First pick: the row whose nearest neighbour (itself excluded) is
    farthest; every next pick: the row farthest from its nearest already-picked row (max over j of
    min over picked s of D[s, j]); ties go to the first index, as torch.argmax gives them.

    Distances are computed in at least float32, where the official code uses the model's dtype
    (fp16): in bf16 the self-distances are not 0 and near-ties flip.  Picked rows leave the race by
    their own distance, set to -inf (a running minimum keeps it), where the official code relies on
    their ~0 self-distance to lose; with duplicate rows that self-distance can tie and win, picking a
    row twice.

    Two ways to the same choice (`screen`: None picks by device and size): the dense one computes all
    N x N float32 distances (`cosine_gram`); the screened one (`screened_order`), where a bfloat16
    product is several times faster than a float32 one, computes float32 rows only for the picks.
    """
    num_rows = features.shape[0]
    if not 1 <= tokens <= num_rows:
        raise ValueError(f"DivPrune keeps 1 to {num_rows} of these {num_rows} rows, got tokens={tokens}")
    if screen is None:  # a screen pays off when few rows are picked out of many (float32 rows: picks x N x E)
        screen = num_rows >= SCREEN_MIN_ROWS and tokens * 4 <= num_rows and bfloat16_matmul_pays(features.device)
    return screened_order(features, tokens) if screen else dense_order(features, tokens)


def dense_order(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """divprune_order from the whole N x N distance matrix (half of one product, by symmetry); each pick
    then folds one row of it into the running minimum: three small operations per pick, none over the
    candidates in Python, and no `.item()`, so the host never waits for a GPU."""
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


def screened_order(features: torch.Tensor, tokens: int, lookahead: int = LOOKAHEAD) -> torch.Tensor:
    """divprune_order with float32 distances only where a pick depends on them, found by a bfloat16
    screen (`screening_products`: every cosine within a known bound of its float32 value).

    First pick: only rows whose screened nearest-neighbour similarity is within twice the bound of the
    lowest can have the farthest nearest neighbour; their float32 rows decide.  Every later pick reads
    only float32 rows (of the rows picked so far), so the screen decides nothing there; it only guesses
    which rows will be needed next: the greedy run `lookahead` picks ahead on screened rows, whose float32
    rows are then computed in one product.  A pick outside the guess starts the next guess."""
    unit = unit_rows(features)  # (N, E) float32 or wider
    products, norms, bound = screening_products(features)  # (N, N) bfloat16, (N,)
    products.fill_diagonal_(-float("inf"))
    similarity = torch.cat([(band.float() / norms).amax(dim=1) for band in products.split(SCREEN_BAND)]) / norms
    contenders = (similarity <= similarity.min() + 2 * bound + 2**-20).nonzero().squeeze(1)  # ascending
    products.fill_diagonal_(float("inf"))  # a guessed pick's screened distance to itself: -inf, out of the race
    distance = (unit[contenders] @ unit.T).neg_().add_(1.0)  # (c, N) float32 1 - cos
    distance[torch.arange(len(contenders)), contenders] = float("inf")  # not its own nearest neighbour
    first = int(contenders[distance.min(dim=1).values.argmax()])  # ties to the first index
    rows = dict(zip(contenders.tolist(), distance, strict=True))  # float32 distance rows by index
    picks, closest = [first], torch.full_like(distance[0], float("inf"))  # (N,) distance to the picked set
    while True:
        pick = picks[-1]
        if pick not in rows:  # guess no further than the picks still to make
            guesses = guess_picks(closest, products, norms, pick, min(lookahead, tokens - len(picks) + 1))
            rows.update(distance_rows(unit, guesses, rows))
        closest = torch.minimum(closest, rows[pick])
        closest[pick] = -float("inf")  # picked: out of the race
        if len(picks) == tokens:
            return torch.tensor(picks, device=features.device)
        picks.append(int(closest.argmax()))  # ties to the first index


def guess_picks(closest: torch.Tensor, products: torch.Tensor, norms: torch.Tensor, pick: int, count: int) -> list[int]:
    """`pick` and the `count` - 1 rows the greedy would pick after it on the screened distances."""
    guesses = [pick]
    for _ in range(1, count):
        screened = 1 - products[guesses[-1]].float() / norms / norms[guesses[-1]]  # (N,)
        closest = torch.minimum(closest, screened)
        guesses.append(int(closest.argmax()))
    return guesses


def distance_rows(unit: torch.Tensor, wanted: list[int], known: dict) -> dict[int, torch.Tensor]:
    """The float32 (or wider) distance rows, 1 - cos, (N,) each, of the `wanted` rows not yet `known`: one product."""
    new = [row for row in dict.fromkeys(wanted) if row not in known]
    return dict(zip(new, (unit[new] @ unit.T).neg_().add_(1.0), strict=True))  # (len(new), N)


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
