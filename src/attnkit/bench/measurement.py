"""How figures are measured: wall time, peak memory, the machine's GEMM peak.

Time: one warm-up call, then repeats until a time budget is spent (at least
``min_repeats``; exactly that many when ``min_repeats == max_repeats``); the median and
the minimum are reported, and the CPU (process) time of each call beside its wall time.
The minimum is the least disturbed run (other processes share the cores), the median
what a user typically sees. The implementations of one case at one length are timed
*interleaved*, one call each per round, so that a burst of load from another process
hits them all alike.

Memory: the growth of the process's resident set (RSS) during one call, read from
``/proc/self/status``. Before the call the kernel's high-water mark is reset to the
current RSS (``echo 5 > /proc/self/clear_refs``); after it, ``VmHWM - VmRSS_before`` is
the peak extra memory the call needed, whatever allocated it (torch, numpy, Python).
That call runs under :meth:`Allocator.memory`: every sizeable buffer is its own mapping,
returned to the system when freed, so a later call cannot hide its peak inside memory an
earlier one left in the heap. Where ``clear_refs`` cannot be written, ``ru_maxrss`` of a
fresh process is the fallback (then only the first, largest measurement of a process is
exact; the report says so). :func:`peak_live_bytes` gives the peak of live tensor bytes
instead (torch.profiler's allocation events), the CPU counterpart of
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..dtypes import matmul_rate

__all__ = ["Sample", "warm_up", "interleave", "timed", "PeakRSS", "Allocator", "rss_bytes",
           "peak_live_bytes", "profile_table", "gemm_peak_gflops", "gemm_size", "copy_bandwidth_gbs",
           "describe_machine",
           "WORKER_ENV", "WORKER_ENV_DEFAULTS", "worker_env"]

#: environment for worker processes (the allocator is set per phase: see Allocator)
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TOKENIZERS_PARALLELISM": "false"}
#: set for workers unless the caller set them: OpenMP threads that wait for work sleep
#: instead of spinning. With other processes on the cores, spinning threads steal the
#: time slices of the threads they wait for, which slows code made of many short
#: parallel regions (a tiled engine) far more than one large kernel.
WORKER_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_env() -> dict:
    """The environment worker processes run in (see WORKER_ENV, WORKER_ENV_DEFAULTS)."""
    return {**WORKER_ENV_DEFAULTS, **os.environ, **WORKER_ENV}


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is None:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


class Allocator:
    """glibc malloc's thresholds, switched per phase with ``mallopt``:

    * ``memory()``: free heap memory goes back to the system first (``malloc_trim``), then
      every buffer of 64 KiB or more is its own mapping, returned when freed, so the peak
      RSS growth of a call is what it allocated, not what an earlier call happened to
      leave in the heap (a free heap chunk is reused whatever the thresholds say);
    * ``speed()`` (the default in workers): the thresholds a long-running glibc process
      settles on by itself (its dynamic mmap threshold grows to 32 MiB, the trim threshold
      to twice that), so freed buffers are reused as in a user's training loop instead of
      being mapped, zeroed by page faults and unmapped on every call.

    Without glibc (``mallopt`` missing) both are no-ops and ``method`` says so."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    MEMORY = (64 << 10, 128 << 10)
    SPEED = (32 << 20, 64 << 20)
    method = "glibc mallopt"

    try:
        _mallopt = ctypes.CDLL(None).mallopt
        _malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        _mallopt = _malloc_trim = None
        method = "allocator defaults (mallopt unavailable)"

    @classmethod
    def _set(cls, mmap_threshold: int, trim_threshold: int) -> bool:
        if cls._mallopt is None:  # pragma: no cover
            return False
        return bool(cls._mallopt(cls.M_MMAP_THRESHOLD, mmap_threshold)
                    and cls._mallopt(cls.M_TRIM_THRESHOLD, trim_threshold))

    @classmethod
    def speed(cls) -> bool:
        return cls._set(*cls.SPEED)

    @classmethod
    @contextlib.contextmanager
    def memory(cls):
        if cls._set(*cls.MEMORY):
            cls._malloc_trim(0)
        try:
            yield
        finally:
            cls.speed()


class PeakRSS:
    """Context manager: ``peak`` = highest RSS during the block minus RSS at its start.

    >>> with PeakRSS() as m:
    ...     x = torch.empty(1 << 28, dtype=torch.uint8).fill_(1); del x
    >>> m.peak >= 1 << 28
    True
    """

    method = "VmHWM after clear_refs"

    def __init__(self):
        self.peak = 0
        self.before = 0

    @staticmethod
    def reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def __enter__(self):
        gc.collect()  # only what is not frozen (see worker): cheap
        self.exact = self.reset_high_water_mark()
        self.before = rss_bytes()
        if not self.exact:
            PeakRSS.method = "ru_maxrss (high-water mark could not be reset)"
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        if hwm is None or not self.exact:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak = max(0, hwm * 1024 - self.before)
        return False


def timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn`` (its result is dropped at once)."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    del result
    return seconds


@dataclass
class Sample:
    """One implementation under measurement: its call and the figures so far."""
    call: Callable
    first_call_s: float = 0.0      # the warm-up call (compilation included, if any)
    peak_bytes: int = 0            # peak RSS growth during the memory-measured call
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)   # process CPU seconds of each timed call

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def warm_up(call) -> Sample:
    """One warm-up call (compiles what compiles, fills caches), then one call that
    measures the peak RSS growth (:class:`PeakRSS`, buffers returned to the system:
    :meth:`Allocator.memory`). Its time is not kept: calls are timed under the steady
    allocator (:meth:`Allocator.speed`), by :func:`interleave`."""
    first = timed(call)
    with Allocator.memory(), PeakRSS() as mem:
        timed(call)
    return Sample(call, first, mem.peak, [])


def _needs_more(sample: Sample, budget_s: float, min_repeats: int, max_repeats: int) -> bool:
    n, spent = len(sample.times), sum(sample.times)
    if min_repeats == max_repeats:  # a fixed number of calls
        return n < max_repeats
    if n >= max_repeats:
        return False
    if n < 2:
        return True
    if n < min_repeats:
        return spent < 3 * budget_s  # calls of seconds each: two are enough
    return spent < budget_s


def interleave(samples, *, budget_s: float, min_repeats: int = 3,
               max_repeats: int = 15, timer: Callable = timed) -> None:
    """Time the samples round-robin, one call each per round, until every one has at
    least ``min_repeats`` calls and ``budget_s`` seconds of them (at most
    ``max_repeats``; calls so slow that two take ``3 * budget_s`` stop at two; exactly
    ``max_repeats`` when it equals ``min_repeats``). Load from other processes then falls
    on all implementations alike, so the ratios between them stay fair on a shared
    machine. ``timer(call)`` returns the seconds of one call (default :func:`timed`; a
    benchmark over several processes passes one that reports the slowest rank)."""
    while True:
        active = [s for s in samples if _needs_more(s, budget_s, min_repeats, max_repeats)]
        if not active:
            return
        for s in active:
            cpu = time.process_time()
            s.times.append(timer(s.call))
            s.cpu_times.append(time.process_time() - cpu)


def peak_live_bytes(call) -> int:
    """Peak of live tensor bytes during one call of ``call``, from torch.profiler's
    allocation and free events (tensors only: not the allocator's retention, not Python
    objects)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        timed(call)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def profile_table(call, rows: int = 12) -> str:
    """Where one call of ``call`` spends its time: torch.profiler's operators by self CPU
    time, the top ``rows``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed(call)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def gemm_size(n: int, dtype: str = "float32", seconds: float = 20.0) -> int:
    """``n``, or a smaller size where one (n x n) product in ``dtype`` would take more than
    ``seconds``: a half dtype this CPU has no fast kernels for (bf16 on an AMD EPYC:
    ~1 GFLOP/s, two minutes per 4096^3 product) is measured on products of about a
    second each instead."""
    probe = matmul_rate(getattr(torch, dtype), 256, 1)
    if 2 * n ** 3 / probe <= seconds:
        return n
    return max(256, int((probe / 2) ** (1 / 3)) // 128 * 128)


def gemm_peak_gflops(n: int = 4096, repeats: int = 3, dtype: str = "float32") -> float:
    """The machine's matrix-multiply peak in ``dtype``: best of ``repeats`` torch.mm(n x n)
    calls after one warm-up, in GFLOP/s (2 n^3 flops per product)."""
    return matmul_rate(getattr(torch, dtype), n, repeats) / 1e9


def copy_bandwidth_gbs(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth as a large tensor copy sees it (STREAM's "copy"): bytes read plus
    bytes written per second of ``dst.copy_(src)`` with ``nbytes`` far past any cache,
    best of ``repeats``, in GB/s. Decoding reads its KV cache once per token, so this is
    its roofline."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe_machine() -> dict:
    """What the figures were measured on."""
    try:
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf_version = None
    import attnkit
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "attnkit_version": attnkit.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "memory_total_bytes": _mem_total_bytes(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_method": PeakRSS.method,
        "allocator": f"{Allocator.method}: memory measured with mmap threshold "
                     f"{Allocator.MEMORY[0]} B, time with {Allocator.SPEED[0]} B",
    }
