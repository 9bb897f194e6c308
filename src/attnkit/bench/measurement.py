"""How figures are measured: wall time, peak memory, the machine's GEMM peak.

Time: one warm-up call, then repeats until a time budget is spent (at least
``min_repeats``); the median and the minimum are reported. The minimum is the least
disturbed run (other processes share the cores), the median what a user typically sees.

Memory: the growth of the process's resident set (RSS) during one call, read from
``/proc/self/status``. Before the call the kernel's high-water mark is reset to the
current RSS (``echo 5 > /proc/self/clear_refs``); after it, ``VmHWM - VmRSS_before`` is
the peak extra memory the call needed, whatever allocated it (torch, numpy, Python).
Workers run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so
every sizeable buffer is its own mapping, returned to the system when freed: a later
call cannot hide its peak inside memory an earlier one left in the heap.
Where ``clear_refs`` cannot be written, ``ru_maxrss`` of a fresh process is the fallback
(then only the first, largest measurement of a process is exact; the report says so).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Timing", "time_call", "PeakRSS", "rss_bytes", "gemm_peak_gflops",
           "describe_machine", "WORKER_ENV"]

#: environment for worker processes: big buffers are mmapped and unmapped when freed
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TOKENIZERS_PARALLELISM": "false"}


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


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls after warm-up."""
    times: list = field(default_factory=list)
    first_call_s: float = 0.0      # the warm-up call (includes compilation for compiled peers)
    peak_bytes: int = 0            # peak RSS growth during the first timed call

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


def time_call(fn, *, budget_s: float, min_repeats: int = 3, max_repeats: int = 20,
              measure_memory: bool = True) -> Timing:
    """Warm up ``fn`` once, then call it at least ``min_repeats`` times and until
    ``budget_s`` seconds of calls are spent. The first timed call also measures the peak
    RSS growth (see :class:`PeakRSS`). ``fn`` may return a float: the seconds it timed
    itself (used by decoding cases that reset state between steps)."""
    t0 = time.perf_counter()
    r = fn()
    first = time.perf_counter() - t0
    del r
    timing = Timing(first_call_s=first)
    spent = 0.0
    while len(timing.times) < max_repeats and (len(timing.times) < min_repeats or spent < budget_s):
        if measure_memory and not timing.times:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                r = fn()
                dt = time.perf_counter() - t0
            timing.peak_bytes = mem.peak
        else:
            t0 = time.perf_counter()
            r = fn()
            dt = time.perf_counter() - t0
        if isinstance(r, float):
            dt = r
        del r
        timing.times.append(dt)
        spent += dt
    return timing


def gemm_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    """The machine's float32 matrix-multiply peak: best of ``repeats`` torch.mm(n x n)
    calls after one warm-up, in GFLOP/s (2 n^3 flops per product)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


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
    }
