"""The process group as the ring sees it, point-to-point messages, and one collective
check that every rank brings matching shards.

Works the same with gloo (CPU) and NCCL (GPU): messages go through
``torch.distributed.batch_isend_irecv`` (one NCCL group per step, so a ring of sends and
receives cannot deadlock), peers are addressed by their *global* rank, and the receiver
posts its receives from a peer in the order the peer posts its sends (NCCL matches
point-to-point messages by order, gloo by order within a tag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ring", "ring_of", "exchange", "wait_all", "agree_on_shapes"]


@dataclass(frozen=True)
class Ring:
    """This rank's place in the ring of ``group``: messages go to ``next_peer`` and come
    from ``prev_peer`` (global ranks, as torch.distributed's P2P ops want them)."""
    group: object
    rank: int
    world: int
    next_peer: int
    prev_peer: int


def ring_of(group) -> Ring:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("attnkit.distributed needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    world = dist.get_world_size(group)
    pg = group if group is not None else dist.group.WORLD

    def glob(r):
        return dist.get_global_rank(pg, r)

    return Ring(group, rank, world, glob((rank + 1) % world), glob((rank - 1) % world))


def exchange(ring: Ring, sends=(), recvs=(), tag: int = 0) -> list:
    """Post ``recvs`` (tensors, from the previous rank) and ``sends`` (to the next rank)
    as one batch; returns the works to ``wait()`` on. Receives are posted first."""
    ops = [dist.P2POp(dist.irecv, t, ring.prev_peer, ring.group, tag) for t in recvs]
    ops += [dist.P2POp(dist.isend, t, ring.next_peer, ring.group, tag) for t in sends]
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


def wait_all(works) -> None:
    """Wait for each work once (gloo: waiting twice on a P2P work waits for a new message)."""
    for w in works:
        w.wait()


def agree_on_shapes(ring: Ring, what: str, fields: dict, error: Exception | None,
                    device) -> None:
    """Raise on *every* rank unless every rank passed its local checks (``error`` is
    None) and all ``fields`` (name -> int) agree across the group.

    One small all_gather: a rank that rejects its inputs alone would otherwise leave the
    others waiting forever in the ring.
    """
    names = list(fields)
    local = torch.tensor([int(error is not None)] + [int(fields[n]) for n in names],
                         dtype=torch.int64, device=device)
    if ring.world > 1:
        rows = [torch.empty_like(local) for _ in range(ring.world)]
        dist.all_gather(rows, local, group=ring.group)
        table = torch.stack(rows).tolist()
    else:
        table = [local.tolist()]
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} of the group rejected their inputs "
                         f"(see the error raised there)")
    differ = [f"{n} per rank {[row[i + 1] for row in table]}" for i, n in enumerate(names)
              if len({row[i + 1] for row in table}) > 1]
    if differ:
        raise ValueError(f"{what} needs equal shards on every rank of the group, got "
                         + "; ".join(differ))
