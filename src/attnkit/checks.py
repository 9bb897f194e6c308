"""Argument checks shared by the whole library: each raises a TypeError or ValueError that
names the argument and what it got."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["positive_int", "check_int", "int_tensor", "shape_of", "check_qkv"]


def positive_int(name: str, x) -> int:
    """``x`` itself when it is an int >= 1 (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


def check_int(name: str, value, minimum: int | None = 0) -> int:
    """An int (a 0-d integer tensor is accepted) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def int_tensor(values) -> Tensor:
    """``torch.as_tensor`` of a sequence meant to hold ints: an empty one (``[]`` or
    ``torch.tensor([])``, float by default) becomes an empty long tensor."""
    t = torch.as_tensor(values)
    return t.long() if t.numel() == 0 and t.is_floating_point() else t


def shape_of(t) -> str:
    return str(tuple(t.shape))


def check_qkv(query, key, value) -> None:
    """query (..., Hq, L, D), key (..., Hkv, S, D), value (..., Hkv, S, Dv): one dtype, one
    device, the same batch dims, Hq a multiple of Hkv."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, head_dim), "
                             f"got {shape_of(t)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, "
                        f"{key.dtype} and {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, "
                         f"{key.device} and {value.device}")
    shapes = f"query {shape_of(query)}, key {shape_of(key)}, value {shape_of(value)}"
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {shapes}")
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(f"query, key and value must have the same batch dims, got {shapes}")
    if key.shape[-3] != value.shape[-3] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same heads and length, got {shapes}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head_dim, got {shapes}")
    hq, hkv = query.shape[-3], key.shape[-3]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) "
                         f"for grouped-query attention, got {shapes}")
