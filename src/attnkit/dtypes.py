"""The dtype policy, in one place.

* compute dtype: what softmax statistics and bias arithmetic run in. Half precision
  (float16, bfloat16) computes in float32; float32 and float64 in themselves.
* statistics dtype: what the log-sum-exp is returned in: float64 for float64 inputs,
  float32 otherwise.
* matmul dtype: what the large products (Q K^T, P V) run in. Half precision stays in
  half, with float32 accumulation inside the kernel, where this CPU multiplies it fast
  (AVX512-BF16 or AMX for bfloat16, AVX512-FP16 or AMX-FP16 for float16); where it does
  not (torch then falls back to a scalar loop, ~100x slower than float32), the products
  run in float32 on upcast inputs: more accurate, and faster there. Measured once per
  process (:func:`half_matmul_is_fast`), or set with ``ATTNKIT_HALF_MATMUL=native`` /
  ``float32``.
"""

from __future__ import annotations

import functools
import os
import time

import torch

__all__ = ["HALF", "compute_dtype", "stat_dtype", "matmul_dtype", "half_matmul_is_fast",
           "matmul_rate"]

HALF = (torch.float16, torch.bfloat16)

#: a half dtype counts as fast when its products run at least this share of float32's rate
FAST_SHARE = 0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_rate(dtype: torch.dtype, n: int = 192, repeats: int = 3) -> float:
    """Flops per second (2 n^3 per product) of an (n x n) @ (n x n) torch.mm in ``dtype``,
    best of ``repeats`` after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / max(best, 1e-9)


@functools.lru_cache(maxsize=None)
def half_matmul_is_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (a half dtype) matrices at least FAST_SHARE
    of float32's rate: measured once on a small product (a few ms where half is slow)."""
    forced = os.environ.get("ATTNKIT_HALF_MATMUL", "").strip().lower()
    if forced in ("native", "float32"):
        return forced == "native"
    return matmul_rate(dtype) >= FAST_SHARE * matmul_rate(torch.float32)


def matmul_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the large products of ``dtype`` inputs run in on ``device``."""
    if dtype not in HALF or torch.device(device).type != "cpu":
        return dtype
    return dtype if half_matmul_is_fast(dtype) else torch.float32
