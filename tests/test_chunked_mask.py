"""Llama 4's chunked attention, ``masks.chunked(size)``: the same pattern as transformers'
chunked causal mask, the tiled engine equal to the reference on it, and a cost that
grows linearly with the length (the engine skips every other chunk)."""

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.backends.chunked import planned_entries
from attnkit.masks import Grid

sdpa = attnkit.scaled_dot_product_attention


@pytest.mark.parametrize("size", [1, 5, 16])
def test_the_pattern_is_transformers_chunked_causal_mask(size):
    masking_utils = pytest.importorskip("transformers.masking_utils")
    n = 40
    rule = masking_utils.chunked_causal_mask_function(size, torch.zeros(1, dtype=torch.long))
    q = torch.arange(n).view(-1, 1)
    k = torch.arange(n).view(1, -1)
    want = rule(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q, k)
    assert torch.equal(masks.chunked(size).materialize(n), want.expand(n, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tiled_engine_equals_the_reference_on_chunks(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 700, 32, generator=g) for _ in range(3))
    q2 = q[:, :, 300:]  # L != S: the queries are the last 400 positions
    m = masks.chunked(128)
    for query in (q, q2):
        leaves = [t.to(dtype).requires_grad_() for t in (query, k, v)]
        got = sdpa(*leaves, m, backend="chunked")
        exact = [t.detach().double().requires_grad_() for t in leaves]
        want = sdpa(*exact, m, backend="reference")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.double() - want).abs().max() < tol
        dout = torch.randn(got.shape, generator=g)
        for a, b in zip(torch.autograd.grad(got, leaves, dout.to(dtype)),
                        torch.autograd.grad(want, exact, dout.double())):
            assert (a.double() - b).abs().max() < 10 * tol * (1 + b.abs().max())


def test_cost_is_linear_in_the_length():
    """Entries the engine computes, read from its plan: 4x the length, 4x the work (a
    causal mask would be 16x), and about n * (size / 2 + a tile) in all."""
    size = 512
    entries = {n: planned_entries(masks.chunked(size), Grid(n, n)) for n in (4096, 16384)}
    assert entries[16384] / entries[4096] < 4.1
    assert entries[16384] <= 16384 * (size / 2 + 256)
    causal = planned_entries(masks.causal(), Grid(16384, 16384))
    assert entries[16384] < causal / 10
