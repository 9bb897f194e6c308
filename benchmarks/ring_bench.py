"""Ring attention on CPU gloo: per-rank memory and communication/compute overlap.

    python benchmarks/ring_bench.py                       # N=16384, B=1, H=8, D=64, 4 ranks
    python benchmarks/ring_bench.py --quick               # N=4096, one repeat
    python benchmarks/ring_bench.py --json ring.json

Memory (target: ring rank / single process < 0.35). Every figure comes from fresh
processes (``attnkit.bench.ranks.run_ranks``; one per allocator policy): the single
process runs
``attnkit.scaled_dot_product_attention(..., backend="chunked")`` on the whole sequence,
a ring rank ``ring_attention`` on its shards. Both include their inputs (and for
"train" dout and the gradients). Three measures of one call after a warm-up:

* ``live``: peak of live tensor bytes (``attnkit.bench.measurement.peak_live_bytes``,
  the CPU counterpart of ``torch.cuda.max_memory_allocated``);
* ``rss``: peak RSS growth (``PeakRSS``) with glibc's default thresholds, which keep
  freed blocks of a few MB in the heap, so it also counts the allocator's retention;
* ``rss pinned``: the same under ``Allocator.memory()`` (every buffer of 64 KiB or more
  its own mapping, returned when freed), so RSS follows the live memory.

Overlap (target: ring / compute <= 1.3). Within one job of W ranks (so all timings
share the same oversubscription of the cores: each rank runs ``cores // W`` torch
threads), the same forward is run four ways from the steps of
``attnkit.distributed.ring.RingForward``, timed interleaved (``interleave``, exactly
``--repeats`` calls each):

* ``ring``: the real ring (``RingForward.run``), each message posted before its block's
  computation and waited after it;
* ``compute``: the very same block computations with the messages removed (a rank uses
  its own piece as a stand-in for the one it would receive);
* ``serial``: the real ring without overlap (wait for each message, then compute);
* ``comm``: the messages alone, without the computations.

Each timing is the slowest rank's wall time from a barrier (``ranks.slowest_rank``);
reported are medians.
"""

from __future__ import annotations

import json
import statistics

import torch

import attnkit
from attnkit.bench import script
from attnkit.bench.measurement import Allocator, PeakRSS, Sample, interleave, peak_live_bytes
from attnkit.bench.ranks import run_ranks, slowest_rank, threads_per_rank
from attnkit.distributed import ring_attention
from attnkit.distributed.group import wait_all
from attnkit.distributed.ring import KV_PIECE, Q_ROWS, RingForward, RingPlan

MB = 2 ** 20


# ----------------------------------------------------------------------- memory

def _inputs(cfg, length, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg["batch"], cfg["heads"], length, cfg["head_dim"])
    return [torch.randn(shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _memory(attention, cfg, length, warm_up_length, train, seed, pinned) -> dict:
    """Measures (MB) of one call that builds its inputs and runs ``attention`` (forward,
    or forward + backward), after a warm-up call at a small length: "rss" and "live",
    or with ``pinned`` "rss pinned" (each process measures one allocator policy)."""
    def run(n=length):
        q, k, v = _inputs(cfg, n, train, seed)
        out = attention(q, k, v)
        if train:
            out.backward(torch.randn_like(out))

    run(warm_up_length)
    if pinned:
        with Allocator.memory(), PeakRSS() as rss:
            run()
        return {"rss pinned": rss.peak / MB}
    with PeakRSS() as rss:                  # glibc's own thresholds, as the process started
        run()
    return {"rss": rss.peak / MB, "live": peak_live_bytes(run) / MB}


def single_memory(rank, world, cfg, train, pinned) -> dict:
    def attention(q, k, v):
        return attnkit.scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"],
                                                    backend="chunked")
    return _memory(attention, cfg, cfg["length"], 64, train, 0, pinned)


def rank_memory(rank, world, cfg, train, pinned) -> dict:
    def attention(q, k, v):
        return ring_attention(q, k, v, is_causal=cfg["causal"], layout=cfg["layout"],
                              q_rows=cfg["q_rows"], kv_piece=cfg["kv_piece"])
    return _memory(attention, cfg, cfg["length"] // world, 4 * world, train, rank, pinned)


def memory(cfg, world, train) -> dict:
    """{"single": figures, "ranks": [figures per rank]}, each from fresh processes."""
    single, ranks = {}, [{} for _ in range(world)]
    for pinned in (False, True):
        single.update(run_ranks(single_memory, 1, cfg, train, pinned, threads=1,
                                group=False)[0])
        for mine, got in zip(ranks, run_ranks(rank_memory, world, cfg, train, pinned)):
            mine.update(got)
    return {"single": single, "ranks": ranks}


# ----------------------------------------------------------------------- overlap

def _ring(f: RingForward, t: int) -> None:
    f.load(t)
    works = f.pass_on(t)
    f.compute(t)
    wait_all(works)
    f.advance(t)


def _compute(f: RingForward, t: int) -> None:
    f.load(t)
    f.compute(t)


def _serial(f: RingForward, t: int) -> None:
    f.load(t)
    wait_all(f.pass_on(t))
    f.compute(t)
    f.advance(t)


def _comm(f: RingForward, t: int) -> None:
    f.load(t)
    wait_all(f.pass_on(t))
    f.advance(t)


MODES = {"ring": _ring, "compute": _compute, "serial": _serial, "comm": _comm}


def rank_timing(rank, world, cfg) -> dict:
    q, k, v = _inputs(cfg, cfg["length"] // world, False, seed=rank)
    plan = RingPlan.build(q.shape[2], k.shape[2], layout=cfg["layout"],
                          is_causal=cfg["causal"], q_rows=cfg["q_rows"],
                          kv_piece=cfg["kv_piece"])

    def forward(step):
        def call():
            f = RingForward(q, k, v, None, plan)
            for t in range(plan.steps):
                step(f, t)
            return f.result()
        return call

    samples = {mode: Sample(forward(step)) for mode, step in MODES.items()}
    with torch.no_grad():
        samples["ring"].call()                                   # warm-up
        interleave(list(samples.values()), budget_s=0.0, min_repeats=cfg["repeats"],
                   max_repeats=cfg["repeats"], timer=slowest_rank)
    return {mode: s.times for mode, s in samples.items()}


# ----------------------------------------------------------------------- main

def main(argv=None):
    p = script.parser(__doc__, options=("quick", "repeats", "json"),
                      quick_help="N=4096, one repeat")
    p.set_defaults(repeats=5)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--kv-piece", type=int, default=KV_PIECE, help="keys per ring message")
    p.add_argument("--q-rows", type=int, default=Q_ROWS, help="query rows per engine call")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.length, a.repeats = 4096, 1
    cfg = dict(length=a.length, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
               causal=a.causal, layout=a.layout, repeats=a.repeats, kv_piece=a.kv_piece,
               q_rows=a.q_rows)
    W = a.world
    print(f"ring attention, gloo on CPU: N={a.length} B={a.batch} H={a.heads} "
          f"D={a.head_dim} float32, world={W}, causal={a.causal}, layout={a.layout}, "
          f"threads/rank={threads_per_rank(W)}, pieces of {a.kv_piece} "
          f"keys, {a.q_rows} query rows per call")
    result = {"config": cfg, "world": W}
    if not a.skip_memory:
        print(f"{'peak memory, MB':24s} {'single':>8s} {'rank max':>9s} {'ratio':>6s}"
              f"   [target < 0.35]")
        for mode in ("forward", "train"):
            result[f"memory_{mode}"] = figures = memory(cfg, W, mode == "train")
            single, ranks = figures["single"], figures["ranks"]
            for measure in ("live", "rss pinned", "rss"):
                worst = max(r[measure] for r in ranks)
                print(f"  {mode:8s}{measure:14s} {single[measure]:8.1f} {worst:9.1f} "
                      f"{worst / single[measure]:6.3f}")
    if not a.skip_timing:
        times = run_ranks(rank_timing, W, cfg)[0]
        med = {m: statistics.median(t) for m, t in times.items()}
        result["time_s"] = times
        result["overlap_ratio"] = med["ring"] / med["compute"]
        result["serial_ratio"] = med["serial"] / med["compute"]
        print(f"forward, median of {a.repeats}: ring {med['ring']:.2f} s, compute only "
              f"{med['compute']:.2f} s, ring without overlap {med['serial']:.2f} s, "
              f"messages only {med['comm']:.2f} s")
        print(f"  ring / compute = {result['overlap_ratio']:.3f}  [target <= 1.3];  "
              f"serial / compute = {result['serial_ratio']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
