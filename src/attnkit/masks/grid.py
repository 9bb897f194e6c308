"""The grid one attention call lives on, and the vocabulary of block states.

Key ``j`` sits at position ``j``; query row ``i`` at ``i + (S - L)`` unless positions are
given (:class:`Grid`). A block of the (query, key) grid is ``EMPTY`` (no entry allowed),
``FULL`` (every entry allowed) or ``PARTIAL``; the helpers here build those states and
the broadcasting index tensors masks and biases evaluate on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EMPTY", "PARTIAL", "FULL", "Grid", "as_4d", "pick", "batch_index", "head_index",
           "states_of", "interval_states", "merge_dim"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Grid:
    """The shape of one attention call as masks and biases see it.

    ``q_len`` query rows, ``k_len`` keys; key ``j`` sits at position ``j``. Query row
    ``i`` sits at position ``i + q_offset``, with ``q_offset = k_len - q_len`` unless
    ``offset`` is given, or, when ``query_positions`` (B|1, q_len) is given, at
    ``query_positions[b, i]``. ``dtype`` is the dtype bias arithmetic runs in (the
    input's accumulation type: float64 for float64 inputs, float32 otherwise).
    """

    q_len: int
    k_len: int
    device: torch.device = torch.device("cpu")
    offset: int | None = None
    query_positions: Tensor | None = None
    dtype: torch.dtype = torch.float32

    @property
    def q_offset(self) -> int:
        """The position of query row 0 when every row has the same offset."""
        return self.k_len - self.q_len if self.offset is None else self.offset

    @property
    def affine(self) -> bool:
        """Whether query row i sits at ``i + q_offset`` for every batch element."""
        return self.query_positions is None

    @property
    def batch_size(self) -> int | None:
        """The batch size of per-sequence query positions (None: shared by the batch)."""
        p = self.query_positions
        return p.shape[0] if p is not None and p.shape[0] > 1 else None

    def position(self, b: Tensor, i: Tensor) -> Tensor:
        """Positions of query rows ``i`` in batch elements ``b`` (broadcasting)."""
        if self.query_positions is None:
            return i + self.q_offset
        pos = self.query_positions
        return pos[b if pos.shape[0] > 1 else torch.zeros_like(b), i]

    def row_positions(self, r0: int, r1: int) -> Tensor:
        """(B|1, 1, r1 - r0, 1) positions of query rows r0..r1-1."""
        rows = torch.arange(r0, r1, device=self.device).view(1, 1, -1, 1)
        if self.query_positions is None:
            return rows + self.q_offset
        return self.query_positions[:, r0:r1].view(-1, 1, r1 - r0, 1)

    def position_bounds(self, r_lo: Tensor, r_hi: Tensor) -> tuple[Tensor, Tensor]:
        """For row blocks ``[r_lo, r_hi)`` ((nq, 1) tensors), bounds ``[p_lo, p_hi)`` of
        their query positions: (nq, 1) tensors, or (B|1, 1, nq, 1) per batch element when
        positions are given per row (the smallest and largest position of each block)."""
        if self.query_positions is None:
            return r_lo + self.q_offset, r_hi + self.q_offset
        pos = self.query_positions
        lo, hi = [], []
        for a, c in zip(r_lo.view(-1).tolist(), r_hi.view(-1).tolist()):
            block = pos[:, a:max(c, a + 1)]
            lo.append(block.amin(-1))
            hi.append(block.amax(-1) + 1)
        shape = (pos.shape[0], 1, len(lo), 1)
        return torch.stack(lo, -1).view(shape), torch.stack(hi, -1).view(shape)

    def keys(self, k0: int, k1: int) -> Tensor:
        return torch.arange(k0, k1, device=self.device)


def as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def pick(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` where a table of one entry is shared by every index."""
    if table.shape[0] == 1:
        index = torch.zeros_like(index)
    return table[index]


def batch_index(n: int | None, device) -> Tensor:
    return torch.arange(n or 1, device=device).view(-1, 1, 1, 1)


def head_index(n: int | None, device) -> Tensor:
    return torch.arange(n or 1, device=device).view(1, -1, 1, 1)


def states_of(full: Tensor, empty: Tensor) -> Tensor:
    """Combine 'every entry allowed' and 'no entry allowed' into EMPTY/PARTIAL/FULL."""
    out = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL,
                     dtype=torch.int8, device=full.device)
    out = out.masked_fill(full, FULL)
    return out.masked_fill(empty, EMPTY)


def interval_states(q_lo, q_hi, k_lo, k_hi, lo_off, hi_off) -> Tensor:
    """States for the band ``p + lo_off <= k <= p + hi_off`` (offsets may be tensors)."""
    q_last, k_last = q_hi - 1, k_hi - 1
    full = (k_lo >= q_last + lo_off) & (k_last <= q_lo + hi_off)
    empty = (k_last < q_lo + lo_off) | (k_lo > q_last + hi_off)
    return states_of(full, empty)


def merge_dim(a: int | None, b: int | None, what: str) -> int | None:
    if a is None or a == 1:
        return b if b is not None else a
    if b is None or b == 1 or a == b:
        return a
    raise ValueError(f"cannot combine masks with {what} {a} and {b}")
