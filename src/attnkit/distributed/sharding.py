"""How a sequence of length N is cut into ``world_size`` shards, and back.

Two layouts, both giving every rank N / world_size tokens:

* ``"contiguous"``: rank r holds positions ``[r * n, (r + 1) * n)``, n = N / world.
* ``"zigzag"``: the sequence is cut into ``2 * world`` equal chunks of c = N / (2 * world)
  tokens and rank r holds chunks ``r`` and ``2 * world - 1 - r`` (in that order). Under a
  causal mask the work of a query chunk grows with its position; pairing an early chunk
  with the mirrored late one gives every rank the same amount of work (the "zigzag" or
  "load-balanced" layout of ring-flash-attention and Llama 3 context parallelism).

Inside a shard tokens keep their global order, so a shard is a list of *intervals*:
``(local_start, global_start, length)``. Everything position-dependent (causal masks,
rotary embeddings) reads positions from :func:`shard_positions`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "Interval", "shard_intervals", "shard_positions", "shard_sequence",
           "unshard_sequence", "gather_sequence"]

LAYOUTS = ("contiguous", "zigzag")


class Interval(NamedTuple):
    """``length`` tokens at local index ``local`` of a shard, global position ``start``."""
    local: int
    start: int
    length: int


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, "
                         f"got {layout!r}")
    return layout


def _check_rank(rank, world_size):
    for name, x in (("rank", rank), ("world_size", world_size)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")


def shard_intervals(shard_len: int, rank: int, world_size: int,
                    layout: str = "contiguous") -> list[Interval]:
    """The global positions held by ``rank``'s shard of ``shard_len`` tokens, as intervals.

    contiguous: ``[(0, r*n, n)]``; zigzag: ``[(0, r*c, c), (c, (2W-1-r)*c, c)]``, c = n/2.
    """
    check_layout(layout)
    _check_rank(rank, world_size)
    if layout == "contiguous":
        return [Interval(0, rank * shard_len, shard_len)]
    if shard_len % 2:
        raise ValueError(f"the zigzag layout needs an even shard length (two equal chunks), "
                         f"got {shard_len}")
    c = shard_len // 2
    return [Interval(0, rank * c, c), Interval(c, (2 * world_size - 1 - rank) * c, c)]


def _split(length: int, world_size: int, layout: str) -> int:
    parts = world_size * (2 if layout == "zigzag" else 1)
    if length % parts:
        raise ValueError(f"a sequence of length {length} does not split into {parts} equal "
                         f"parts for world_size={world_size} with layout={layout!r}; pad it "
                         f"to a multiple of {parts}")
    return length // world_size


def shard_positions(length: int, rank: int, world_size: int, *, layout: str = "contiguous",
                    device=None) -> Tensor:
    """Global positions (shard_len,) of ``rank``'s tokens in a sequence of ``length`` (what
    a rotary embedding needs: ``rope(q, k, shard_positions(N, rank, world))``)."""
    check_layout(layout)
    _check_rank(rank, world_size)
    n = _split(length, world_size, layout)
    return torch.cat([torch.arange(iv.start, iv.start + iv.length, device=device)
                      for iv in shard_intervals(n, rank, world_size, layout)])


def shard_sequence(x: Tensor, rank: int, world_size: int, *, layout: str = "contiguous",
                   dim: int = -2) -> Tensor:
    """``rank``'s shard of the full sequence ``x`` along ``dim`` (default -2, the length
    dim of (..., heads, length, head_dim)). The length must split into equal parts:
    ``world_size`` of them (contiguous) or ``2 * world_size`` (zigzag)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_layout(layout)
    _check_rank(rank, world_size)
    n = _split(x.shape[dim], world_size, layout)
    parts = [x.narrow(dim, iv.start, iv.length)
             for iv in shard_intervals(n, rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(shards: Sequence[Tensor], *, layout: str = "contiguous",
                     dim: int = -2) -> Tensor:
    """The full sequence from the list of every rank's shard (in rank order); the inverse
    of :func:`shard_sequence`. Differentiable."""
    check_layout(layout)
    shards = list(shards)
    if not shards or not all(isinstance(s, Tensor) for s in shards):
        raise TypeError("shards must be a non-empty sequence of tensors, one per rank")
    lengths = [s.shape[dim] for s in shards]
    if len(set(lengths)) != 1:
        raise ValueError(f"shards must have equal lengths along dim {dim}, got {lengths}")
    world, n = len(shards), lengths[0]
    pieces = {}
    for r, s in enumerate(shards):
        for iv in shard_intervals(n, r, world, layout):
            pieces[iv.start] = s.narrow(dim, iv.local, iv.length)
    return torch.cat([pieces[k] for k in sorted(pieces)], dim)


def gather_sequence(x: Tensor, *, group=None, layout: str = "contiguous",
                    dim: int = -2) -> Tensor:
    """All-gather every rank's shard of ``group`` and reassemble the full sequence on each
    rank. A convenience for checks and examples: O(N) memory, not differentiable."""
    import torch.distributed as dist

    check_layout(layout)
    world = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, layout=layout, dim=dim)
