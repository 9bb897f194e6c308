"""Masks of bands in position space: causal, sliding windows, dilated windows, chunks."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..checks import check_int
from .base import Mask
from .grid import EMPTY, FULL, PARTIAL, interval_states, pick

__all__ = ["CausalMask", "SlidingWindowMask", "DilatedMask", "ChunkedMask", "CompressedCausalMask"]


class CausalMask(Mask):
    """Query at position p sees keys 0..p."""
    translation_invariant = True

    def mask_mod(self, grid, b, h, q, k):
        return k <= q

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return interval_states(q_lo, q_hi, k_lo, k_hi, -math.inf, 0)


def _window_block(span: int) -> int | None:
    """Tiles for a band of ``span`` keys per row: a 128-square tile of a narrow band is
    mostly masked (a +-16 window uses 33 of 256 keys per row), smaller tiles follow it
    (the sizes come from the sliding-window cases of ``attnkit bench``)."""
    if span <= 64:
        return 32
    if span <= 320:
        return 64
    return None


class SlidingWindowMask(Mask):
    """Query at position p sees keys p - left .. p + right.

    A negative ``left`` or ``right`` moves that edge past p (FlashAttention's one-sided
    windows: ``sliding_window(-2, 5)`` sees p + 2 .. p + 5); when ``left + right < 0``
    the window is empty and sees nothing."""
    translation_invariant = True

    def __init__(self, left: int, right: int | None = None):
        self.left = check_int("left (window)", left, minimum=None)
        self.right = self.left if right is None else check_int("right (window)", right,
                                                                 minimum=None)
        self.empty = self.left + self.right < 0
        self.tile_hint = None if self.empty else _window_block(self.left + self.right + 1)

    def mask_mod(self, grid, b, h, q, k):
        return (k >= q - self.left) & (k <= q + self.right)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        if self.empty:
            shape = torch.broadcast_shapes(q_lo.shape, k_lo.shape)
            return torch.full(shape, EMPTY, dtype=torch.int8, device=q_lo.device)
        return interval_states(q_lo, q_hi, k_lo, k_hi, -self.left, self.right)

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class DilatedMask(Mask):
    """Query at position p sees keys p + t * dilation for integer t in [-left, right].

    ``dilation`` may be one int or a sequence with one entry per head.
    """
    translation_invariant = True

    def __init__(self, left: int, right: int, dilation: int | Sequence[int] | Tensor):
        self.left = check_int("left (window)", left)
        self.right = check_int("right (window)", right)
        if isinstance(dilation, int) and not isinstance(dilation, bool):
            d = torch.tensor([dilation])
        else:
            d = torch.as_tensor(dilation)
            if d.is_floating_point() or d.dtype == torch.bool or d.dim() != 1 or d.numel() == 0:
                raise TypeError(
                    f"dilation must be an int or a 1-D sequence of ints (one per head), "
                    f"got {dilation!r}")
        if (d < 1).any():
            raise ValueError(f"dilation must be >= 1, got {d.tolist()}")
        self.dilation = d.long()
        self.num_heads = d.numel() if d.numel() > 1 else None
        self._on = {}

    def _d(self, device):
        if device not in self._on:
            self._on[device] = self.dilation.to(device)
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        d = pick(self._d(grid.device), h)
        rel = k - q
        return (rel % d == 0) & (rel >= -self.left * d) & (rel <= self.right * d)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        d = self._d(grid.device).view(1, -1, 1, 1)
        band = interval_states(q_lo, q_hi, k_lo, k_hi, -self.left * d, self.right * d)
        # only dilation 1 fills a block; otherwise a reached block is PARTIAL
        return torch.where((band == FULL) & (d > 1), torch.tensor(PARTIAL, dtype=torch.int8,
                                                                  device=band.device), band)

    def residue_classes(self) -> list[tuple[list[int] | None, int, Mask]]:
        """The mask split by residue class: ``[(heads, d, window), ...]``.

        A query at position p only sees keys k = p (mod d), and inside one residue class
        (positions r, r + d, r + 2d, ...) the pattern is the plain
        ``sliding_window(left, right)``. So dilated attention is d sliding-window problems
        on strided views of Q, K and V, each as dense as the undilated band, instead of one
        band d times wider with (d - 1)/d of it masked. ``heads`` lists the heads that share
        dilation d (None: every head)."""
        window = SlidingWindowMask(self.left, self.right)
        ds = self.dilation.tolist()
        if len(ds) == 1:
            return [(None, ds[0], window)]
        return [([h for h, x in enumerate(ds) if x == d], d, window) for d in sorted(set(ds))]

    def __repr__(self):
        d = self.dilation.tolist()
        return f"dilated({self.left}, {self.right}, {d[0] if len(d) == 1 else d})"


class ChunkedMask(Mask):
    """Llama 4's chunked attention: positions are cut into chunks of ``size``; a query at
    position p sees the keys of its own chunk up to itself,
    ``p // size == k // size and k <= p``. Blocks outside a query's chunk are EMPTY, so
    the engine's cost grows linearly with the length (``size`` keys per query at
    most)."""

    def __init__(self, size: int):
        self.size = check_int("size (chunk)", size, minimum=1)
        self.tile_hint = size if 16 <= size <= 512 else None

    def mask_mod(self, grid, b, h, q, k):
        return (torch.div(k, self.size, rounding_mode="floor")
                == torch.div(q, self.size, rounding_mode="floor")) & (k <= q)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        c = self.size
        q_first, q_last = torch.div(q_lo, c, rounding_mode="floor"), torch.div(
            q_hi - 1, c, rounding_mode="floor")
        k_first, k_last = torch.div(k_lo, c, rounding_mode="floor"), torch.div(
            k_hi - 1, c, rounding_mode="floor")
        # some query of the block shares a chunk with some key at or before it: the
        # chunks overlap and the first key is not after the last query
        meets = (q_first <= k_last) & (k_first <= q_last) & (k_lo <= q_hi - 1)
        whole = (q_first == q_last) & (k_first == k_last) & (q_first == k_first) & \
            (k_hi - 1 <= q_lo)
        return torch.where(whole, FULL, torch.where(meets, PARTIAL, EMPTY)).to(torch.int8)

    def tile_signature(self, grid, r0, r1, k0, k1):
        """Blocks at the same place in their chunk, with the same offset, are equal."""
        if not grid.affine:
            return None
        p0 = r0 + grid.q_offset
        return ("chunked", self.size, p0 % self.size, k0 - p0, r1 - r0, k1 - k0)

    def __repr__(self):
        return f"chunked({self.size})"


class CompressedCausalMask(Mask):
    """Queries over *compressed* keys (NSA's compression branch): key ``c`` summarises the
    tokens ``c * stride .. c * stride + size - 1``, and the query at token position p sees
    it once the whole window is past: ``c * stride + size - 1 <= p``. Query row i sits at
    token ``i + query_offset`` (the tokens before this call's queries), not bottom-right
    against the (fewer) compressed keys."""

    def __init__(self, size: int, stride: int, query_offset: int = 0):
        self.size = check_int("size", size, 1)
        self.stride = check_int("stride", stride, 1)
        self.query_offset = check_int("query_offset", query_offset, 0)

    def query_positions(self, q_len, k_len):
        return torch.arange(q_len).view(1, -1) + self.query_offset

    def mask_mod(self, grid, b, h, q, k):
        return k * self.stride + self.size - 1 <= q

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        s, w = self.stride, self.size
        full = (k_hi - 1) * s + w - 1 <= q_lo
        empty = k_lo * s + w - 1 > q_hi - 1
        out = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL,
                         dtype=torch.int8, device=q_lo.device)
        return out.masked_fill(full, FULL).masked_fill(empty, EMPTY)

    def __repr__(self):
        return f"compressed_causal({self.size}, {self.stride}, query_offset={self.query_offset})"
