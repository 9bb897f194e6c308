"""Ring attention on CPU gloo: per-rank memory and communication/compute overlap.

    python benchmarks/ring_bench.py                       # N=16384, B=1, H=8, D=64, 4 ranks
    python benchmarks/ring_bench.py --quick               # N=4096, one repeat
    python benchmarks/ring_bench.py --json ring.json

Memory (targets: ring rank / single process < 0.35). Every figure comes from fresh
processes: the single-process run is ``attnkit.scaled_dot_product_attention(...,
backend="chunked")`` on the whole sequence, a ring rank holds only its shards. Both
include their inputs (and for "train" dout and the gradients). Three measures:

* ``live``: peak of live tensor bytes, from torch.profiler's allocation events (the CPU
  counterpart of ``torch.cuda.max_memory_allocated``);
* ``rss``: peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up) minus
  the RSS before the inputs, with glibc's default malloc, which keeps freed blocks of a
  few MB in its heap, so it also counts the allocator's retention;
* ``rss pinned``: the same with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed blocks go
  back to the system and RSS follows the live memory.

Overlap (target: ring / compute <= 1.3). Within one job of W ranks (so all timings
share the same oversubscription of the cores: each rank runs
``torch.set_num_threads(max(1, cores // W))``), the same forward is timed three ways,
interleaved over the repeats:

* ``ring``: the real ring, each message posted before its block's computation and
  waited after it;
* ``compute``: the very same block computations with the messages removed (a rank uses
  its own piece as a stand-in for the one it would receive);
* ``serial``: the real ring without overlap (wait for each message, then compute);
* ``comm``: the messages alone, without the computations.

Each timing is the slowest rank's wall time from a barrier (all_reduce MAX); reported
are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit.distributed import ring_attention
from attnkit.distributed import ring as ring_mod
from attnkit.distributed.group import ring_of

PINNED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------- memory probes

def _status(field: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_mb(run) -> float:
    """Peak RSS growth of ``run()`` over the RSS just before it, in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # reset VmHWM to the current RSS
    base = _status("VmRSS")
    run()
    return (_status("VmHWM") - base) / 2 ** 20


def _peak_live_mb(run) -> float:
    """Peak of live tensor bytes allocated during ``run()``, from the profiler's
    allocation/free events, in MB."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def _inputs(cfg, length, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg["batch"], cfg["heads"], length, cfg["head_dim"])
    return [torch.randn(shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _measure(attention, cfg, length, train, seed=0) -> dict:
    def run():
        q, k, v = _inputs(cfg, length, train, seed)
        out = attention(q, k, v)
        if train:
            out.backward(torch.randn_like(out))
    rss = _peak_rss_mb(run)
    return {"rss": rss, "live": _peak_live_mb(run)}


def memory_single(cfg, train: bool) -> dict:
    torch.set_num_threads(1)

    def attention(q, k, v):
        return attnkit.scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"],
                                                    backend="chunked")
    _measure(attention, cfg, 64, train)                          # warm-up
    return _measure(attention, cfg, cfg["length"], train)


# ------------------------------------------------------------------------- rank jobs

def _init(rank, world, port, threads, cfg):
    ring_mod.Q_ROWS, ring_mod.KV_PIECE = cfg["q_rows"], cfg["kv_piece"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=900))
    torch.set_num_threads(threads)


def _memory_rank(rank, world, port, threads, cfg, train, outdir):
    _init(rank, world, port, threads, cfg)
    try:
        def attention(q, k, v):
            return ring_attention(q, k, v, is_causal=cfg["causal"], layout=cfg["layout"])
        _measure(attention, cfg, 4 * world, train)                # warm-up
        dist.barrier()
        result = _measure(attention, cfg, cfg["length"] // world, train, seed=rank)
        with open(os.path.join(outdir, f"mem{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _timing_rank(rank, world, port, threads, cfg, outdir):
    _init(rank, world, port, threads, cfg)
    try:
        q, k, v = _inputs(cfg, cfg["length"] // world, False, seed=rank)
        plan = ring_mod._Plan.build(ring_of(None), cfg["layout"], cfg["causal"], None,
                                    q.shape[2], k.shape[2])
        modes = {"ring": dict(communicate=True, overlap=True),
                 "compute": dict(communicate=False),
                 "serial": dict(communicate=True, overlap=False),
                 "comm": dict(communicate=True, compute=False)}
        times = {m: [] for m in modes}
        with torch.no_grad():
            ring_mod._ring_forward(q, k, v, None, plan)              # warm-up
            for _ in range(cfg["repeats"]):
                for mode, kw in modes.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    ring_mod._ring_forward(q, k, v, None, plan, **kw)
                    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    times[mode].append(t.item())
        if rank == 0:
            with open(os.path.join(outdir, "times.json"), "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args, env=None):
    """Run ``fn`` in ``world`` fresh processes (spawn: a new interpreter each, which
    reads ``env`` at start-up)."""
    threads = max(1, (os.cpu_count() or 1) // world)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        mp.start_processes(fn, args=(world, _free_port(), threads, *args), nprocs=world,
                           start_method="spawn")
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k)
            else:
                os.environ[k] = old


def _single(cfg, mode, env=None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_single", mode, "--_cfg",
                          json.dumps(cfg)], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ranks(cfg, world, train, tmp, env=None) -> list[dict]:
    _spawn(_memory_rank, world, cfg, train, tmp, env=env)
    return [json.load(open(os.path.join(tmp, f"mem{r}.json"))) for r in range(world)]


# ------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--kv-piece", type=int, default=ring_mod.KV_PIECE,
                   help="keys per ring message")
    p.add_argument("--q-rows", type=int, default=ring_mod.Q_ROWS,
                   help="query rows per engine call")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--quick", action="store_true", help="N=4096, one repeat")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--_single", choices=["forward", "train"], help=argparse.SUPPRESS)
    p.add_argument("--_cfg", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._single:
        print(json.dumps(memory_single(json.loads(a._cfg), a._single == "train")))
        return
    if a.quick:
        a.length, a.repeats = 4096, 1
    cfg = dict(length=a.length, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
               causal=a.causal, layout=a.layout, repeats=a.repeats, kv_piece=a.kv_piece,
               q_rows=a.q_rows)
    W = a.world
    print(f"ring attention, gloo on CPU: N={a.length} B={a.batch} H={a.heads} "
          f"D={a.head_dim} float32, world={W}, causal={a.causal}, layout={a.layout}, "
          f"threads/rank={max(1, (os.cpu_count() or 1) // W)}, pieces of {a.kv_piece} "
          f"keys, {a.q_rows} query rows per call")
    result = {"config": cfg, "world": W}
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_memory:
            print(f"{'peak memory, MB':24s} {'single':>8s} {'rank max':>9s} {'ratio':>6s}"
                  f"   [target < 0.35]")
            for mode in ("forward", "train"):
                single, ranks = _single(cfg, mode), _ranks(cfg, W, mode == "train", tmp)
                single["rss pinned"] = _single(cfg, mode, PINNED)["rss"]
                pinned = _ranks(cfg, W, mode == "train", tmp, PINNED)
                for r, pr in zip(ranks, pinned):
                    r["rss pinned"] = pr["rss"]
                result[f"memory_{mode}"] = {"single": single, "ranks": ranks}
                for measure in ("live", "rss pinned", "rss"):
                    worst = max(r[measure] for r in ranks)
                    print(f"  {mode:8s}{measure:14s} {single[measure]:8.1f} {worst:9.1f} "
                          f"{worst / single[measure]:6.3f}")
        if not a.skip_timing:
            _spawn(_timing_rank, W, cfg, tmp)
            times = json.load(open(os.path.join(tmp, "times.json")))
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
