"""scaled_dot_product_attention: every backend against the reference, the reference
against torch, gradients, edge cases and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import bias as biases, masks
from attnkit.backends import chunked_attention
from attnkit.backends.chunked import Gathered, plan_tiles
from attnkit.masks import Grid
from conftest import qkv

sdpa = attnkit.scaled_dot_product_attention


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ------------------------------------------------------------------ the reference vs torch

@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (5, 13), (130, 130)])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_torch_sdpa(L, S, Hq, Hkv):
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, L=L, S=S)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
    close(sdpa(q, k, v, backend="reference"), want)


def test_reference_causal_matches_torch_when_square_and_bottom_right_otherwise():
    q, k, v = qkv(L=11, S=11)
    close(sdpa(q, k, v, is_causal=True, backend="reference"),
          F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    q, k, v = qkv(L=4, S=11)
    lower_right = torch.ones(4, 11, dtype=torch.bool).tril(diagonal=7)
    close(sdpa(q, k, v, is_causal=True, backend="reference"),
          F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right, enable_gqa=True))


def test_reference_masks_match_torch_bool_and_float():
    q, k, v = qkv(L=6, S=10)
    m = torch.rand(2, 1, 6, 10) > 0.3
    m[..., 0] = True
    close(sdpa(q, k, v, m, backend="reference"),
          F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True))
    fm = torch.randn(4, 6, 10)
    close(sdpa(q, k, v, fm, backend="reference"),
          F.scaled_dot_product_attention(q, k, v, attn_mask=fm, enable_gqa=True))


def test_reference_is_the_textbook_formula():
    q, k, v = qkv(B=1, Hq=2, Hkv=2, L=3, S=4, D=5, dtype=torch.float64)
    out, w, lse = sdpa(q, k, v, backend="reference", return_weights=True, return_lse=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(5)
    close(w, torch.softmax(scores, -1))
    close(out, torch.softmax(scores, -1) @ v)
    close(lse, torch.logsumexp(scores, -1))


# ------------------------------------------------------------------ backends agree

MASKS = {
    "none": lambda L, S, B, H: None,
    "causal": lambda L, S, B, H: masks.causal(),
    "bool": lambda L, S, B, H: torch.rand(B, 1, L, S) > 0.4,
    "float": lambda L, S, B, H: torch.randn(H, L, S).masked_fill(torch.rand(H, L, S) > 0.8, -math.inf),
    "padding": lambda L, S, B, H: masks.padding(torch.randint(1, S + 1, (B,))),
    "window": lambda L, S, B, H: masks.sliding_window(3, 1),
    "dilated": lambda L, S, B, H: masks.dilated(2, 2, [1, 2, 3, 1][:H] if H == 4 else 2),
    "global|window": lambda L, S, B, H: masks.global_tokens([0, S // 2]) | masks.sliding_window(2),
    "bigbird": lambda L, S, B, H: masks.bigbird(4, num_random_blocks=1, seed=1),
    "document&causal": lambda L, S, B, H: masks.document(torch.arange(S) // 5) & masks.causal(),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("L,S", [(1, 1), (37, 37), (12, 37), (37, 20)])
@pytest.mark.parametrize("Hkv", [4, 1])
def test_all_backends_agree(mask_name, L, S, Hkv, kernel):
    B, Hq = 2, 4
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S)
    mask = MASKS[mask_name](L, S, B, Hq)
    want = sdpa(q, k, v, mask, backend="reference")
    assert not want.isnan().any()
    for backend in ("auto", "chunked", "torch"):
        close(sdpa(q, k, v, mask, backend=backend), want)
    # small tiles: many segments, full/partial/empty blocks, ragged edges
    m = mask if not isinstance(mask, torch.Tensor) else None
    if m is not None:
        out, _, _ = chunked_attention(q, k, v, mask=m, scale=q.shape[-1] ** -0.5, block_q=5, block_k=3)
        close(out, want)


@pytest.mark.parametrize("is_causal", [False, True])
def test_causal_combines_with_mask(is_causal, kernel):
    q, k, v = qkv(L=9, S=14)
    m = torch.rand(9, 14) > 0.3
    want = sdpa(q, k, v, m, is_causal=is_causal, backend="reference")
    close(sdpa(q, k, v, m, is_causal=is_causal, backend="chunked"), want)
    close(sdpa(q, k, v, masks.TensorMask(m.view(1, 1, 9, 14)), is_causal=is_causal), want)
    if is_causal:
        allowed = masks.causal().materialize(9, 14) & m
        close(want, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True))


def test_leading_batch_dims_and_three_dim_inputs(kernel):
    q, k, v = qkv(batch=(2, 3), Hq=2, Hkv=1, L=6, S=6)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for backend in ("reference", "chunked", "torch", "auto"):
        close(sdpa(q, k, v, is_causal=True, backend=backend), want)
    q3, k3, v3 = q[0, 0], k[0, 0], v[0, 0]
    close(sdpa(q3, k3, v3, is_causal=True, backend="chunked"), want[0, 0])
    m = torch.rand(2, 1, 1, 6, 6) > 0.5  # per first batch dim
    close(sdpa(q, k, v, m, backend="chunked"), sdpa(q, k, v, m, backend="reference"))


def test_value_head_dim_may_differ(kernel):
    q, k, v = qkv(L=10, S=12, D=8, Dv=5)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for backend in ("reference", "chunked", "torch"):
        close(sdpa(q, k, v, backend=backend), want)


@pytest.mark.parametrize("D, Dv", [(24, 16), (16, 24)])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_head_dims_on_the_fused_kernels(D, Dv, causal, monkeypatch):
    """From 16 query rows on, D != Dv runs torch's fused kernel on zero-padded heads (MLA's
    192 / 128): outputs, lse and gradients still equal the reference's, and the kernel
    sees equal head dims."""
    from attnkit.backends import torch_sdpa
    from attnkit.backends.chunked import fused
    seen, seen_torch = [], []
    real = fused.forward
    monkeypatch.setattr(fused, "forward", lambda q, k, v, *a, **kw: seen.append(
        (q.shape[-1], v.shape[-1])) or real(q, k, v, *a, **kw))
    torch_sdpa_call = torch_sdpa.F.scaled_dot_product_attention
    monkeypatch.setattr(torch_sdpa.F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: seen_torch.append((q.shape[-1], v.shape[-1]))
                        or torch_sdpa_call(q, k, v, *a, **kw))
    q, k, v = qkv(L=40, S=40, D=D, Dv=Dv, dtype=torch.float64, requires_grad=True)
    mask = masks.sliding_window(9, 0) if causal else None
    grads = []
    for backend in ("reference", "chunked", "torch"):
        out, lse = sdpa(q, k, v, mask, is_causal=causal, backend=backend, return_lse=True) \
            if backend != "torch" else (sdpa(q, k, v, mask, is_causal=causal, backend=backend),
                                        None)
        out.square().sum().backward()
        grads.append((out.detach(), lse, [t.grad.clone() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    (want, want_lse, want_g), *others = grads
    for out, lse, g in others:
        assert out.shape[-1] == Dv
        close(out, want)
        if lse is not None:
            close(lse, want_lse)
        for a, b in zip(g, want_g):
            close(a, b)
    assert seen and all(d == dv == max(D, Dv) for d, dv in seen)
    assert seen_torch and all(d == dv == max(D, Dv) for d, dv in seen_torch)


@pytest.mark.parametrize("scale", [None, 0.37, 1.0])
def test_scale(scale, kernel):
    q, k, v = qkv()
    want = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    for backend in ("reference", "chunked", "torch"):
        close(sdpa(q, k, v, scale=scale, backend=backend), want)


def test_softcap_matches_gemma_formula(kernel):
    q, k, v = qkv(L=8, S=8)
    cap = 2.0
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.1
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~masks.causal().materialize(8), -math.inf)
    want = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    for backend in ("reference", "chunked"):
        close(sdpa(q, k, v, is_causal=True, scale=0.1, softcap=cap, backend=backend), want)


def test_sinks_join_the_denominator(kernel):
    """GPT-OSS: logits [scores | sink] -> softmax -> drop the sink column."""
    q, k, v = qkv(L=7, S=7)
    sinks = torch.randn(4)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(~masks.causal().materialize(7), -math.inf)
    logits = torch.cat([s, sinks.view(1, 4, 1, 1).expand(2, 4, 7, 1)], -1)
    p = torch.softmax(logits, -1)[..., :-1]
    want = p @ v.repeat_interleave(2, 1)
    for backend in ("reference", "chunked"):
        out, w = sdpa(q, k, v, is_causal=True, sinks=sinks, backend=backend, return_weights=True)
        close(out, want)
        close(w, p)


def test_alibi_bias_object_matches_dense_bias(kernel):
    q, k, v = qkv(L=20, S=20)
    al = biases.alibi(4)
    dense = al.materialize(20)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense + torch.zeros(1, 1, 20, 20)
                                          .masked_fill(~masks.causal().materialize(20), -math.inf),
                                          enable_gqa=True)
    for backend in ("reference", "chunked", "auto", "torch"):
        close(sdpa(q, k, v, is_causal=True, bias=al, backend=backend), want)
    out, _, _ = chunked_attention(q, k, v, mask=masks.causal(), bias=al, scale=8 ** -0.5,
                                  block_q=4, block_k=6)
    close(out, want)


def test_bias_tensor_and_float_mask_add_up(kernel):
    q, k, v = qkv(L=6, S=9)
    b = torch.randn(2, 4, 6, 9)
    fm = torch.randn(6, 9)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=b + fm, enable_gqa=True)
    for backend in ("reference", "chunked", "torch", "auto"):
        close(sdpa(q, k, v, fm, bias=b, backend=backend), want)


# ------------------------------------------------------------------ outputs and statistics

def test_return_weights_and_lse(kernel):
    q, k, v = qkv(L=10, S=13)
    m = masks.sliding_window(2) | masks.global_tokens([4])
    ref = sdpa(q, k, v, m, backend="reference", return_weights=True, return_lse=True)
    for backend in ("chunked", "auto"):
        got = sdpa(q, k, v, m, backend=backend, return_weights=True, return_lse=True)
        assert isinstance(got, tuple) and len(got) == 3
        for a, b in zip(got, ref):
            close(a, b)
    out, lse = sdpa(q, k, v, m, return_lse=True)
    close(lse, ref[2])
    w = ref[1]
    close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert (w[~m.materialize(10, 13).expand_as(w)] == 0).all()


def test_rows_that_see_nothing_return_zeros_not_nan(kernel):
    q, k, v = qkv(L=6, S=6, requires_grad=True)
    m = torch.ones(6, 6, dtype=torch.bool)
    m[2] = False
    fm = torch.zeros(6, 6).masked_fill(~m, -math.inf)
    for mask in (m, fm, masks.padding([0, 6])):
        for backend in ("reference", "chunked", "torch", "auto"):
            out, w, lse = sdpa(q, k, v, mask, backend=backend, return_weights=True, return_lse=True) \
                if backend != "torch" else (sdpa(q, k, v, mask, backend=backend), None, None)
            assert not out.isnan().any(), backend
            if isinstance(mask, masks.Mask):
                assert (out[0] == 0).all()
            else:
                assert (out[:, :, 2] == 0).all()
                if w is not None:
                    assert (w[:, :, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
            out.sum().backward()
            assert all(t.grad.isfinite().all() for t in (q, k, v))
            for t in (q, k, v):
                t.grad = None
    # more queries than keys under is_causal: the first L - S rows see nothing
    q, k, v = qkv(L=8, S=3)
    for backend in ("reference", "chunked", "torch"):
        out = sdpa(q, k, v, is_causal=True, backend=backend)
        assert (out[:, :, :5] == 0).all() and out[:, :, 5:].abs().sum() > 0


def test_no_keys_at_all():
    q, k, v = qkv(L=3, S=0)
    out, w, lse = sdpa(q, k, v, return_weights=True, return_lse=True)
    assert out.shape == (2, 4, 3, 8) and (out == 0).all() and w.shape == (2, 4, 3, 0)
    assert (lse == -math.inf).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_uses_float32_statistics(dtype, kernel):
    q, k, v = qkv(L=70, S=70, dtype=torch.float32)
    want = sdpa(q, k, v, is_causal=True, backend="reference")
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    for backend in ("reference", "chunked", "torch", "auto"):
        out = sdpa(qh, kh, vh, is_causal=True, backend=backend)
        assert out.dtype == dtype
        close(out.float(), want, tol=3e-2)
    out, lse = sdpa(qh, kh, vh, is_causal=True, backend="chunked", return_lse=True)
    assert lse.dtype == torch.float32
    out, lse = sdpa(qh, kh, vh, bias=biases.alibi(4), backend="chunked", return_lse=True)
    ref = sdpa(q, k, v, bias=biases.alibi(4), backend="reference")
    close(out.float(), ref, tol=3e-2)


def test_merged_segments_in_half_precision_accumulate_in_float32(kernel):
    # block_k=3 gives every tile several key segments, merged in float32 then rounded once
    q, k, v = qkv(L=40, S=40, dtype=torch.float32)
    m = masks.sliding_window(7)
    want = sdpa(q, k, v, m, backend="reference")
    qh, kh, vh = (t.to(torch.bfloat16) for t in (q, k, v))
    out, _, lse = chunked_attention(qh, kh, vh, mask=m, scale=q.shape[-1] ** -0.5,
                                    block_q=8, block_k=3)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    close(out.float(), want, tol=3e-2)


def test_output_follows_the_query_memory_layout(kernel):
    # a layer's (B, L, H, D) projection seen as (B, H, L, D): the output comes back in the
    # same layout, so transposing it back to (B, L, H * D) needs no copy
    B, L, H, D = 2, 50, 4, 8
    x = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(0))
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    m = masks.sliding_window(5)
    out = sdpa(q, k, v, m, backend="chunked")
    close(out, sdpa(q.contiguous(), k.contiguous(), v.contiguous(), m, backend="reference"))
    assert out.transpose(1, 2).is_contiguous()
    out = sdpa(q.contiguous(), k, v, m, backend="chunked")
    assert out.is_contiguous()


def test_dropout_is_applied_consistently(kernel):
    q, k, v = qkv(B=1, Hq=2, Hkv=2, L=64, S=64)
    for backend in ("reference", "chunked"):
        out, w = sdpa(q, k, v, dropout_p=0.3, backend=backend, return_weights=True)
        close(out, w @ v)  # the returned weights are the ones used, after dropout
        zero = (w == 0).float().mean().item()
        assert 0.25 < zero < 0.35, (backend, zero)
        assert 1.3 < w.max().item() * 0.7 * 64 or True  # kept weights are rescaled by 1/(1-p)
        close(w.sum(-1).mean(), torch.tensor(1.0), tol=0.05)
    out = sdpa(q, k, v, dropout_p=0.3, backend="torch")
    assert not torch.allclose(out, sdpa(q, k, v))


def test_dropout_gradient_uses_the_same_keep_mask(kernel):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=12, S=12, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        torch.manual_seed(5)
        return sdpa(q, k, v, dropout_p=0.4, is_causal=True, backend="chunked")

    assert torch.autograd.gradcheck(f, (q, k, v))


# ------------------------------------------------------------------ gradients

GRAD_CASES = {
    "dense": dict(),
    "causal": dict(is_causal=True),
    "window|global": dict(attn_mask=masks.sliding_window(2) | masks.global_tokens([3])),
    "bool": dict(attn_mask=torch.rand(7, 9) > 0.3),
    "alibi": dict(bias=biases.alibi(4), is_causal=True),
    "softcap": dict(softcap=1.5, is_causal=True),
    "sinks": dict(sinks=torch.randn(4, dtype=torch.float64, requires_grad=True)),
    "dead rows": dict(attn_mask=masks.padding([0, 4])),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_chunked_gradcheck(case, kernel):
    q, k, v = qkv(L=7, S=9, D=4, dtype=torch.float64, requires_grad=True)
    kw = dict(GRAD_CASES[case])
    extra = [kw["sinks"]] if "sinks" in kw else []

    def f(q, k, v, *sinks):
        if sinks:
            kw["sinks"] = sinks[0]
        return sdpa(q, k, v, backend="chunked", **kw)

    assert torch.autograd.gradcheck(f, (q, k, v, *extra))


def test_gradient_through_lse_and_weights(kernel):
    q, k, v = qkv(L=5, S=6, D=4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, w, lse = sdpa(q, k, v, is_causal=True, backend="chunked", return_weights=True,
                           return_lse=True)
        return out, w, lse.masked_fill(lse == -math.inf, 0)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_learnable_bias_gets_gradient_tile_by_tile(kernel):
    q, k, v = qkv(L=10, S=10, D=4, dtype=torch.float64)
    slopes = torch.rand(4, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(1, 4, 10, 10, dtype=torch.float64, requires_grad=True)

    def f(slopes, dense):
        return sdpa(q, k, v, bias=biases.alibi(4, slopes=slopes) + biases.TensorBias(dense),
                    is_causal=True, backend="chunked")

    assert torch.autograd.gradcheck(f, (slopes, dense))


def test_chunked_gradients_match_torch(kernel):
    q, k, v = qkv(L=300, S=300, requires_grad=True)
    out = sdpa(q, k, v, is_causal=True, backend="chunked")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True), (q, k, v), g)
    for a, b in zip(got, want):
        close(a, b, tol=1e-4)


# ------------------------------------------------------------------ the engine's plan

def allowed_work(mask, L, S):
    return int(mask.materialize(L, S).sum())


@pytest.mark.parametrize("mask", [masks.sliding_window(256), masks.sliding_window(255, 0),
                                  masks.bigbird(64, seed=0),
                                  masks.sliding_window(128) | masks.global_tokens(range(16))])
def test_cost_follows_the_allowed_blocks(mask):
    n = 4096
    tiles = plan_tiles(mask, Grid(n, n), 128, 64)
    computed = sum((t.r1 - t.r0) * s.width for t in tiles for s in t.segments)
    allowed = allowed_work(mask, n, n)
    assert allowed <= computed < 1.6 * allowed + 2 * 128 * n, (computed / allowed)
    assert computed < 0.35 * n * n


@pytest.fixture
def score_entries(monkeypatch):
    """A list that receives, per kernel call of the chunked engine, the number of score
    entries it computes (batch x heads x rows x keys)."""
    from attnkit.backends.chunked import forward as engine_forward
    computed = []
    segment_forward = engine_forward.segment_forward

    def counting(cfg, ti, si, qt, ks, *rest):
        computed.append(qt.shape[0] * qt.shape[1] * qt.shape[2] * ks.shape[2])
        return segment_forward(cfg, ti, si, qt, ks, *rest)
    monkeypatch.setattr(engine_forward, "segment_forward", counting)
    return computed


@pytest.mark.parametrize("dilation", [4, [1, 1, 2, 2, 4, 4, 8, 8]])
def test_dilated_cost_follows_its_entries_not_its_span(dilation, score_entries):
    """A dilated window runs as sliding windows on residue classes (strided views): the
    score entries computed are about those the mask allows, not a band d times wider."""
    computed = score_entries
    n, H = 2048, 8
    q, k, v = qkv(B=1, Hq=H, Hkv=H, L=n, S=n, D=4)
    chunked_attention(q, k, v, mask=masks.sliding_window(64, 64), scale=0.5)
    undilated, computed[:] = sum(computed), []
    mask = masks.dilated(64, 64, dilation)
    chunked_attention(q, k, v, mask=mask, scale=0.5)
    allowed = int(mask.materialize(n, n).expand(1, H, n, n).sum())
    assert allowed <= sum(computed) <= 1.05 * undilated
    split, computed[:] = sum(computed), []
    chunked_attention(q, k, v, mask=mask, scale=0.5, block_q=128, block_k=128)  # one band
    assert split < 0.6 * sum(computed)


@pytest.mark.parametrize("B,Hq,Hkv,L,S,dilation", [
    (2, 4, 2, 37, 61, 4),                      # cross lengths, GQA, one period
    (1, 8, 8, 70, 70, [1, 1, 2, 2, 4, 4, 8, 8]),  # Longformer-style per-head periods
    (1, 4, 2, 70, 70, [1, 1, 3, 3]),           # GQA, each kv group one period
    (1, 4, 2, 70, 70, [1, 3, 1, 3]),           # a kv group split across periods
    (1, 4, 4, 70, 40, [3, 1, 3, 2]),           # more queries than keys, scattered heads
    (1, 2, 2, 1, 61, 5),                       # one decoding step
    (1, 8, 8, 64, 64, [1, 1, 2, 2, 4, 4, 8, 8]),  # classes divide evenly: run as one batch
    (2, 4, 2, 48, 48, [1, 1, 3, 3]),           # ... with two batch entries and GQA
    (1, 4, 4, 32, 48, [2, 2, 4, 4]),           # ... and keys past the queries (S - L = 16)
])
def test_dilated_by_residue_class_matches_the_reference(B, Hq, Hkv, L, S, dilation, kernel):
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=8, dtype=torch.float64, requires_grad=True)
    mask = masks.dilated(3, 2, dilation)
    want = sdpa(q, k, v, mask, backend="reference")
    out, lse = sdpa(q, k, v, mask, backend="chunked", return_lse=True)
    close(out, want)
    s = (q @ k.transpose(-1, -2)).repeat_interleave(1, 1) if Hq == Hkv else None
    if s is not None:
        allow = mask.materialize(L, S).expand(B, Hq, L, S)
        ref_lse = (s / math.sqrt(8)).masked_fill(~allow, float("-inf")).logsumexp(-1)
        close(lse, ref_lse)
    g = torch.randn_like(want)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(want, (q, k, v), g)):
        close(x, y)


@pytest.mark.parametrize("mask", [masks.sliding_window(100), masks.bigbird(16),
                                  masks.sliding_window(40) | masks.global_tokens([0, 1, 77]),
                                  masks.causal() & masks.sliding_window(30, 0),
                                  masks.document(torch.arange(200) // 70)],
                         ids=["window", "bigbird", "longformer", "causal_window", "document"])
def test_auto_estimates_the_engine_work_it_would_do(mask, score_entries):
    """``planned_entries`` (what auto weighs, read from block states alone) is exactly the
    score entries the engine then computes per batch and head."""
    from attnkit.backends.chunked import planned_entries
    n, H = 200, 4
    q, k, v = qkv(B=1, Hq=H, Hkv=H, L=n, S=n, D=4)
    chunked_attention(q, k, v, mask=mask, scale=0.5)
    assert planned_entries(mask, Grid(n, n)) * H == sum(score_entries)


@pytest.mark.parametrize("window", [8, 16, 64])
def test_narrow_windows_get_tiles_that_follow_them(window, score_entries):
    """A 128-square tile of a narrow band is mostly masked; tiles of the window's own
    block size compute at most ~half as many score entries."""
    computed = score_entries
    n = 2048
    q, k, v = qkv(B=1, Hq=2, Hkv=2, L=n, S=n, D=4)
    mask = masks.sliding_window(window)
    out = chunked_attention(q, k, v, mask=mask, scale=0.5)[0]
    narrow, computed[:] = sum(computed), []
    chunked_attention(q, k, v, mask=mask, scale=0.5, block_q=128, block_k=128)
    assert 2 * int(mask.materialize(n, n).sum()) <= narrow < 0.6 * sum(computed)
    close(out, sdpa(q, k, v, mask, scale=0.5, backend="reference"))


def _longformer_case():
    from attnkit.layers.longformer import LongformerMask
    L, G = 320, 3                           # key blocks of 16 end where the slots begin
    local = torch.ones(2, L, dtype=torch.bool)
    local[:, [0, 50, 51]] = False           # the global tokens' own positions
    local[1, 290:] = False                  # padding in batch element 1
    slots = torch.tensor([[True, True, True], [True, True, False]])
    return LongformerMask(masks.sliding_window(20), L, local, slots), L, L + G


@pytest.mark.parametrize("case", ["window", "window+alibi", "gqa", "longformer"])
def test_equal_tiles_run_as_one_batched_call(case, monkeypatch):
    """Tiles whose additive tiles are equal (a band away from the edges, Longformer's
    window away from global tokens and padding) go to the fused kernel together, as
    strided views; the result equals the reference and the one-call-per-tile loop."""
    from attnkit.backends.chunked import fused as _fused, plan as engine_plan
    bias = None
    Hq, Hkv, L, S = 4, 4, 300, 300
    mask = masks.sliding_window(20, 7)
    if case == "window+alibi":
        bias = biases.alibi(Hq)
    if case == "gqa":
        Hkv = 2
    if case == "longformer":
        mask, L, S = _longformer_case()
    q, k, v = qkv(B=2, Hq=Hq, Hkv=Hkv, L=L, S=S, D=8)
    calls = []
    forward = _fused.forward
    monkeypatch.setattr(_fused, "forward", lambda *a: calls.append(a[0].shape[0]) or forward(*a))
    run = lambda: chunked_attention(q, k, v, mask=mask, bias=bias, scale=0.3, block_q=16,
                                    block_k=16)[::2]
    out, lse = run()
    batched = len(calls)
    monkeypatch.setattr(engine_plan, "MIN_BATCH_TILES", 10 ** 9)
    calls.clear()
    loop_out, loop_lse = run()
    assert max(calls) == 2                   # the loop: one tile (batch of 2) per call
    assert len(calls) == sum(len(t.segments) for t in plan_tiles(mask, Grid(L, S), 16, 16))
    # runs of tiles: 2 calls (one per batch element) per run and segment; Longformer's
    # tiles near global tokens and padding differ and keep a call each
    assert batched < len(calls) * (0.7 if case == "longformer" else 0.4)
    close(out, loop_out)
    close(lse, loop_lse)
    want = sdpa(q, k, v, mask, bias=bias, scale=0.3, backend="reference")
    close(out, want)


def test_per_head_patterns_cost_per_head_not_their_union():
    """BigBird with one random draw per head: each head gathers its own key blocks."""
    n, heads = 4096, 8
    mask = masks.bigbird(64, seed=0, num_heads=heads)
    tiles = plan_tiles(mask, Grid(n, n), 64, 64)
    assert any(isinstance(s, Gathered) for t in tiles for s in t.segments)
    computed = sum((t.r1 - t.r0) * s.width for t in tiles for s in t.segments)
    dense = mask.materialize(n)                       # (1, H, n, n)
    busiest = dense.sum((-1, -2)).max().item()        # allowed entries of the busiest head
    union = dense.any(1).sum().item()
    assert computed < 1.3 * busiest < 0.6 * union


def test_gathered_segments_agree_with_the_reference(kernel):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, L=100, S=100, D=8, requires_grad=True)
    mask = masks.bigbird(8, num_random_blocks=2, seed=4, num_heads=4) & masks.padding([100, 77])
    b = biases.alibi(4)
    want = sdpa(q, k, v, mask, bias=b, backend="reference", return_weights=True)
    got = sdpa(q, k, v, mask, bias=b, backend="chunked", return_weights=True)
    for x, y in zip(got, want):
        close(x, y)
    g = torch.randn_like(want[0])
    for x, y in zip(torch.autograd.grad(got[0], (q, k, v), g),
                    torch.autograd.grad(want[0], (q, k, v), g)):
        close(x, y, tol=1e-4)
    qd, kd, vd = qkv(B=1, Hq=2, Hkv=1, L=24, S=24, D=2, dtype=torch.float64, requires_grad=True)
    m2 = masks.bigbird(3, num_random_blocks=1, seed=1, num_heads=2)
    assert any(isinstance(s, Gathered) for t in plan_tiles(m2, Grid(24, 24), 3, 3) for s in t.segments)
    assert torch.autograd.gradcheck(
        lambda a, b_, c: chunked_attention(a, b_, c, mask=m2, bias=biases.alibi(2), scale=0.3,
                                           block_q=3, block_k=3)[0], (qd, kd, vd))


def test_full_blocks_run_without_a_mask():
    """Causal: far from the diagonal the keys run unmasked; only the diagonal block (and
    short runs merged into its call) evaluate the mask."""
    from attnkit.backends.chunked import MERGE_KEYS
    tiles = plan_tiles(masks.causal(), Grid(4096, 4096), 128, 128)
    for t in tiles:
        masked = [s for s in t.segments if s.masked]
        assert len(masked) == 1 and masked[0].k1 == t.r1
        assert masked[0].k1 - masked[0].k0 <= max(MERGE_KEYS, 128)
        assert sum(s.k1 - s.k0 for s in t.segments) == t.r1  # every key 0..p, once


# ------------------------------------------------------------------ property-based

@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]),
       L=st.integers(1, 40), S=st.integers(1, 40), D=st.sampled_from([1, 4, 16]),
       window=st.integers(0, 8), causal=st.booleans(), bq=st.integers(1, 17),
       bk=st.integers(1, 17), with_bias=st.booleans())
def test_property_chunked_equals_reference(B, Hkv, G, L, S, D, window, causal, bq, bk, with_bias):
    q, k, v = qkv(B=B, Hq=Hkv * G, Hkv=Hkv, L=L, S=S, D=D)
    mask = masks.sliding_window(window, window // 2)
    if causal:
        mask = mask & masks.causal()
    b = biases.alibi(Hkv * G) if with_bias else None
    want = sdpa(q, k, v, mask, bias=b, backend="reference")
    got, _, _ = chunked_attention(q, k, v, mask=mask, bias=b, scale=D ** -0.5, block_q=bq,
                                  block_k=bk)
    close(got, want)


# ------------------------------------------------------------------ bad input

def bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        sdpa(*args, **kw)


def test_errors_name_the_argument_and_shapes():
    q, k, v = qkv()
    bad(ValueError, r"query must have shape .*\(9, 8\)", q[0, 0], k[0, 0], v[0, 0])
    bad(ValueError, "same rank", q, k[0], v[0])
    bad(ValueError, "batch dims", q, k[:1], v[:1])
    bad(ValueError, "same head_dim", q, k[..., :4], v)
    bad(ValueError, "heads and length", q, k, v[:, :, :3])
    q3, k3, v3 = qkv(Hq=3, Hkv=2)
    bad(ValueError, r"multiple of key/value heads \(2\)", q3, k3, v3)
    bad(TypeError, "floating-point", q.long(), k, v)
    bad(TypeError, "share a dtype", q.double(), k, v)
    bad(TypeError, "must be a torch.Tensor", q.tolist(), k, v)
    bad(TypeError, "attn_mask must be bool", q, k, v, torch.ones(9, 9, dtype=torch.long))
    bad(ValueError, r"attn_mask of shape \(3, 9\) does not broadcast", q, k, v,
        torch.ones(3, 9, dtype=torch.bool))
    bad(ValueError, r"attn_mask of shape \(5, 1, 9, 9\)", q, k, v, torch.ones(5, 1, 9, 9, dtype=torch.bool))
    bad(TypeError, "attn_mask must be a tensor or an attnkit mask", q, k, v, "causal")
    bad(ValueError, "bias of shape", q, k, v, bias=torch.zeros(3, 9, 9))
    bad(TypeError, "bias must be a float tensor", q, k, v, bias=torch.zeros(9, 9, dtype=torch.long))
    bad(ValueError, "backend must be one of", q, k, v, backend="cuda")
    bad(ValueError, r"dropout_p must be in \[0, 1\)", q, k, v, dropout_p=1.0)
    bad(TypeError, "scale must be a real number", q, k, v, scale="big")
    bad(ValueError, "softcap must be positive", q, k, v, softcap=0.0)
    bad(ValueError, r"sinks must have shape \(Hq,\) = \(4,\)", q, k, v, sinks=torch.zeros(2))
    bad(ValueError, "for batch size 3", q, k, v, masks.padding([1, 2, 3]))
    bad(ValueError, "for 3 heads", q, k, v, masks.dilated(1, 1, [1, 2, 3]))
    bad(ValueError, "for 2 heads", q, k, v, bias=biases.alibi(2))
    bad(ValueError, "global token index 20", q, k, v, masks.global_tokens([20]))
    bad(TypeError, "is_causal must be a bool", q, k, v, is_causal=1)


def test_explicit_backends_refuse_what_they_cannot_do():
    q, k, v = qkv()
    for kw in (dict(softcap=2.0), dict(sinks=torch.zeros(4)), dict(return_weights=True),
               dict(return_lse=True)):
        with pytest.raises(NotImplementedError, match="backend='torch' cannot honour"):
            sdpa(q, k, v, backend="torch", **kw)
    with pytest.raises(NotImplementedError, match="backend='flex' cannot honour dropout"):
        sdpa(q, k, v, backend="flex", dropout_p=0.1)
    # auto never refuses
    sdpa(q, k, v, softcap=2.0, sinks=torch.zeros(4), return_weights=True, return_lse=True,
         dropout_p=0.1)


# ------------------------------------------------------------------ FlexAttention (compiles: few tests)

def test_flex_backend_lowers_masks_and_biases():
    """The same mask/bias objects lowered to FlexAttention's BlockMask and score_mod."""
    q, k, v = qkv(B=2, Hq=4, Hkv=2, L=150, S=200, D=16)
    mask = (masks.sliding_window(20, 5) | masks.global_tokens([3])) & masks.padding([200, 120])
    b = biases.alibi(4)
    want = sdpa(q, k, v, mask, bias=b, softcap=3.0, backend="reference")
    close(sdpa(q, k, v, mask, bias=b, softcap=3.0, backend="flex"), want, tol=1e-4)
    with pytest.raises(NotImplementedError, match=r"cannot honour return_lse \(on CPU\)"):
        sdpa(q, k, v, backend="flex", return_lse=True)


def test_auto_weighs_sparsity_before_drawing_a_mask(monkeypatch):
    """auto hands small or dense masks to torch, sparse masks over large grids to the
    tiled engine (whose cost follows the allowed tiles)."""
    from attnkit import functional
    chosen = []
    for L, mask in ((64, masks.sliding_window(8, 0)), (2048, masks.sliding_window(128, 0)),
                    (2048, masks.sliding_window(1500))):
        q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=L, D=8)
        chosen.append(attnkit.explain(q, k, v, mask).backend)
        out = sdpa(q, k, v, mask)
        close(out, sdpa(q, k, v, mask, backend="reference"))
    assert chosen == ["torch", "chunked", "torch"]
    assert functional.allowed_fraction(masks.sliding_window(128, 0), 2048, 2048) < 0.2


def test_auto_weighs_the_engine_estimate_against_torch():
    """Over the small-grid limit, auto compares the entries the tiled engine would compute
    (at its own tile sizes: BigBird's 64-blocks, not 128-tiles) with torch's dense work;
    a bias object goes to torch only while its dense form is small."""
    from attnkit.positional import T5RelativeBias

    def chosen(n, mask=None, bias=None):
        q, k, v = qkv(B=1, Hq=8, Hkv=8, L=n, S=n, D=8)
        return attnkit.explain(q, k, v, mask, bias=bias)

    sparse = chosen(2048, masks.bigbird(64))
    assert sparse.backend == "chunked" and "computes 29% of the entries" in sparse.reason
    assert chosen(1024, masks.sliding_window(256) | masks.global_tokens(range(16))
                  ).backend == "torch"  # 69% of the entries: dense with a mask is cheaper
    t5 = T5RelativeBias(num_heads=8, bidirectional=True)
    assert chosen(512, bias=t5.bias(512, 512)).backend == "torch"
    assert chosen(1024, bias=t5.bias(1024, 1024)).backend == "chunked"
    with pytest.raises(TypeError, match=r"pass T5RelativeBias\(...\).bias\(L, S\)"):
        chosen(16, bias=t5)


def test_translation_invariant_tiles_are_built_once(kernel, monkeypatch):
    """Causal/window masks and ALiBi depend only on k - p: equal tiles are reused, and the
    results (values and gradients, learnable slopes included) stay exact."""
    from attnkit.backends.chunked.additive import AdditiveTiles
    built = []
    real = AdditiveTiles.build
    monkeypatch.setattr(AdditiveTiles, "build", lambda *a: built.append(1) or real(*a))
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=24, S=24, D=2, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, dtype=torch.float64, requires_grad=True)
    mask = masks.sliding_window(3, 1)

    def f(q, k, v, slopes):
        return chunked_attention(q, k, v, mask=mask, bias=biases.alibi(2, slopes=slopes),
                                 scale=0.5, block_q=4, block_k=4)[0]

    want = sdpa(q, k, v, mask, bias=biases.alibi(2, slopes=slopes), scale=0.5, backend="reference")
    close(f(q, k, v, slopes), want)
    segments = sum(len(t.segments) for t in plan_tiles(mask, Grid(24, 24), 4, 4, True))
    assert len(built) <= 3 < segments  # first tile, interior tiles, last tile
    assert torch.autograd.gradcheck(f, (q, k, v, slopes))


def test_explain_says_what_auto_chooses_and_why_the_others_cannot():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=600, S=600, D=8)
    choice = attnkit.explain(q, k, v, masks.sliding_window(16, 0), softcap=30.0)
    assert choice.backend == "chunked"
    assert choice.rejected == {"torch": ["softcap"]}
    assert "torch: cannot run this call: softcap" in str(choice)
    dilated = masks.dilated(128, 128, [1, 1, 2, 2, 4, 4, 8, 8])
    q, k, v = qkv(B=1, Hq=8, Hkv=8, L=512, S=512, D=8)
    assert attnkit.explain(q, k, v, dilated).backend == "chunked"  # strided windows
    assert attnkit.explain(q, k, v, is_causal=True).backend == "torch"
    named = attnkit.explain(q, k, v, backend="reference")
    assert (named.backend, named.asked) == ("reference", "reference")
    with pytest.raises(NotImplementedError, match="backend='torch' cannot honour sinks"):
        attnkit.explain(q, k, v, sinks=torch.zeros(8), backend="torch")
