"""The Gram matrix DivPrune and CDPruner choose by, against plain float64 loops: built from row bands and
mirrored, it must hold every pair's weighted cosine, across band edges and for a batch of tiles."""

import math

import pytest
import torch

from visionzip.similarity import BLOCK_ROWS, cosine_gram, screening_products


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("shape", [(1, 3), (BLOCK_ROWS + 1, 5), (2, 2 * BLOCK_ROWS + 7, 4)])
def test_every_pair_holds_its_weighted_cosine(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    vectors = torch.randn(*shape, dtype=torch.float64, generator=generator)
    weights = torch.rand(shape[:-1], dtype=torch.float64, generator=generator)
    tiles = vectors.reshape(-1, *shape[-2:]).tolist()
    gram, weighted = cosine_gram(vectors).reshape(len(tiles), shape[-2], -1), cosine_gram(vectors, weights)
    weighted, weights = weighted.reshape(gram.shape), weights.reshape(len(tiles), -1)
    for t, rows in enumerate(tiles):
        for i, a in enumerate(rows):
            for j, b in enumerate(rows):
                assert gram[t, i, j].item() == pytest.approx(cosine(a, b), abs=1e-12)
                expected = weights[t, i].item() * cosine(a, b) * weights[t, j].item()
                assert weighted[t, i, j].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gram_is_float32_or_wider_and_the_vectors_are_left_as_they_were(dtype):
    vectors = torch.randn(40, 8).to(dtype)
    before = vectors.clone()
    gram = cosine_gram(vectors, torch.rand(40))
    assert gram.dtype == torch.float32 and torch.equal(vectors, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_screened_cosines_lie_within_their_bound_of_the_float64_cosine(dtype):
    """DivPrune's screen may only rule a row out by this bound: it must hold for every pair, for rows of
    very different lengths too (the products round relative to each pair's own size)."""
    generator = torch.Generator().manual_seed(11)
    lengths = torch.logspace(-3, 3, 200, dtype=torch.float64)[torch.randperm(200, generator=generator)]
    vectors = (torch.randn(200, 96, dtype=torch.float64, generator=generator) * lengths[:, None]).to(dtype)
    products, norms, bound = screening_products(vectors)
    assert products.dtype == torch.bfloat16 and norms.dtype == torch.float32 and bound < 0.03
    wide = vectors.double()
    unit = wide / wide.norm(dim=1, keepdim=True)
    error = products.double() / norms.double()[:, None] / norms.double()[None, :] - unit @ unit.T
    assert float(error.abs().max()) <= bound
    assert float(error.abs().max()) > bound / 16  # worst cases add up; it is not loose by orders of magnitude
