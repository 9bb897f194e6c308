"""Attention over keys each query row chose (DeepSeek Sparse Attention's top-k): the
engine gathers exactly the selected keys of a chunk of rows, never the (L, S) grid.

For a chunk of rows, with ``idx`` the chosen key indices of each row (k per row):

    K_sel = K[idx], V_sel = V[idx]                         (rows, k, D) gathered
    s     = scale * q . K_sel  (-inf where unused or masked)
    out   = softmax(s) V_sel,  lse = logsumexp(s)

and the backward recomputes each chunk from (out, lse), as FlashAttention does:

    P = exp(s - lse),  dS = P * (dO . V_sel - rowsum(dO * out))
    dq = scale * dS K_sel,  dK[idx] += scale * dS q,  dV[idx] += P dO

Memory is O(rows per chunk x k x D), linear in the sequence length; the work is
O(L x k x D) instead of O(L x S x D). Gathering k keys per row is bound by memory
traffic: the chunk is sized so the gathered keys stay in the last-level cache.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...dtypes import compute_dtype
from ...masks import Grid, Mask

__all__ = ["selected_attention"]

#: gathered numbers (keys or values) per chunk of rows: ~8 MB in float32
CHUNK_ELEMENTS = 1 << 21


class _Units:
    """How query heads, index heads and kv heads line up: U gather units, unit u reads kv
    head ``kv[u]`` with the indices of index head ``ih[u]`` for ``g`` query heads."""

    def __init__(self, Hq: int, Hkv: int, Hi: int):
        if Hi not in (1, Hkv, Hq):
            raise ValueError(f"selected indices must have 1, Hkv = {Hkv} or Hq = {Hq} heads, "
                             f"got {Hi}")
        self.U = max(Hi, Hkv)
        self.g = Hq // self.U
        u = torch.arange(self.U)
        self.kv = u * Hkv // self.U
        self.ih = u * Hi // self.U


def _gather(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, Hkv, S, D) at flat rows (B, U, c, k) of its (B*Hkv*S, D) view -> (B, U, c, k, D)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_select(0, rows.reshape(-1)).view(*rows.shape, x.shape[-1])


def _flat_rows(idx: Tensor, units: _Units, B: int, Hkv: int, S: int) -> Tensor:
    """(B, U, c, k) rows of the flattened K/V for chunk indices idx (B|1, Hi, c, k)."""
    idx = idx.expand(B, *idx.shape[1:])[:, units.ih.to(idx.device)]
    base = (torch.arange(B, device=idx.device).view(B, 1, 1, 1) * Hkv
            + units.kv.to(idx.device).view(1, -1, 1, 1)) * S
    return base + idx.clamp(min=0)


def _scores(q, ks, idx, other: Mask | None, grid: Grid, units: _Units, r0: int,
            scale: float) -> Tensor:
    """(B, U, c, g, k) masked scores of the chunk's rows: q (B, U, c, g, D)."""
    s = torch.matmul(q, ks.transpose(-1, -2)) * scale
    B, U, c, g, k = s.shape
    allowed = (idx >= 0).expand(B, -1, -1, -1)[:, units.ih.to(idx.device)]  # (B, U, c, k)
    allowed = allowed.unsqueeze(3)
    if other is not None:
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
        h = (torch.arange(U, device=q.device).view(1, U, 1, 1, 1) * g
             + torch.arange(g, device=q.device).view(1, 1, 1, g, 1))
        i = torch.arange(r0, r0 + c, device=q.device).view(1, 1, c, 1, 1)
        keys = idx.clamp(min=0).expand(B, -1, -1, -1)[:, units.ih.to(idx.device)].unsqueeze(3)
        allowed = allowed & other.at(grid, b, h, i, keys)
    return s.masked_fill(~allowed, -math.inf)


def _chunk_rows(U: int, g: int, k: int, D: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, U * k * D))


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, other, grid, scale):
        out, lse = _forward(q, k, v, indices, other, grid, scale)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.other, ctx.grid, ctx.scale = other, grid, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, indices, out, lse, ctx.other, ctx.grid, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _split(q: Tensor, units: _Units, r0: int, r1: int, acc) -> Tensor:
    """(B, Hq, L, D) rows r0..r1-1 as (B, U, c, g, D) in the accumulation dtype."""
    B, Hq, _, D = q.shape
    return q[:, :, r0:r1].to(acc).view(B, units.U, units.g, r1 - r0, D).transpose(2, 3)


def _join(x: Tensor) -> Tensor:
    """(B, U, c, g, X) back to (B, U * g, c, X)."""
    B, U, c, g, X = x.shape
    return x.transpose(2, 3).reshape(B, U * g, c, X)


def _forward(q, k, v, indices, other, grid, scale):
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = compute_dtype(q.dtype)
    units = _Units(Hq, Hkv, indices.shape[1])
    out = q.new_zeros(B, Hq, L, Dv, dtype=acc)
    lse = q.new_full((B, Hq, L), -math.inf, dtype=acc)
    step = _chunk_rows(units.U, units.g, indices.shape[-1], max(D, Dv))
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        idx = indices[:, :, r0:r1]
        rows = _flat_rows(idx, units, B, Hkv, S)
        ks, vs = _gather(k, rows).to(acc), _gather(v, rows).to(acc)
        s = _scores(_split(q, units, r0, r1, acc), ks, idx, other, grid, units, r0, scale)
        m = s.amax(-1, keepdim=True).clamp(min=torch.finfo(acc).min)
        p = torch.exp(s - m)
        total = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vs) / total.clamp(min=torch.finfo(acc).tiny)
        out[:, :, r0:r1] = _join(o)
        lse[:, :, r0:r1] = _join(m + torch.log(total)).squeeze(-1)
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, indices, out, lse, other, grid, scale):
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = compute_dtype(q.dtype)
    units = _Units(Hq, Hkv, indices.shape[1])
    dq = torch.zeros(B, Hq, L, D, dtype=acc, device=q.device)
    dk = torch.zeros(B * Hkv * S, D, dtype=acc, device=q.device)
    dv = torch.zeros(B * Hkv * S, v.shape[-1], dtype=acc, device=q.device)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, Hq, L)
    step = _chunk_rows(units.U, units.g, indices.shape[-1], max(D, v.shape[-1]))
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        idx = indices[:, :, r0:r1]
        rows = _flat_rows(idx, units, B, Hkv, S)
        ks, vs = _gather(k, rows).to(acc), _gather(v, rows).to(acc)
        qc = _split(q, units, r0, r1, acc)
        s = _scores(qc, ks, idx, other, grid, units, r0, scale)
        lc = _split(lse.unsqueeze(-1), units, r0, r1, acc)
        p = torch.exp(s - torch.where(torch.isinf(lc), 0.0, lc))
        p = torch.where(torch.isinf(lc), 0.0, p)
        do = _split(dout, units, r0, r1, acc)
        dp = torch.matmul(do, vs.transpose(-1, -2))
        ds = p * (dp - _split(delta.unsqueeze(-1), units, r0, r1, acc)) * scale
        dq[:, :, r0:r1] = _join(torch.matmul(ds, ks))
        flat = rows.reshape(-1)
        dk.index_add_(0, flat, torch.matmul(ds.transpose(-1, -2), qc).reshape(-1, D))
        dv.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), do).reshape(-1, v.shape[-1]))
    return (dq.to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype))


def selected_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float,
                       other: Mask | None = None, grid: Grid | None = None):
    """Attention of q (B, Hq, L, D) over the keys ``indices`` (B|1, Hi, L, k) choose per row
    (Hi: 1, Hkv or Hq heads; entries < 0 unused), within ``other`` (a mask evaluated at
    the chosen keys, e.g. causal). k (B, Hkv, S, D), v (B, Hkv, S, Dv). Returns
    ``(out (B, Hq, L, Dv), lse (B, Hq, L))``; differentiable in q, k and v."""
    if grid is None:
        grid = Grid(q.shape[2], k.shape[2], q.device, dtype=compute_dtype(q.dtype))
    return _SelectedAttention.apply(q, k, v, indices, other, grid, scale)
