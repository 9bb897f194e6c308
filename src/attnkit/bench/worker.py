"""The process that measures: ``python -m attnkit.bench.worker`` reads a plan (JSON on
stdin), runs it case by case and length by length, and writes one JSON line per event
to its stdout. Everything else it or the libraries print goes to stderr.

For one case at one length, each implementation is prepared in turn: its setup
(materialising a mask, building a module, making a block mask) is timed and sized, one
warm-up call compiles what compiles, one more call gives the peak memory growth
(:class:`~attnkit.bench.measurement.PeakRSS`, with freed buffers returned to the system;
calls are timed with glibc's steady-state thresholds:
:class:`~attnkit.bench.measurement.Allocator`). Then the implementations are timed
interleaved, one call each per round, so that load from other processes falls on all of
them alike; one whose setup holds more than 512 MiB is timed right away on its own and
freed before the next is built.

The plan names where the cases come from (``source``: ``"module:attribute"``, or
``"/path/to/script.py:attribute"`` for a script in ``benchmarks/``), so the same worker
measures ``attnkit bench`` and every focused benchmark. With ``profile`` set, each
attnkit implementation is also run once under torch.profiler at the case's first length.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import torch

from .cases import SOURCE, case_by_name
from .measurement import (Allocator, Sample, copy_bandwidth_gbs, gemm_peak_gflops, gemm_size,
                          interleave, profile_table, rss_bytes, warm_up)
from .spec import DTYPES, cast, missing_optional


def _emit(channel, **event):
    channel.write(json.dumps(event) + "\n")
    channel.flush()


def _error_note(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:200]


#: setups that keep more than this resident are timed on their own, not interleaved
INTERLEAVE_MAX_SETUP_BYTES = 512 << 20


def prepare(variant, setup) -> tuple[Sample, dict]:
    """Build one variant (setup timed and sized), warm it up, measure its peak memory
    growth during one call."""
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
    sample = warm_up(call)
    return sample, {"setup_s": setup_s, "setup_bytes": setup_bytes}


def load_cases(source: str) -> tuple:
    """The cases a plan's ``source`` names: ``"package.module:attribute"`` or
    ``"/path/to/file.py:attribute"`` (loaded under its own module name; a script's
    ``if __name__ == "__main__"`` part does not run)."""
    where, _, attribute = source.rpartition(":")
    if where.endswith(".py"):
        name = "attnkit_bench_" + os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return tuple(getattr(module, attribute))


def figures(case, n: int, variant, sample: Sample, info: dict) -> dict:
    per = case.steps if case.kind == "decode" else 1  # decoding: time per token
    times = [t / per for t in sample.times]
    cpu = [t / per for t in sample.cpu_times]
    result = {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_median_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
        "repeats": len(times),
        "first_call_s": sample.first_call_s,
        **info,
        "peak_bytes": sample.peak_bytes,
        "mem_bytes": info["setup_bytes"] + sample.peak_bytes,
    }
    if variant.compiled:
        result["compile_s"] = max(0.0, sample.first_call_s - statistics.median(sample.times))
    if case.kind == "decode":
        cache_bytes = int(sample.call.cache_bytes)
        result["cache_bytes"] = cache_bytes
        result["cache_bytes_per_token"] = cache_bytes / n
        # one decoded token reads the whole cache once: its read bandwidth
        result["cache_read_gbs"] = cache_bytes / result["median_s"] / 1e9
        result["mem_bytes"] = cache_bytes
    return result


_preloaded: set = set()


def preload(variant) -> None:
    """Import what the variant will import (call "module:function" entries) once per
    process, before anything is measured."""
    for entry in variant.preload:
        if entry in _preloaded:
            continue
        _preloaded.add(entry)
        module, _, function = entry.partition(":")
        mod = importlib.import_module(module)
        if function:
            getattr(mod, function)()


def _profile(variant, sample: Sample, emit) -> None:
    if variant.role != "attnkit":
        return
    try:
        table = profile_table(sample.call)
    except Exception as e:  # noqa: BLE001 - the figures stand; the profile says why not
        table = f"profile failed: {_error_note(e)}"
    emit(type="profile", variant=variant.label, table=table)


def measure_length(case, n: int, variants, budget: dict, emit, profile: bool = False,
                   dtype: str = "float32") -> None:
    """Every variant of one case at one length: each prepared in turn, then timed
    interleaved with the others (those whose setup is small enough to keep around);
    with ``profile``, attnkit's variants are then profiled once each."""
    timing = dict(budget_s=budget["budget_s"], min_repeats=budget["min_repeats"],
                  max_repeats=budget["max_repeats"])
    try:
        setup = cast(case.make(n), DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        for v in variants:
            emit(variant=v.label, status="failed", note=f"setup: {_error_note(e)}")
        return
    kept = []
    for v in variants:
        emit(type="start", variant=v.label)
        missing = missing_optional(v.needs)
        if missing:
            emit(variant=v.label, status="skipped", note=missing, missing_package=True)
            continue
        try:
            preload(v)
            sample, info = prepare(v, setup)
            if info["setup_bytes"] > INTERLEAVE_MAX_SETUP_BYTES:
                interleave([sample], **timing)
                emit(variant=v.label, status="ok", **figures(case, n, v, sample, info))
                if profile:
                    _profile(v, sample, emit)
            else:
                kept.append((v, sample, info))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            emit(variant=v.label, status="failed", note=_error_note(e))
    try:
        interleave([sample for _, sample, _ in kept], **timing)
        for v, sample, info in kept:
            emit(variant=v.label, status="ok", **figures(case, n, v, sample, info))
        for v, sample, _ in kept if profile else ():
            _profile(v, sample, emit)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        for v, _, _ in kept:
            emit(variant=v.label, status="failed", note=_error_note(e))


def run_plan(plan: dict, channel) -> None:
    torch.manual_seed(0)
    cases = load_cases(plan.get("source", SOURCE))
    for job in plan["jobs"]:  # one case, its lengths ascending, the variants at each
        case = case_by_name(job["case"], cases)
        first = job["lengths"][0][0] if job["lengths"] else None
        for n, labels in job["lengths"]:
            variants = [v for v in case.variants if v.label in labels]

            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

            def emit(type="result", **event):  # each row says how busy the machine was
                _emit(channel, type=type, case=case.name, n=n, load_average=load, **event)
            measure_length(case, n, variants, plan["budget"], emit,
                           profile=bool(plan.get("profile")) and n == first,
                           dtype=plan.get("dtype", "float32"))
            gc.unfreeze()  # what the setup and its variants left in cycles can go now
            gc.collect()


def main() -> int:
    # the protocol gets the real stdout; anything printed by libraries goes to stderr
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    os.dup2(sys.stderr.fileno(), 1)
    plan = json.load(sys.stdin)
    Allocator.speed()  # warm_up switches to Allocator.memory() for its measured call
    if plan.get("threads"):
        torch.set_num_threads(plan["threads"])
    if plan.get("gemm"):
        gemm = dict(plan["gemm"])
        gemm["n"] = gemm_size(gemm["n"], gemm.get("dtype", "float32"))
        _emit(channel, type="gemm", gflops=gemm_peak_gflops(**gemm), n=gemm["n"],
              copy_gbs=copy_bandwidth_gbs(), threads=torch.get_num_threads())
    run_plan(plan, channel)
    _emit(channel, type="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
