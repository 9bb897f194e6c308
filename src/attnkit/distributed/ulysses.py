"""All-to-all sequence parallelism (DeepSpeed-Ulysses, Jacobs et al., 2023).

Each rank holds a shard of the sequence for *all* heads. One all-to-all trades that for
the *whole* sequence of 1/W of the heads:

    (B, H, N/W, D) on each rank  --all_to_all-->  (B, H/W, N, D) on each rank

then attention runs locally (``attnkit.scaled_dot_product_attention``, any mask works
because every rank sees the whole sequence), and a second all-to-all gives the output
back in sequence shards. Communication is 4 all-to-alls of O(N H D / W) per rank
(q, k, v, out), independent of W — the better strategy when heads outnumber ranks;
ring attention has no such limit.

K/V with fewer heads than ranks (GQA/MQA) are repeated up to lcm(Hkv, W) heads first,
so that each rank receives exactly the K/V heads its query heads read.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import scaled_dot_product_attention
from .group import ring_of
from .inputs import prepare
from .sharding import shard_positions

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """x (W, ...): chunk i goes to rank i, chunk i of the result came from rank i. The
    exchange is its own adjoint, so the backward is the same all-to-all."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.group), None


def _all_to_all(x: Tensor, group) -> Tensor:
    x = x.contiguous()   # and a contiguous result: empty_like would copy a permuted layout
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def _heads_to_sequence(x: Tensor, W: int, group) -> Tensor:
    """(B, H, n, d) sequence shard -> (B, H/W, W*n, d): this rank's heads, all shards in
    rank order."""
    B, H, n, d = x.shape
    x = x.reshape(B, W, H // W, n, d).transpose(0, 1)
    y = _AllToAll.apply(x.contiguous(), group)                  # (W, B, H/W, n, d)
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // W, W * n, d)


def _sequence_to_heads(y: Tensor, W: int, group) -> Tensor:
    """Inverse of :func:`_heads_to_sequence`: (B, H/W, W*n, d) -> (B, H, n, d)."""
    B, h, N, d = y.shape
    x = y.reshape(B, h, W, N // W, d).permute(2, 0, 1, 3, 4)
    x = _AllToAll.apply(x.contiguous(), group)                  # (W, B, h, n, d)
    return x.transpose(0, 1).reshape(B, W * h, N // W, d)


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None,
                      is_causal: bool = False, scale: float | None = None,
                      key_padding_mask: Tensor | None = None,
                      layout: str = "contiguous") -> Tensor:
    r"""Attention over a sequence split across ``group`` by head/sequence all-to-all.

    Same contract as :func:`attnkit.distributed.ring_attention` (shards in, this rank's
    output shard out, equal to single-process attention; differentiable, collective
    backward), with one more requirement: the query heads must divide among the ranks
    (``Hq % world_size == 0``). ``key_padding_mask`` is this rank's (..., S) slice, True
    = padding. ``layout="zigzag"`` shards are accepted too (the gathered sequence is put
    back in order before attention), so both strategies can share one data layout.
    """
    ring = ring_of(group)
    s = prepare("ulysses_attention", ring, query, key, value, is_causal=is_causal,
                scale=scale, key_padding_mask=key_padding_mask, layout=layout)
    W = ring.world
    q, k, v = s.q, s.k, s.v
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % W:
        raise ValueError(f"ulysses_attention scatters heads: query heads ({Hq}) must be a "
                         f"multiple of the group size ({W}); use ring_attention instead")
    if Hkv % W:                               # repeat K/V heads so every rank gets its own
        reps = math.lcm(Hkv, W) // Hkv
        k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)

    q, k, v = (_heads_to_sequence(t, W, ring.group) for t in (q, k, v))
    mask = None
    if s.keep is not None:
        parts = [torch.empty_like(s.keep, dtype=torch.uint8) for _ in range(W)]
        dist.all_gather(parts, s.keep.to(torch.uint8).contiguous(), group=ring.group)
        keep = torch.cat(parts, -1).bool()                      # (B, W*S), rank order
    if layout != "contiguous":                # rank order -> sequence order, and back
        order_q = torch.cat([shard_positions(W * L, r, W, layout=layout, device=q.device)
                             for r in range(W)])
        order_k = torch.cat([shard_positions(W * S, r, W, layout=layout, device=q.device)
                             for r in range(W)])
        q = q.index_select(2, torch.argsort(order_q))
        k = k.index_select(2, torch.argsort(order_k))
        v = v.index_select(2, torch.argsort(order_k))
        if s.keep is not None:
            keep = keep.index_select(1, torch.argsort(order_k))
    if s.keep is not None and not bool(keep.all()):
        mask = keep.view(B, 1, 1, W * S)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                       scale=scale)
    if layout != "contiguous":
        out = out.index_select(2, order_q)
    out = _sequence_to_heads(out, W, ring.group)
    return out.reshape(*s.batch, *out.shape[1:])
