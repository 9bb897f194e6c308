"""Ring attention across processes, checked against one process.

    torchrun --nproc-per-node 4 examples/ring_attention.py
    torchrun --nproc-per-node 4 examples/ring_attention.py --length 16384 --strategy ulysses

Each of the 4 ranks holds a quarter of one long causal sequence (zigzag layout: chunks r
and 7-r of 8, so every rank does the same causal work). ``ring_attention`` passes K/V
around the ring and returns this rank's shard of the output; the backward pass sends
K/V and their gradients around again. Rank 0 then gathers the shards and compares them
with ``attnkit.scaled_dot_product_attention`` over the whole sequence in one process.

The full inputs are generated from one seed on every rank only so that rank 0 can
check the result; in real use a rank only ever holds its own shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import (gather_sequence, ring_attention, shard_sequence,
                                 ulysses_attention)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192, help="total sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="fewer than --heads: GQA")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--strategy", choices=["ring", "ulysses"], default="ring")
    p.add_argument("--padding", type=int, default=0,
                   help="pad the last N keys of every sequence (key_padding_mask)")
    a = p.parse_args()

    dist.init_process_group("gloo")                 # torchrun sets RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    say = print if rank == 0 else (lambda *x, **y: None)

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, N, D = a.batch, a.heads, a.kv_heads, a.length, a.head_dim
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    dout = torch.randn(B, H, N, D, generator=g)
    padding = torch.zeros(B, N, dtype=torch.bool)
    if a.padding:
        padding[:, N - a.padding:] = True

    def shard(t, dim=-2):
        return shard_sequence(t, rank, world, layout=a.layout, dim=dim).contiguous()

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    kpm = shard(padding, dim=-1) if a.padding else None
    attention = ring_attention if a.strategy == "ring" else ulysses_attention
    say(f"{a.strategy} attention over {world} processes: B={B} H={H} (kv {Hkv}) N={N} "
        f"D={D}, {N // world} tokens per rank, layout={a.layout}, causal")

    dist.barrier()
    t0 = time.perf_counter()
    out = attention(ql, kl, vl, is_causal=True, layout=a.layout, key_padding_mask=kpm)
    t1 = time.perf_counter()
    out.backward(shard(dout))
    t2 = time.perf_counter()
    say(f"rank 0: forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s")

    # put the shards back together (every rank takes part) and check on rank 0
    full_out = gather_sequence(out.detach().contiguous(), layout=a.layout)
    full_grads = [gather_sequence(t.grad, layout=a.layout) for t in (ql, kl, vl)]
    ok = torch.ones(1)
    if rank == 0:
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        want = attnkit.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=~padding[:, None, None, :] if a.padding else None,
            is_causal=True)
        want.backward(dout)
        say(f"one process (attnkit, backend auto): forward + backward "
            f"{time.perf_counter() - t0:.2f} s")
        errors = {"output": (full_out - want).abs().max().item()}
        for name, got, ref in zip(("dq", "dk", "dv"), full_grads, (qf, kf, vf)):
            errors[name] = (got - ref.grad).abs().max().item()
        say("max |ring - one process|: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
        ok[0] = float(all(e < 1e-3 for e in errors.values()))
        say("MATCH" if ok.item() else "MISMATCH")
    dist.broadcast(ok, 0)
    dist.destroy_process_group()
    sys.exit(0 if ok.item() else 1)


if __name__ == "__main__":
    main()
