"""An attention oracle written independently of attnkit, and FlashAttention's acceptance
rule.

:func:`attention` is the formula on dense tensors, nothing else:

    s = scale * q k^T;  s = softcap * tanh(s / softcap);  s = s + bias;  s[~allowed] = -inf
    w = softmax([s, sink]) without the sink's column;  rows that allow nothing: w = 0
    out = w v;  lse = logsumexp([s, sink]) (-inf for rows that see nothing, no sink)

It runs in whatever dtype it is given: in float64 it is the reference every test compares
against, in the test dtype it is "the same math done by torch in that dtype", whose error
sets the tolerance (:func:`fa_close`). The same math has more than one valid order, and
the orders round differently: ``reorder=True`` scales the keys instead of the queries
(FlashAttention's ``reorder_ops``, its estimate of reordering error), and
``normalize_after=True`` multiplies the unnormalised exp(s - max) by V and divides after,
as every flash / online-softmax kernel must, ``fold_groups=True`` computes grouped query
heads as extra rows against their one key/value head instead of repeating K and V, and
``rowwise=True`` forms each query row's products on its own (the matrix products then
have other shapes, and BLAS sums small ones in other orders).
The tests take the largest error of these orders as the error of "the same math".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
              bias: Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
              sinks: Tensor | None = None, reorder: bool = False,
              normalize_after: bool = False, fold_groups: bool = False,
              rowwise: bool = False):
    """(out, weights, lse) for q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), every
    op in the inputs' dtype. ``allowed`` (bool) and ``bias`` broadcast to (B, Hq, L, S);
    ``sinks`` (Hq,)."""
    B, Hq, L = q.shape[:3]
    Hkv = k.shape[1]
    groups = Hq // Hkv
    if fold_groups:
        matmul = lambda a, b: (a.reshape(B, Hkv, -1, a.shape[-1]) @ b).reshape(
            B, Hq, L, b.shape[-1])
    elif rowwise:
        k = k.repeat_interleave(groups, 1)
        v = v.repeat_interleave(groups, 1)
        matmul = lambda a, b: (a.unsqueeze(-2) @ b.unsqueeze(2)).squeeze(-2)
    else:
        k = k.repeat_interleave(groups, 1)
        v = v.repeat_interleave(groups, 1)
        matmul = torch.matmul
    if reorder:
        s = matmul(q, (k * scale).transpose(-1, -2))
    else:
        s = matmul(q * scale, k.transpose(-1, -2))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    S = s.shape[-1]
    H = Hq
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, H, 1, 1).expand(B, H, L, 1)], -1)
    dead = (s == float("-inf")).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    w = torch.softmax(s, -1).masked_fill(dead, 0.0)
    # lse = max + log sum exp(s - max), differentiated as written: torch.logsumexp's own
    # backward, exp(s - lse), is wrong where lse has lost its digits (rows masked with
    # finfo.min: finfo.min + log n rounds back to finfo.min)
    top = s.amax(-1, keepdim=True).detach()
    lse = (top + torch.log(torch.exp(s - top).sum(-1, keepdim=True))).squeeze(-1)
    lse = lse.masked_fill(dead.squeeze(-1), float("-inf"))
    if normalize_after:
        e = torch.exp(s - s.amax(-1, keepdim=True)).masked_fill(dead, 0.0)
        den = e.sum(-1, keepdim=True)
        out = matmul(e[..., :S], v) / torch.where(dead, 1.0, den)
        return out, w[..., :S], lse
    w = w[..., :S]
    return matmul(w, v), w, lse


def flash_gradients(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
                    bias: Tensor | None = None, scale: float = 1.0,
                    softcap: float | None = None, sinks: Tensor | None = None,
                    dout: Tensor | None = None, dlse: Tensor | None = None) -> dict:
    """(dq, dk, dv, dsinks) as a flash kernel must form them, every op in the inputs'
    dtype: the softmax correction from the output *as stored* in that dtype,

        delta = rowsum(dO * O) - dlse,   dS = P * (dP - delta),   dP = dO V^T

    (FlashAttention's backward: a kernel that never keeps P cannot form rowsum(P * dP)
    any other way). In half precision O's rounding then enters every dS; autograd's
    softmax backward, the other order, forms the same sum from P and dP."""
    out, w, lse = attention(q, k, v, allowed, bias, scale, softcap, sinks)
    B, Hq, L = q.shape[:3]
    groups = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    dp = dout @ vr.transpose(-1, -2)
    delta = (dout * out).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse, 0.0).unsqueeze(-1)
    ds = w * (dp - delta)
    if softcap is not None:
        ds = ds * (1 - torch.tanh(scale * (q @ kr.transpose(-1, -2)) / softcap) ** 2)
    fold = lambda x: x.reshape(B, k.shape[1], groups, *x.shape[2:]).sum(2)
    grads = {"dq": scale * (ds @ kr), "dk": fold(scale * ds.transpose(-1, -2) @ q),
             "dv": fold(w.transpose(-1, -2) @ dout)}
    if sinks is not None:
        p_sink = torch.exp(sinks.view(1, Hq, 1) - lse).masked_fill(~torch.isfinite(lse), 0.0)
        grads["dsinks"] = -(p_sink * delta.squeeze(-1)).sum((0, 2))
    return grads


def t5_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of a ``key - query`` offset (Raffel et al. 2020, as T5's code computes
    it): exact buckets for small distances, logarithmic ones up to ``max_distance``."""
    rel = rel.long()
    out = torch.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        out = out + (rel > 0).long() * n
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n // 2
    log = torch.log(dist.float() / exact) / math.log(max_distance / exact)
    large = (exact + (log * (n - exact)).long()).clamp(max=n - 1)
    return out + torch.where(dist < exact, dist, large)


#: a floor under the slack, in ulps of the largest reference value. In float32 the same
#: math done by torch is as accurate as a kernel can be, so the ratio of the two largest
#: errors hovers around 1 and, for results of a handful of values (one key, one real
#: row), one rounding decides it; in float64 (the reference's own dtype) results are
#: expected to agree to about 1e-15, not bit for bit. Half precision keeps
#: FlashAttention's rule as it is: there the same math in the dtype is far coarser.
ULP_FLOOR = {torch.float32: 4, torch.float64: 32}


def rounding_slack(ref: Tensor, dtype: torch.dtype, magnitude: float = 0.0) -> float:
    """FlashAttention's absolute slack, twice what representing ``ref`` around 0.3 in
    ``dtype`` costs, ``2 * max |ref + 0.3 - 0.3 - ref|``; at least twice what rounding
    ``ref`` itself to ``dtype`` costs (no answer in that dtype can do better than the
    correctly rounded one); and at least ``ULP_FLOOR`` ulps of the largest value in
    float32 and float64, of the largest value or of ``magnitude``, the size of the terms
    the values are sums of (:func:`gradient_magnitudes`), whichever is larger."""
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    exact = ref[finite].double()
    r = exact.to(dtype)
    slack = max(2.0 * float((r + 0.3 - 0.3 - r).abs().max()),
                2.0 * float((r.double() - exact).abs().max()))
    if dtype in ULP_FLOOR:
        scale = max(float(r.abs().max()), magnitude)
        if dtype == torch.float64:  # agreement to ~1e-15 absolute, whatever the magnitude
            scale = 1.0 + scale
        slack = max(slack, ULP_FLOOR[dtype] * torch.finfo(dtype).eps * scale)
    return slack


def gradient_magnitudes(q: Tensor, k: Tensor, v: Tensor, w: Tensor, dout: Tensor,
                        scale: float, dlse: Tensor | None = None) -> dict:
    """The size of what each gradient entry sums, for rounding slack where it cancels.

    A computed sum is off by a few ulps of the sum of its terms' magnitudes (Higham's
    componentwise bound), not of its value: dK_j = scale * sum_i P_ij (dP_ij - delta_i) q_i
    can be ~0 while its terms are not (a row that sees one key has dS = 0 from
    dP - dP). With T = P * (|dO| |V|^T + rowsum(P |dO| |V|^T) + |dlse|):

        |dQ| <= |scale| T |K|,   |dK| <= |scale| T^T |Q|,   |dV| <= P^T |dO|

    (softcap's derivative, at most 1, left out). Returns the largest of each, as floats."""
    B, Hq, L, _ = q.shape
    groups = Hq // k.shape[1]
    k = k.repeat_interleave(groups, 1).abs()
    v = v.repeat_interleave(groups, 1).abs()
    dp = dout.abs() @ v.transpose(-1, -2)
    t = w * (dp + (w * dp).sum(-1, keepdim=True)
             + (0.0 if dlse is None else dlse.abs().unsqueeze(-1)))
    dq = abs(scale) * (t @ k)
    dk = abs(scale) * (t.transpose(-1, -2) @ q.abs())
    dv = w.transpose(-1, -2) @ dout.abs()
    return {"dq": float(dq.max()) if dq.numel() else 0.0,
            "dk": float(dk.max()) if dk.numel() else 0.0,
            "dv": float(dv.max()) if dv.numel() else 0.0}


def max_error(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| over the finite entries of ``ref``; infinite entries must match."""
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(x[~finite], ref[~finite]):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    return float((x[finite] - ref[finite]).abs().max())


def fa_close(ours: Tensor, ref: Tensor, same_math, dtype: torch.dtype,
             rtol: float = 2.0, magnitude: float = 0.0) -> tuple[bool, str]:
    """FlashAttention's rule: ``err(ours) <= rtol * err(same_math) + rounding_slack``, errors
    against the float64 ``ref``; ``same_math`` may be a list of orders of it (the largest
    error counts). Returns (passed, a one-line account)."""
    peers = same_math if isinstance(same_math, (list, tuple)) else [same_math]
    err = max_error(ours, ref)
    peer = max(max_error(p, ref) for p in peers)
    slack = rounding_slack(ref, dtype, magnitude)
    ok = err <= rtol * peer + slack
    return ok, f"error {err:.3g} vs {rtol:g} x torch's {peer:.3g} + slack {slack:.3g}"
