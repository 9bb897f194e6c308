"""The recomputing backward (FlashAttention's trick): each segment's probabilities are
recomputed from the saved output and statistics,

    P  = exp(s - shift) / exp(rel)   (eager tiles;  exp(s - lse) for fused ones)
    dS = P * (dP - rowsum(dO * O) + dlse),   dP = dO V^T
    dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO

so training memory stays linear in the sequence length. EXACT tiles form the correction
as rowsum(P * dP) from the same dP, in two passes: a row that sees one key then has
dS = 0 exactly.
"""

from __future__ import annotations

import torch

from ...dtypes import HALF, compute_dtype, stat_dtype
from .additive import NEG_INF, PLAIN
from .forward import EAGER, EXACT, FUSED
from .kernels import (Call, KeyValues, dropout_keep, fold, fused_add_dtype, fused_backward,
                      probabilities, unfold, use_fused)

__all__ = ["backward"]


def segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta_t, need, params,
                   dparams, dq, dk, dv, kv, r, sums=None):
    """Accumulate one segment's dq, dk, dv (and bias-parameter gradients) from its
    probabilities ``p`` and the rows' softmax correction ``delta_t``; with ``sums``
    (B, Hq, L) also add this segment's rowsum(P * dP) to its rows."""
    acc = p.dtype
    Hq = qt.shape[1]
    keep = None
    if cfg.dropout_p > 0:
        keep = dropout_keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
    pd = p if keep is None else p * keep
    do_f = dot.to(acc)
    hk = ks.shape[1]
    gv = torch.matmul(fold(pd, hk).transpose(-1, -2), fold(do_f, hk))
    dp = unfold(torch.matmul(fold(do_f, hk), vs.to(acc).transpose(-1, -2)), Hq)
    if keep is not None:
        dp = dp * keep
    if sums is not None:
        sums[:, :, r] += (p * dp).sum(-1).to(sums.dtype)
    ds = p * (dp - delta_t.unsqueeze(-1))
    if any(need):
        bias_param_grads(cfg, tile, seg, params, need, ds, dparams)
    if t is not None:
        # d softcap * tanh(x) / ds = 1 - tanh(x)^2 = 1 / cosh(x)^2: no cancellation when
        # |tanh(x)| is near 1
        ds = ds / torch.cosh(t).square()
    ds = ds * cfg.scale
    dq[:, :, r] += torch.matmul(fold(ds, hk), ks.to(acc)).reshape(qt.shape)
    gk = torch.matmul(fold(ds, hk).transpose(-1, -2), fold(qt.to(acc), hk))
    seg.add_grad(kv, dk, dv, gk, gv)


def backward(dout, dlse, q, k, v, out, shift, rel, sinks, cfg: Call, params):
    """Gradients from the saved output and statistics (lse = shift + rel), tile by tile,
    each tile with the kernel that computed it (``cfg.modes``; None: fused if usable)."""
    B, Hq, L, _ = q.shape
    acc = compute_dtype(q.dtype)
    need = [p.requires_grad for p in params]
    fused_ok = use_fused(cfg, q, k, v, any(need))
    modes = cfg.modes or [FUSED if fused_ok else EAGER] * len(cfg.tiles)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dparams = [torch.zeros_like(p) if n else None for p, n in zip(params, need)]
    lse = rel if shift is None else shift + rel
    # rowsum(dO * O), the softmax-gradient correction; the gradient through lse, dlse, is
    # a term of its own: dS = P * (dP - rowsum(dO * O) + dlse)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dead = rel == NEG_INF  # rows that see nothing: P = 0
    lse_b = torch.where(dead, float("inf"), lse)
    rel_b = torch.where(dead, float("inf"), rel)
    kv = KeyValues(k, v, Hq)
    # the sinks' gradient, -sum P_sink * rowsum(P * dP): the sum formed from P and dP
    # wherever the eager kernel runs (rowsum(dO * O) in float64 where the fused one does)
    sink_grad = sinks is not None and sinks.requires_grad
    sums = torch.zeros(B, Hq, L, dtype=torch.float64, device=q.device) if sink_grad else None
    summed = torch.zeros(L, dtype=torch.bool, device=q.device) if sink_grad else None
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        qt, dot = q[:, :, r], dout[:, :, r]
        mode = modes[ti] if (modes[ti] != FUSED or fused_ok) else EAGER
        if sink_grad and mode != FUSED:
            summed[r] = True
        # in half precision the stored output carries the dtype's rounding, which
        # rowsum(dO * O) would pass into every dS: eager tiles form the correction from
        # P and dP in float32 instead (the two-pass backward of EXACT tiles)
        if mode == EXACT or (mode == EAGER and q.dtype in HALF):
            exact_tile_backward(cfg, ti, tile, qt, dot, kv, params, need, dparams, shift,
                                 rel_b, dlse, dq, dk, dv, r, acc, sums)
            continue
        for si, seg in enumerate(tile.segments):
            ks, vs = seg.read(kv)
            if mode == FUSED:
                add, _, how, row_shift = cfg.additive.fused(tile, seg, params,
                                                            fused_add_dtype(cfg, q))
                lse_t = lse_b[:, :, r] if row_shift is None else lse_b[:, :, r] - row_shift
                gq, gk, gv = fused_backward(dot, qt, ks, vs, out[:, :, r],
                                             lse_t.to(stat_dtype(q.dtype)), add, cfg.scale, how)
                dq[:, :, r] += gq
                seg.add_grad(kv, dk, dv, gk, gv)
                if dlse is not None:  # the lse term, P * dlse, with dV untouched
                    add, _ = cfg.additive.get(tile, seg, params, acc)
                    p, _ = probabilities(cfg, qt, ks, add, None, lse_b[:, :, r], acc)
                    lse_term(cfg, p, dlse[:, :, r].to(acc), qt, ks, dq, dk, kv, seg, r)
                continue
            add, _ = cfg.additive.get(tile, seg, params, acc)
            p, t = probabilities(cfg, qt, ks, add, None if shift is None else shift[:, :, r],
                                  rel_b[:, :, r], acc)
            segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta[:, :, r], need,
                           params, dparams, dq, dk, dv, kv, r, sums)
    dsinks = None
    if sink_grad:
        full = (dout.double() * out.double()).sum(-1)
        d = torch.where(summed.view(1, 1, -1), sums, full)
        if dlse is not None:
            d = d - dlse.double()
        lse64 = (rel_b.double() if shift is None else shift.double() + rel_b.double())
        p_sink = torch.exp(sinks.double().view(1, Hq, 1) - lse64)
        dsinks = (-(p_sink * d)).sum((0, 2)).to(sinks.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks,
            [None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)])


def lse_term(cfg, p, dlse_t, qt, ks, dq, dk, kv, seg, r):
    """dq and dk of lse alone: dS = P * dlse (dV gets nothing)."""
    hk = ks.shape[1]
    ds = p * dlse_t.unsqueeze(-1) * cfg.scale
    acc = p.dtype
    dq[:, :, r] += torch.matmul(fold(ds, hk), ks.to(acc)).reshape(qt.shape)
    gk = torch.matmul(fold(ds, hk).transpose(-1, -2), fold(qt.to(acc), hk))
    seg.add_grad(kv, dk, None, gk, None)


def exact_tile_backward(cfg, ti, tile, qt, dot, kv, params, need, dparams, shift, rel_b,
                         dlse, dq, dk, dv, r, acc, sums=None):
    """A tile's gradients with the softmax correction formed from the same dP the
    gradients use, delta = rowsum(P * dP) (torch's own softmax backward), in two passes
    over its segments: a row that sees one key has P = 1 and delta = dP exactly, so its
    dS, and its gradients with respect to q and k, are exactly zero."""
    hk = None
    delta = None
    for si, seg in enumerate(tile.segments):
        ks, vs = seg.read(kv)
        hk = ks.shape[1]
        add, _ = cfg.additive.get(tile, seg, params, acc)
        p, _ = probabilities(cfg, qt, ks, add, shift[:, :, r], rel_b[:, :, r], acc)
        dp = unfold(torch.matmul(fold(dot.to(acc), hk), vs.to(acc).transpose(-1, -2)),
                     qt.shape[1])
        if cfg.dropout_p > 0:
            dp = dp * (dropout_keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p))
        part = (p * dp).sum(-1)
        delta = part if delta is None else delta + part
    if delta is None:
        return
    if sums is not None:
        sums[:, :, r] += delta.to(sums.dtype)
    if dlse is not None:
        delta = delta - dlse[:, :, r].to(acc)
    for si, seg in enumerate(tile.segments):
        ks, vs = seg.read(kv)
        add, _ = cfg.additive.get(tile, seg, params, acc)
        p, t = probabilities(cfg, qt, ks, add, shift[:, :, r], rel_b[:, :, r], acc)
        segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta, need, params,
                       dparams, dq, dk, dv, kv, r)


def bias_param_grads(cfg, tile, seg, params, need, ds, dparams):
    """Push this segment's score gradient into the bias parameters (e.g. T5's table)."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need)]
        t = cfg.additive.bias_values(tile, seg, leaves)
        g = ds.to(t.dtype)
        if g.shape != t.shape:
            g = g.sum_to_size(t.shape)
        wanted = [x for x, n in zip(leaves, need) if n]
        grads = torch.autograd.grad(t, wanted, g, allow_unused=True)
    it = iter(grads)
    for i, n in enumerate(need):
        if n:
            gi = next(it)
            if gi is not None:
                dparams[i] += gi
