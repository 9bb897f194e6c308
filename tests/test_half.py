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
                        lambda q, k, v, add, scale: seen.append((q.dtype, add.dtype))
                        or real(q, k, v, add, scale))
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
