"""masks.selected: each query row (DSA) or block of rows (NSA) attends to the keys it
chose. The gathering kernel equals the reference with the materialised mask, outputs and
gradients, with GQA, L != S, shared or per-head choices, unused slots and causal."""

import pytest
import torch

import attnkit
from attnkit import masks, scaled_dot_product_attention as sdpa


def topk_indices(B, Hi, L, S, k, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, Hi, L, S, generator=g)
    if causal:
        pos = torch.arange(L).view(-1, 1) + (S - L)
        scores = scores.masked_fill(torch.arange(S) > pos, -1.0)
    idx = scores.topk(min(k, S), -1).indices
    if causal:  # keys past the row's position are unused slots, as DSA's indexer marks them
        top = scores.gather(-1, idx)
        idx = idx.masked_fill(top < 0, -1)
    return idx


@pytest.mark.parametrize("B,Hq,Hkv,Hi,L,S,k", [
    (2, 4, 4, 1, 33, 33, 7),     # shared by the heads, as DSA's indexer
    (1, 8, 2, 8, 40, 57, 12),    # per head, GQA, L != S
    (2, 6, 2, 6, 17, 29, 29),    # per head, GQA, every key chosen
    (1, 4, 1, 4, 5, 300, 64),    # MQA, few rows over many keys
])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients_equal_the_reference(B, Hq, Hkv, Hi, L, S, k, causal):
    torch.manual_seed(1)
    q = torch.randn(B, Hq, L, 16, dtype=torch.float64, requires_grad=True)
    kk = torch.randn(B, Hkv, S, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, 8, dtype=torch.float64, requires_grad=True)
    idx = topk_indices(B, Hi, L, S, k, causal=causal)
    m = masks.selected(idx)
    assert attnkit.explain(q, kk, v, attn_mask=m, is_causal=causal).backend == "chunked"
    got = sdpa(q, kk, v, attn_mask=m, is_causal=causal)
    dense = m.materialize(L, S)
    want = sdpa(q, kk, v, attn_mask=dense, is_causal=causal, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    dout = torch.randn_like(got)
    g1 = torch.autograd.grad(got, (q, kk, v), dout)
    g2 = torch.autograd.grad(want, (q, kk, v), dout)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_rows_that_choose_nothing_get_zeros_and_lse_minus_inf():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    idx = torch.tensor([[[[0, 3], [-1, -1], [8, 8], [-1, 2]]]])
    out, lse = sdpa(q, k, v, attn_mask=masks.selected(idx), return_lse=True)
    assert out[:, :, 1].abs().max() == 0 and torch.isinf(lse[:, :, 1]).all()
    # a repeated choice counts once
    torch.testing.assert_close(out[:, :, 2], v[:, :, 8])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_flash_attention_rule(dtype):
    torch.manual_seed(2)
    B, H, L, S, D = 1, 4, 64, 96, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    idx = topk_indices(B, 1, L, S, 16, causal=True)
    m = masks.selected(idx)
    exact = sdpa(q, k, v, attn_mask=m, is_causal=True)
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    got = sdpa(qh, kh, vh, attn_mask=m, is_causal=True)
    dense = (m & masks.causal()).materialize(L, S)
    peer = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense)
    err, ref = (got.double() - exact).abs().max(), (peer.double() - exact).abs().max()
    assert err <= 2 * ref + 1e-6, (err, ref)


def test_block_level_selection_runs_the_tiled_engine_and_equals_the_reference():
    torch.manual_seed(3)
    B, H, L, bs = 1, 2, 64, 8
    blocks = torch.randint(-1, L // bs, (B, H, L // bs, 3))
    m = masks.selected(blocks, block_size=bs)
    q, k, v = (torch.randn(B, H, L, 16, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    got = sdpa(q, k, v, attn_mask=m, is_causal=True)
    want = sdpa(q, k, v, attn_mask=m.materialize(L, L), is_causal=True, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_bad_indices_raise():
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="integer"):
        masks.selected(torch.rand(1, 1, 8, 2))
    with pytest.raises(ValueError, match="one entry per query rows"):
        sdpa(q, k, v, attn_mask=masks.selected(torch.zeros(1, 1, 7, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="must be < 8"):
        sdpa(q, k, v, attn_mask=masks.selected(torch.full((1, 1, 8, 2), 8)))


def test_block_level_with_gqa_and_fewer_queries_than_keys():
    torch.manual_seed(4)
    B, Hq, Hkv, L, S, bs = 2, 4, 2, 24, 64, 8
    blocks = torch.randint(-1, S // bs, (B, Hq, -(-L // bs), 3))
    m = masks.selected(blocks, block_size=bs)
    q = torch.randn(B, Hq, L, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, S, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = sdpa(q, k, v, attn_mask=m, is_causal=True)
    want = sdpa(q, k, v, attn_mask=m.materialize(L, S), is_causal=True, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)),
                    torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
