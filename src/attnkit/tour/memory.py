"""The peak memory of dense and chunked attention, measured in a fresh interpreter
for section 7 of the tour."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from .. import masks, scaled_dot_product_attention
from ..bench.measurement import peak_live_bytes

MEMORY_LENGTHS = [512, 1024, 2048, 4096]
MEMORY_HEAD_DIM = 64
MEMORY_WINDOW = 128


def window_mask(window: int = MEMORY_WINDOW) -> masks.Mask:
    """The sparse pattern measured: a window of +-``window`` and global token 0."""
    return masks.sliding_window(window) | masks.global_tokens([0])


def peak_allocated(fn) -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated
    before (torch.profiler's allocation and free events, in time order)."""
    return peak_live_bytes(fn)


def memory_child() -> None:
    """Runs in a fresh interpreter (argv[1]: JSON [lengths, head_dim, window]); prints
    one JSON object {case: [peak bytes per length]}."""
    import warnings
    warnings.filterwarnings("ignore")
    lengths, d, w = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparse = window_mask(w)
    cases = {"dense": dict(attn_mask=sparse, backend="reference"),
             "chunked_causal": dict(is_causal=True, backend="chunked"),
             "chunked_window": dict(attn_mask=sparse, backend="chunked")}
    res, seconds = {}, {}
    for L in lengths:
        q, k, v = (torch.randn(1, 1, L, d) for _ in range(3))
        for name, kw in cases.items():
            scaled_dot_product_attention(q[..., :64, :], k[..., :64, :], v[..., :64, :], **kw)
            res.setdefault(name, []).append(
                peak_allocated(lambda: scaled_dot_product_attention(q, k, v, **kw)))
            times = []
            for _ in range(3):  # the median of three calls, after the measured one
                t0 = time.perf_counter()
                scaled_dot_product_attention(q, k, v, **kw)
                times.append(time.perf_counter() - t0)
            seconds.setdefault(name, []).append(sorted(times)[1])
    res["seconds"] = seconds
    print(json.dumps(res))


class MemoryProbe:
    """The memory measurement of section 7, started early in its own fresh interpreter
    (so the tour's own allocations cannot disturb it, and it runs while the other
    sections compute); ``result()`` waits for it."""

    def __init__(self, lengths=MEMORY_LENGTHS, head_dim=MEMORY_HEAD_DIM, window=MEMORY_WINDOW):
        code = "from attnkit.tour.memory import memory_child; memory_child()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps([list(lengths), head_dim, window])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 300) -> dict:
        """Wait for the measurement: {case: [peak bytes per length], "seconds": {case:
        [median seconds of one call per length]}}."""
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"memory measurement failed: {err.strip()[-500:]}")
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        """End the measurement if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
