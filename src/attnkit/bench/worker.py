"""The process that measures: ``python -m attnkit.bench.worker`` reads a plan (JSON on
stdin), runs it case by case and length by length, and writes one JSON line per event
to its stdout. Everything else it or the libraries print goes to stderr.

Each variant is measured on its own: its setup (materialising a mask, building a module,
making a block mask) is timed and sized, then one warm-up call (which compiles compiled
peers), then the timed calls, the first of which also gives the peak memory growth
(:class:`~attnkit.bench.measurement.PeakRSS`). Then everything it built is freed before
the next variant starts.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

from .cases import case_by_name, missing_requirement
from .measurement import rss_bytes, time_call


def _emit(channel, **event):
    channel.write(json.dumps(event) + "\n")
    channel.flush()


def _error_note(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:200]


def measure_variant(case, variant, setup, budget: dict) -> dict:
    """Setup, warm-up and timed calls of one variant on one setup; a dict of figures."""
    # free what earlier variants left in reference cycles, then move every surviving
    # object out of the collector's reach: later collections only scan new objects
    # (a full collection with torch and transformers loaded takes ~0.1 s)
    gc.collect()
    gc.freeze()
    before = rss_bytes()
    t0 = time.perf_counter()
    call = variant.build(setup)
    setup_s = time.perf_counter() - t0
    setup_bytes = max(0, rss_bytes() - before)
    timing = time_call(call, budget_s=budget["budget_s"], min_repeats=budget["min_repeats"],
                       max_repeats=budget["max_repeats"])
    per = case.steps if case.kind == "decode" else 1
    times = [t / per for t in timing.times]
    result = {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "first_call_s": timing.first_call_s,
        "setup_s": setup_s,
        "setup_bytes": setup_bytes,
        "peak_bytes": timing.peak_bytes,
        "mem_bytes": setup_bytes + timing.peak_bytes,
    }
    if variant.compiled:
        result["compile_s"] = max(0.0, timing.first_call_s - result["median_s"] * per)
    if case.kind == "decode":
        cache_bytes = setup.extra.get("cache_bytes")
        if cache_bytes is None:
            k = setup.extra["k_context"]
            cache_bytes = 2 * k.numel() * k.element_size()
        result["cache_bytes"] = int(cache_bytes)
        result["cache_bytes_per_token"] = cache_bytes / setup.n
        result["mem_bytes"] = int(cache_bytes)
    del call
    return result


def run_plan(plan: dict, channel) -> None:
    budget = plan["budget"]
    torch.manual_seed(0)
    for job in plan["jobs"]:  # one case, its lengths ascending, the variants at each
        case = case_by_name(job["case"])
        for n, labels in job["lengths"]:
            variants = [v for v in case.variants if v.label in labels]
            try:
                setup = case.make(n)
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                for v in variants:
                    _emit(channel, type="result", case=case.name, n=n, variant=v.label,
                          status="failed", note=f"setup: {_error_note(e)}")
                continue
            for v in variants:
                _emit(channel, type="start", case=case.name, n=n, variant=v.label)
                missing = missing_requirement(v.needs)
                if missing:
                    _emit(channel, type="result", case=case.name, n=n, variant=v.label,
                          status="skipped", note=missing)
                    continue
                try:
                    figures = measure_variant(case, v, setup, budget)
                    _emit(channel, type="result", case=case.name, n=n, variant=v.label,
                          status="ok", **figures)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    _emit(channel, type="result", case=case.name, n=n, variant=v.label,
                          status="failed", note=_error_note(e))
            del setup
            gc.unfreeze()  # what the setup and its variants left in cycles can go now
            gc.collect()


def main() -> int:
    # the protocol gets the real stdout; anything printed by libraries goes to stderr
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    os.dup2(sys.stderr.fileno(), 1)
    plan = json.load(sys.stdin)
    if plan.get("threads"):
        torch.set_num_threads(plan["threads"])
    run_plan(plan, channel)
    _emit(channel, type="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
