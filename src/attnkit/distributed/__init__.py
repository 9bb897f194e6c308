"""Attention over sequences split across processes, on ``torch.distributed`` (gloo on
CPU, NCCL on GPU; launch with ``torchrun``).

* :func:`ring_attention`: K/V blocks travel around the ring of ranks, overlapped with
  the computation on the current block; memory O(N / world) per rank, forward and backward.
  :class:`~.ring.RingPlan` and :class:`~.ring.RingForward` (in ``attnkit.distributed.ring``)
  expose one rank's forward step by step, so its messages and computations can be run
  and timed apart.
* :func:`ulysses_attention`: all-to-all sequence parallelism (heads scattered, sequence
  gathered), when the heads divide among the ranks.
* :func:`shard_sequence`, :func:`unshard_sequence`, :func:`shard_positions`,
  :func:`gather_sequence`: the ``"contiguous"`` and ``"zigzag"`` (causal load-balanced)
  layouts.

    import torch.distributed as dist
    from attnkit.distributed import ring_attention, shard_sequence

    dist.init_process_group("gloo")                 # torchrun --nproc-per-node 4 ...
    r, w = dist.get_rank(), dist.get_world_size()
    q, k, v = (shard_sequence(t, r, w, layout="zigzag") for t in (q_full, k_full, v_full))
    out = ring_attention(q, k, v, is_causal=True, layout="zigzag")   # this rank's shard
"""

from .ring import ring_attention
from .sharding import (LAYOUTS, gather_sequence, shard_positions, shard_sequence,
                       unshard_sequence)
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "unshard_sequence",
           "shard_positions", "gather_sequence", "LAYOUTS"]
