"""Half precision (bfloat16, float16) on the fast paths, over a grid of variants, backends
and L != S: FlashAttention's rule, the error against float64 at most 2x that of torch's
own attention math done in the dtype (the independent oracle in attention_oracle.py),
for outputs and for gradients.

The sizes reach past one tile (128 rows and keys), so the fused kernel's tiles, their
merge and the batched runs of equal tiles all take part. The differential campaign
(test_differential.py) draws far more shapes; these are the named variants the fast
half-precision paths serve, kept to a few seconds.
"""

import pytest
import torch

import attnkit
from attnkit import bias as biases, masks
from attnkit.dtypes import matmul_dtype
from attention_oracle import attention, fa_close, gradient_magnitudes

sdpa = attnkit.scaled_dot_product_attention
HALF = [torch.bfloat16, torch.float16]
L, S, D = 136, 300, 32


def _inputs(Hq=4, Hkv=2, L=L, S=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, S, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, Hq, L, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _dense(mask, bias, Hq, L, S, causal):
    allowed = None if mask is None else mask.materialize(L, S).expand(1, Hq, L, S)
    if causal:
        tri = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        allowed = tri if allowed is None else allowed & tri
    dense_bias = None if bias is None else bias.materialize(L, S).double().expand(1, Hq, L, S)
    return allowed, dense_bias


VARIANTS = {
    "causal": dict(causal=True),
    "window": dict(mask=lambda: masks.sliding_window(40, 20)),
    "bigbird": dict(mask=lambda: masks.bigbird(16, num_heads=4)),
    "padding": dict(mask=lambda: masks.padding([250])),
    "alibi causal": dict(causal=True, bias=lambda: biases.alibi(4)),
    "alibi window": dict(mask=lambda: masks.sliding_window(64), bias=lambda: biases.alibi(4)),
    "softcap causal": dict(causal=True, softcap=20.0),
    "sinks": dict(causal=True, sinks=True),
}


def _run(backend, dtype, q, k, v, dout, spec):
    mask = spec["mask"]() if "mask" in spec else None
    bias = spec["bias"]() if "bias" in spec else None
    sinks = torch.linspace(-1, 1, q.shape[1], dtype=torch.float64) if spec.get("sinks") else None
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(is_causal=spec.get("causal", False), bias=bias, softcap=spec.get("softcap"),
              sinks=None if sinks is None else sinks.to(dtype), backend=backend)
    out = sdpa(*leaves, mask, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach(), *grads], mask, bias, sinks


def _oracle(dtype, q, k, v, dout, allowed, dense_bias, spec, sinks):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, w, _ = attention(*leaves, allowed,
                          None if dense_bias is None else dense_bias.to(dtype),
                          scale=D ** -0.5, softcap=spec.get("softcap"),
                          sinks=None if sinks is None else sinks.to(dtype),
                          fold_groups=dtype != torch.float64)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach(), *grads], w


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_half_precision_within_twice_torchs_own_error(backend, name, dtype):
    spec = VARIANTS[name]
    q, k, v, dout = _inputs()
    ours, mask, bias, sinks = _run(backend, dtype, q, k, v, dout, spec)
    allowed, dense_bias = _dense(mask, bias, q.shape[1], L, S, spec.get("causal", False))
    exact, w = _oracle(torch.float64, q, k, v, dout, allowed, dense_bias, spec, sinks)
    same, _ = _oracle(dtype, q, k, v, dout, allowed, dense_bias, spec, sinks)
    sizes = gradient_magnitudes(q, k, v, w.detach(), dout, D ** -0.5)
    for what, got, want, peer in zip(("out", "dq", "dk", "dv"), ours, exact, same):
        ok, account = fa_close(got, want, peer, dtype, magnitude=sizes.get(what, 0.0))
        assert ok, f"{name} {what}: {account}"


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_a_bias_runs_on_the_fused_kernel_in_float32(dtype, monkeypatch):
    """With half inputs and a bias (ALiBi-like, -0.3 |i - j|), the tiles go to torch's
    fused kernel with the bias tile in float32, added to the float32 scores as it is (not
    rounded to half precision, and not on the slower eager path), and the answer is as
    accurate as the half-precision math with the bias added in float32."""
    from attnkit.backends.chunked import fused
    seen = []
    real = fused.forward
    monkeypatch.setattr(fused, "forward",
                        lambda q, k, v, add, scale, causal=False:
                        seen.append((q.dtype, add.dtype)) or real(q, k, v, add, scale, causal))
    q, k, v, _ = _inputs(Hq=2, Hkv=2)
    pos = torch.arange(S - L, S, dtype=torch.float64).view(-1, 1)
    ramp = (-0.3 * (pos - torch.arange(S, dtype=torch.float64)).abs()).expand(1, 2, L, S)
    exact = attention(q, k, v, bias=ramp, scale=D ** -0.5)[0]
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    scores = ((qh * D ** -0.5) @ kh.transpose(-1, -2)).float() + ramp.float()
    peer = torch.softmax(scores, -1).to(dtype) @ vh
    got = sdpa(qh, kh, vh, bias=ramp.float(), backend="chunked")
    ok, account = fa_close(got, exact, peer, dtype)
    assert ok, account
    compute = matmul_dtype(dtype)  # float16 runs on float32 copies where it is slow
    assert seen and set(seen) == {(compute, torch.float32)}


def test_float16_runs_on_float32_copies_where_its_products_are_slow(monkeypatch):
    """Where this CPU multiplies float16 slowly, the fast backends compute on float32
    copies and say so; the result is float16 and at least as accurate."""
    q, k, v, _ = _inputs(Hq=2, Hkv=2, L=8, S=8)
    q, k, v = (t.half() for t in (q, k, v))
    choice = attnkit.explain(q, k, v, is_causal=True)
    slow = matmul_dtype(torch.float16) == torch.float32
    assert ("computed on float32 copies" in choice.reason) == slow
    capped = attnkit.explain(q, k, v, is_causal=True, softcap=5.0)  # torch cannot softcap
    assert capped.backend == "chunked"
    assert ("computed on float32 copies" in capped.reason) == slow
    out = sdpa(q, k, v, is_causal=True)
    assert out.dtype == torch.float16
    want = sdpa(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - want).abs().max() < 2e-3


def _record_fused_calls(monkeypatch):
    """Record (rows, add shape or None, add strides or None, causal) of each fused call."""
    from attnkit.backends.chunked import fused
    seen = []
    real = fused.forward

    def spy(q, k, v, add, scale, causal=False):
        seen.append((q.shape[-2], None if add is None else tuple(add.shape),
                     None if add is None else add.stride()[-2:], causal))
        return real(q, k, v, add, scale, causal)

    monkeypatch.setattr(fused, "forward", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_translation_invariant_term_reaches_the_kernel_as_a_hankel_view(dtype, monkeypatch):
    """A bias or mask that depends only on k - p (ALiBi, T5, windows) is handed to the fused
    kernel as a strided view of one vector of offsets (strides 1, 1 over the query rows
    reversed), not as an (nq, nk) tile (tiles above TILE_CACHE_ELEMENTS; set to 0 here,
    so that small shapes show it); the answer equals the reference."""
    from attnkit.backends.chunked import additive
    monkeypatch.setattr(additive, "TILE_CACHE_ELEMENTS", 0)
    seen = _record_fused_calls(monkeypatch)
    q, k, v, _ = _inputs(Hq=4, Hkv=2, L=300, S=300)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    m, b = masks.sliding_window(100, 40), biases.alibi(4)
    got = sdpa(q, k, v, m, bias=b, backend="chunked")
    want = sdpa(q.double(), k.double(), v.double(), m, bias=b, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max() < tol
    assert any(s == (1, 1) for _, _, s, _ in seen if s is not None)
    assert all(s in ((1, 1), None) for _, shape, s, _ in seen if shape and shape[-2] > 1)


def native_half(monkeypatch) -> None:
    """Run half precision natively, as where this CPU multiplies it fast (an AMX Xeon):
    otherwise the functional call hands the engine float32 copies (an AMD EPYC)."""
    from attnkit import dtypes
    monkeypatch.setattr(dtypes, "half_matmul_is_fast", lambda dtype: True)


def test_the_causal_diagonal_runs_on_the_kernels_own_causal_flag(monkeypatch):
    """In half precision the square tiles on a causal diagonal skip their upper triangle
    (the kernel's causal flag, no mask); with ALiBi they carry a per-key bias (1 row) and
    the per-row part goes to the log-sum-exp. Outputs and gradients stay within the
    accuracy rule."""
    from attnkit.backends.chunked import attention
    monkeypatch.setattr(attention, "matmul_dtype", lambda dtype, device="cpu": dtype)
    native_half(monkeypatch)  # as on a CPU with fast half products, whatever this one is
    seen = _record_fused_calls(monkeypatch)
    n = 2048  # tall tiles: the second is a full block and a square on the diagonal
    q, k, v, dout = _inputs(Hq=2, Hkv=2, L=n, S=n)
    for bias in (None, biases.alibi(2)):
        seen.clear()
        spec = dict(causal=True, **({} if bias is None else {"bias": lambda: bias}))
        ours, mask, b, sinks = _run("chunked", torch.bfloat16, q, k, v, dout, spec)
        assert any(c for *_, c in seen), seen
        if bias is not None:
            assert any(c and shape is not None and shape[-2] == 1 for _, shape, _, c in seen)
        allowed, dense_bias = _dense(mask, b, 2, n, n, True)
        exact, w = _oracle(torch.float64, q, k, v, dout, allowed, dense_bias, spec, sinks)
        same, _ = _oracle(torch.bfloat16, q, k, v, dout, allowed, dense_bias, spec, sinks)
        sizes = gradient_magnitudes(q, k, v, w.detach(), dout, D ** -0.5)
        for what, got, want, peer in zip(("out", "dq", "dk", "dv"), ours, exact, same):
            ok, account = fa_close(got, want, peer, torch.bfloat16,
                                   magnitude=sizes.get(what, 0.0))
            assert ok, f"{bias} {what}: {account}"


def test_half_precision_tiles_are_tall_where_half_products_are_fast(monkeypatch):
    """Where this CPU multiplies bfloat16 fast, fused tiles are BLOCK_Q_HALF rows tall (the
    kernel reaches its rate only from ~768 rows per call). Where the log-sum-exp, the
    weights or a backward follow, a tile with a row that may see a single key (a causal
    pattern's first) gives its first BLOCK_Q rows a tile of their own (EXACT, on the
    eager kernel); a forward alone keeps the tile whole, and that row's output is its
    one value, exactly."""
    from attnkit.backends.chunked import BLOCK_Q, attention
    from attnkit.backends.chunked.plan import BLOCK_Q_HALF
    monkeypatch.setattr(attention, "matmul_dtype", lambda dtype, device="cpu": dtype)
    native_half(monkeypatch)  # as on a CPU with fast half products, whatever this one is
    seen = _record_fused_calls(monkeypatch)
    n = 2 * BLOCK_Q_HALF
    q, k, v, _ = _inputs(Hq=2, Hkv=2, L=n, S=n)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    want = sdpa(q.double(), k.double(), v.double(), is_causal=True, backend="reference")
    with torch.no_grad():
        got, lse = sdpa(q, k, v, is_causal=True, backend="chunked", return_lse=True)
    rows = {r for r, *_ in seen}
    assert BLOCK_Q_HALF in rows and max(rows) == BLOCK_Q_HALF
    assert BLOCK_Q_HALF - BLOCK_Q in rows
    assert (got.double() - want).abs().max() < 2e-2
    one_score = (q[:, :, 0].double() * k[:, :, 0].double()).sum(-1) * D ** -0.5
    assert (lse[..., 0].double() - one_score).abs().max() < 1e-2  # its one score, in bf16
    seen.clear()
    with torch.no_grad():
        got = sdpa(q, k, v, is_causal=True, backend="chunked")
    rows = {r for r, *_ in seen}
    assert rows == {BLOCK_Q_HALF}
    assert (got.double() - want).abs().max() < 2e-2
    assert torch.equal(got[:, :, 0], v[:, :, 0])
    seen.clear()
    monkeypatch.setattr(attention, "matmul_dtype", lambda dtype, device="cpu": torch.float32)
    with torch.no_grad():
        sdpa(q, k, v, is_causal=True, backend="chunked")
    assert max(r for r, *_ in seen) <= BLOCK_Q


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("cap", [5.0, 50.0, 80.0])
def test_softcap_inference_on_half_products_within_the_rule(dtype, cap, monkeypatch):
    """A softcapped forward that no backward follows runs the eager kernel on half
    products and, for a softcap of at most FIXED_SCALE_SOFTCAP without a bias,
    exponentiates on the fixed scale 0 (no row maximum; float16, whose range ends at
    65504, keeps it). Output and log-sum-exp within the accuracy rule either way, causal
    and L != S, with scores large enough that the cap bites."""
    from attnkit.backends.chunked import attention as engine, kernels
    monkeypatch.setattr(engine, "matmul_dtype", lambda dtype, device="cpu": dtype)
    native_half(monkeypatch)  # as on a CPU with fast half products, whatever this one is
    calls = []
    real = kernels.segment_forward
    monkeypatch.setattr(kernels, "segment_forward",
                        lambda cfg, *a, **kw: calls.append(cfg.fixed_scale) or real(cfg, *a, **kw))
    from attnkit.backends.chunked import forward as forward_module
    monkeypatch.setattr(forward_module, "segment_forward", kernels.segment_forward)
    q, k, v, _ = _inputs(L=300, S=520)
    q = q * 4  # scores up to ~40: the cap bites
    with torch.no_grad():
        got, lse = sdpa(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, softcap=cap,
                        backend="chunked", return_lse=True)
    allowed, _ = _dense(None, None, 4, 300, 520, True)
    exact = attention(q, k, v, allowed, None, scale=D ** -0.5, softcap=cap)
    same = attention(*(t.to(dtype) for t in (q, k, v)), allowed, None, scale=D ** -0.5,
                     softcap=cap, fold_groups=True)
    for what, ours, want, peer in (("out", got, exact[0], same[0]),
                                   ("lse", lse, exact[2], same[2])):
        ok, account = fa_close(ours, want, peer, dtype)
        assert ok, f"{what}: {account}"
    fixed = cap <= kernels.FIXED_SCALE_SOFTCAP and dtype == torch.bfloat16
    assert calls and set(calls) == {fixed}


def test_fixed_scale_keeps_rows_whose_scores_all_sit_at_minus_the_cap():
    """On the fixed scale every weight is exp(s) with s in (-cap, cap): rows whose scores
    all lie near -cap (60: exp(-60) ~ 1e-26) keep their weights normal, not flushed to
    zero, in float32 and bfloat16, forward (with and without a backward) and backward."""
    g = torch.Generator().manual_seed(3)
    u = torch.ones(16, dtype=torch.float64)
    q = u + 0.3 * torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64)
    k = -8 * u + torch.randn(1, 2, 90, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 90, 16, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        exact = [t.detach().double().requires_grad_() for t in leaves]
        want = sdpa(*exact, softcap=60.0, backend="reference")
        assert want.detach().abs().max() > 0.05  # not a zero output by accident
        got = sdpa(*leaves, softcap=60.0, backend="chunked")
        assert (got.double() - want).abs().max() < tol, dtype
        with torch.no_grad():  # half products (scores rounded once): the accuracy rule
            alone = sdpa(*leaves, softcap=60.0, backend="chunked")
            same = attention(*(t.detach() for t in leaves), scale=0.25, softcap=60.0)[0]
        ok, account = fa_close(alone, want.detach(), same, dtype)
        assert ok, f"{dtype}: {account}"
        grads = torch.autograd.grad(got.sum(), leaves)
        wants = torch.autograd.grad(want.sum(), exact)
        for g_, w_ in zip(grads, wants):
            assert (g_.double() - w_).abs().max() <= 10 * tol * (1 + w_.abs().max()), dtype


@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_softcap_inference_keeps_large_cancelling_scores_exact(cap):
    """Large queries and keys whose products cancel (3 sigma, scale 20 / sqrt(D), caps
    that bite): the half products are rounded once, after the sum, and the scale applied
    in float32. Output and log-sum-exp within the accuracy rule."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 600, D, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    scale = 20 / D ** 0.5
    qh, kh, vh = (t.to(torch.bfloat16) for t in (q, k, v))
    with torch.no_grad():
        got, lse = sdpa(qh, kh, vh, is_causal=True, scale=scale, softcap=cap,
                        backend="chunked", return_lse=True)
    allowed, _ = _dense(None, None, 2, 600, 600, True)
    exact = attention(q, k, v, allowed, None, scale=scale, softcap=cap)
    same = attention(qh, kh, vh, allowed, None, scale=scale, softcap=cap)
    for what, ours, want, peer in (("out", got, exact[0], same[0]),
                                   ("lse", lse, exact[2], same[2])):
        ok, account = fa_close(ours, want, peer, torch.bfloat16)
        assert ok, f"{what}: {account}"
