"""Checking and normalising one rank's shards before any message is sent.

Every check runs locally, then :func:`~.group.agree_on_shapes` compares the shapes across
the group, so bad input raises ``ValueError``/``TypeError`` on every rank instead of
leaving the others blocked in the ring.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_qkv
from .group import Ring, agree_on_shapes
from .sharding import LAYOUTS, check_layout

__all__ = ["Shards", "prepare", "check_sizes"]


@dataclass
class Shards:
    """q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) with the caller's batch dims
    folded into B; ``keep`` (B, S) bool, True = may attend, or None."""
    q: Tensor
    k: Tensor
    v: Tensor
    keep: Tensor | None
    batch: torch.Size


def _check_scale(scale):
    if scale is None:
        return
    if isinstance(scale, Tensor) and scale.dim() == 0:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_sizes(sizes: dict) -> None:
    """Every value (name -> size) must be an int >= 1."""
    for name, x in sizes.items():
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if x < 1:
            raise ValueError(f"{name} must be at least 1, got {x}")


def prepare(what: str, ring: Ring, query, key, value, *, is_causal, scale,
            key_padding_mask, layout, sizes: dict | None = None) -> Shards:
    """Validate this rank's shards, agree on shapes with the group, fold batch dims.
    ``sizes`` (name -> int >= 1, e.g. piece sizes) are checked and must agree too."""
    sizes = sizes or {}
    fields = dict.fromkeys(["query length", "key length", "batch size", "query heads",
                            "key/value heads", "head_dim", "value head_dim",
                            "key_padding_mask given", "is_causal", "layout", *sizes], 0)
    error = None
    try:
        check_sizes(sizes)
        fields.update(sizes)
        check_qkv(query, key, value)
        check_layout(layout)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        _check_scale(scale)
        batch = query.shape[:-3]
        (Hq, L, D), (Hkv, S), Dv = query.shape[-3:], key.shape[-3:-1], value.shape[-1]
        fields.update({"query length": L, "key length": S, "batch size": math.prod(batch),
                       "query heads": Hq, "key/value heads": Hkv, "head_dim": D,
                       "value head_dim": Dv, "key_padding_mask given":
                       key_padding_mask is not None, "is_causal": is_causal,
                       "layout": LAYOUTS.index(layout)})
        shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        if L == 0 or S == 0:
            raise ValueError(f"{what} needs at least one token per rank, got {shapes}")
        if is_causal and L != S:
            raise ValueError(f"causal {what} splits one sequence: the query and key shards "
                             f"must have the same length, got {shapes}")
        if layout == "zigzag" and (L % 2 or S % 2):
            raise ValueError(f"layout='zigzag' holds two equal chunks per rank, so shard "
                             f"lengths must be even, got {shapes}")
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), "
                                f"got {getattr(kpm, 'dtype', type(kpm).__name__)}")
            if kpm.shape != (*batch, S):
                raise ValueError(f"key_padding_mask must be this rank's (*batch, S) = "
                                 f"{(*batch, S)} slice (True = padding), got "
                                 f"{tuple(kpm.shape)} for {shapes}")
            if kpm.device != key.device:
                raise ValueError(f"key_padding_mask is on {kpm.device} but key is on "
                                 f"{key.device}")
    except (TypeError, ValueError) as e:
        error = e
    device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    agree_on_shapes(ring, what, fields, error, device)

    B = math.prod(batch)
    keep = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask.reshape(B, S)
    return Shards(query.reshape(B, Hq, L, D), key.reshape(B, Hkv, S, D),
                  value.reshape(B, Hkv, S, Dv), keep, batch)
