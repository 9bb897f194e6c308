"""Measuring code that runs on several processes (``torch.distributed`` on gloo, this
machine): start the ranks, time a collective call as its slowest rank.

:func:`run_ranks` starts ``world`` fresh interpreters (``spawn``: each reads the
environment at start-up, none inherits the parent's heap), joins them in one gloo group,
gives each ``cores // world`` torch threads, runs ``fn(rank, world, *args)`` on each and
returns every rank's (JSON-serialisable) result. With ``group=False`` the processes are
fresh but not joined (a single-process baseline measured the same way).

:func:`slowest_rank` is a timer for :func:`attnkit.bench.measurement.interleave`: all
ranks start the call together (a barrier, not timed) and every rank gets the slowest
rank's wall time (an all-reduce of the maximum), so all ranks take the same decisions.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .measurement import timed

__all__ = ["run_ranks", "slowest_rank", "threads_per_rank", "TIMEOUT_S"]

#: how long a rank waits for the others in a collective before the job fails
TIMEOUT_S = 900


def threads_per_rank(world: int) -> int:
    """Torch threads per rank when ``world`` ranks share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world, port, threads, group, outdir, args):
    if group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if group:
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, threads: int | None = None, group: bool = True) -> list:
    """``fn(rank, world, *args)`` on ``world`` fresh processes (a gloo group unless
    ``group=False``); the list of their results, in rank order. ``fn`` must be importable
    by the spawned interpreters (a module-level function). A rank's exception fails the
    job (torch's ``ProcessRaisedException``, with the rank's traceback)."""
    threads = threads or threads_per_rank(world)
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank_main, args=(fn, world, _free_port(), threads, group, outdir,
                                             args),
                           nprocs=world, start_method="spawn")
        results = []
        for rank in range(world):
            with open(os.path.join(outdir, f"{rank}.json")) as f:
                results.append(json.load(f))
    return results


def slowest_rank(call) -> float:
    """Seconds of one collective ``call``: started together on every rank of the default
    group, the slowest rank's wall time, the same on every rank."""
    dist.barrier()
    seconds = torch.tensor([timed(call)], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()
