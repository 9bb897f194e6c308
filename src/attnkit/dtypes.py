"""The dtype policy, in one place.

* compute dtype: what scores, softmax and bias arithmetic run in. Half precision
  (float16, bfloat16) computes in float32; float32 and float64 in themselves.
* statistics dtype: what the log-sum-exp is returned in: float64 for float64 inputs,
  float32 otherwise.
"""

from __future__ import annotations

import torch

__all__ = ["HALF", "compute_dtype", "stat_dtype"]

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
