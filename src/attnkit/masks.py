"""Mask objects: which keys each query may see.

Every mask speaks in *positions*. Key ``j`` sits at position ``j``; query row ``i``
sits at position ``p = i + (S - L)`` (bottom-right alignment, what KV-cache decoding
needs), or at a position the mask itself declares per row (:meth:`Mask.query_positions`:
a ragged batch puts each sequence's queries bottom-right against its own keys, packed
cross-attention each document's). A mask describes its pattern in positions:

* ``mask_mod(grid, b, h, q, k)``: the elementwise rule on broadcasting index tensors
  (query positions ``q``, keys ``k``), FlexAttention's ``mask_mod`` with the grid bound in;
* ``position_states(grid, q_lo, q_hi, k_lo, k_hi)``: for every rectangle of query
  positions ``[q_lo, q_hi)`` x keys ``[k_lo, k_hi)``, is it ``EMPTY`` (no entry
  allowed), ``FULL`` (every entry allowed) or ``PARTIAL``?

The engine asks in query *rows*, and :class:`Mask` turns rows into positions through the
:class:`Grid`:

* ``block_states(grid, r_lo, r_hi, k_lo, k_hi)``: the states of row blocks; the chunked
  engine skips empty tiles and runs full tiles without a mask, so cost follows what the
  mask allows;
* ``tile(grid, r0, r1, k0, k1)``: the exact bool block ``(B|1, H|1, r1-r0, k1-k0)``;
* ``at(grid, b, h, i, k)``: the elementwise rule at query rows ``i`` (gathered keys,
  FlexAttention).

Masks that are defined on rows rather than positions (a dense tensor) override these
three. ``True`` means "may attend", as in ``torch.nn.functional.scaled_dot_product_attention``.
Masks compose with ``&`` (both allow) and ``|`` (either allows); ``materialize(L, S)``
draws the dense picture, for plots and tests only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Grid", "Mask",
    "causal", "padding", "key_padding", "sliding_window", "dilated", "global_tokens",
    "block_sparse", "document", "packed", "bigbird", "KeyPaddingMask",
    "CausalMask", "PaddingMask", "SlidingWindowMask", "DilatedMask", "GlobalTokensMask",
    "BlockSparseMask", "BigBirdMask", "DocumentMask", "TensorMask", "AndMask", "OrMask",
    "bigbird_layout",
]

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


def _as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _pick(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` where a table of one entry is shared by every index."""
    if table.shape[0] == 1:
        index = torch.zeros_like(index)
    return table[index]


def _batch_index(n: int | None, device) -> Tensor:
    return torch.arange(n or 1, device=device).view(-1, 1, 1, 1)


def _head_index(n: int | None, device) -> Tensor:
    return torch.arange(n or 1, device=device).view(1, -1, 1, 1)


def _states(full: Tensor, empty: Tensor) -> Tensor:
    """Combine 'every entry allowed' and 'no entry allowed' into EMPTY/PARTIAL/FULL."""
    out = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL,
                     dtype=torch.int8, device=full.device)
    out = out.masked_fill(full, FULL)
    return out.masked_fill(empty, EMPTY)


def _interval_states(q_lo, q_hi, k_lo, k_hi, lo_off, hi_off) -> Tensor:
    """States for the band ``p + lo_off <= k <= p + hi_off`` (offsets may be tensors)."""
    q_last, k_last = q_hi - 1, k_hi - 1
    full = (k_lo >= q_last + lo_off) & (k_last <= q_lo + hi_off)
    empty = (k_last < q_lo + lo_off) | (k_lo > q_last + hi_off)
    return _states(full, empty)


def _merge_dim(a: int | None, b: int | None, what: str) -> int | None:
    if a is None or a == 1:
        return b if b is not None else a
    if b is None or b == 1 or a == b:
        return a
    raise ValueError(f"cannot combine masks with {what} {a} and {b}")


class Mask:
    """Base class of all masks. Subclasses implement ``mask_mod`` and, when they can,
    ``position_states``; the default says every block is PARTIAL (correct, no skipping).
    """

    #: batch size of a mask that differs per batch element (None: the same for all)
    batch_size: int | None = None
    #: number of heads of a mask that differs per head (None: the same for all)
    num_heads: int | None = None
    #: a natural block size the engine may align its tiles to
    block_size: int | None = None
    #: True when what a query sees depends only on the offset k - p (and the head):
    #: tiles of the same geometry are then equal and the engine reuses them
    relative: bool = False

    # ---- the pattern, in query positions

    def mask_mod(self, grid: Grid, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        raise NotImplementedError

    def position_states(self, grid: Grid, q_lo: Tensor, q_hi: Tensor, k_lo: Tensor,
                        k_hi: Tensor) -> Tensor:
        """EMPTY/PARTIAL/FULL for rectangles of query positions ``[q_lo, q_hi)`` and keys
        ``[k_lo, k_hi)``: (nq, 1) / (1, nk) tensors."""
        shape = torch.broadcast_shapes(q_lo.shape, k_lo.shape)
        return torch.full(shape, PARTIAL, dtype=torch.int8, device=q_lo.device)

    def query_positions(self, q_len: int, k_len: int) -> Tensor | None:
        """Positions (B|1, q_len) this mask puts the query rows at, or None for the
        default ``i + (k_len - q_len)``."""
        return None

    # ---- what the engine asks, in query rows

    def at(self, grid: Grid, b: Tensor, h: Tensor, i: Tensor, k: Tensor) -> Tensor:
        """The rule at query rows ``i`` (broadcasting index tensors)."""
        return self.mask_mod(grid, b, h, grid.position(b, i), k)

    def tile(self, grid: Grid, r0: int, r1: int, k0: int, k1: int) -> Tensor:
        """Exact bool block (B|1, H|1, r1-r0, k1-k0) for query rows ``r0..r1-1`` and keys
        ``k0..k1-1``."""
        b = _batch_index(self.batch_size or grid.batch_size, grid.device)
        h = _head_index(self.num_heads, grid.device)
        i = torch.arange(r0, r1, device=grid.device).view(1, 1, -1, 1)
        k = grid.keys(k0, k1).view(1, 1, 1, -1)
        return _as_4d(self.at(grid, b, h, i, k))

    def block_states(self, grid: Grid, r_lo: Tensor, r_hi: Tensor, k_lo: Tensor,
                     k_hi: Tensor) -> Tensor:
        """EMPTY/PARTIAL/FULL per block of query rows ``[r_lo, r_hi)`` ((nq, 1)) and keys
        ``[k_lo, k_hi)`` ((1, nk))."""
        q_lo, q_hi = grid.position_bounds(r_lo, r_hi)
        if q_lo.dim() == 2:
            return self.position_states(grid, q_lo, q_hi, k_lo, k_hi)
        if q_lo.shape[0] == 1:  # positions per row, shared by the batch
            return _as_4d(self.position_states(grid, q_lo[0, 0], q_hi[0, 0], k_lo, k_hi))
        per_batch = []  # positions given per batch element: ask about each one's blocks
        for b in range(q_lo.shape[0]):
            st = _as_4d(self.position_states(grid, q_lo[b, 0], q_hi[b, 0], k_lo, k_hi))
            per_batch.append(st[b:b + 1] if st.shape[0] > 1 else st)
        return torch.cat(per_batch, 0)

    def tile_signature(self, grid: Grid, r0: int, r1: int, k0: int, k1: int):
        """A hashable value that two blocks share only when their :meth:`tile` is equal,
        or None (no promise). A translation-invariant mask's block depends only on the
        offset ``k0 - r0`` and its size (when every row has the same offset); the engine
        runs blocks with equal signatures as one batched kernel call."""
        if self.relative and grid.affine:
            return ("relative", k0 - r0, r1 - r0, k1 - k0)
        return None

    def validate(self, grid: Grid) -> None:
        """Raise ValueError when the mask cannot describe this grid."""

    def materialize(self, q_len: int, k_len: int | None = None, device=None) -> Tensor:
        """Dense bool mask: (L, S), or (B|1, H|1, L, S) when it depends on batch/head."""
        k_len = q_len if k_len is None else k_len
        device = torch.device(device or "cpu")
        positions = self.query_positions(int(q_len), int(k_len))
        grid = Grid(int(q_len), int(k_len), device,
                    query_positions=None if positions is None else positions.to(device))
        self.validate(grid)
        dense = self.tile(grid, 0, q_len, 0, k_len)
        dense = dense.expand(*dense.shape[:2], q_len, k_len)
        if dense.shape[0] == 1 and dense.shape[1] == 1 and self.batch_size is None \
                and self.num_heads is None:
            return dense[0, 0].clone()
        return dense.clone()

    def __and__(self, other: "Mask") -> "Mask":
        return AndMask(self, _check_mask(other, "&"))

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask(self, _check_mask(other, "|"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_mask(m, op: str) -> Mask:
    if not isinstance(m, Mask):
        raise TypeError(f"masks combine with {op} only with other masks, got {type(m).__name__}")
    return m


class _Combined(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.batch_size = _merge_dim(a.batch_size, b.batch_size, "batch sizes")
        self.num_heads = _merge_dim(a.num_heads, b.num_heads, "head counts")
        self.block_size = a.block_size or b.block_size
        self.relative = a.relative and b.relative

    def validate(self, grid):
        self.a.validate(grid)
        self.b.validate(grid)

    def query_positions(self, q_len, k_len):
        pa, pb = self.a.query_positions(q_len, k_len), self.b.query_positions(q_len, k_len)
        if pa is None or pb is None:
            return pb if pa is None else pa
        if pa.shape != pb.shape or not torch.equal(pa, pb):
            raise ValueError(f"{self.a!r} and {self.b!r} put the queries at different "
                             f"positions; combine masks that agree on them")
        return pa

    def tile_signature(self, grid, r0, r1, k0, k1):
        sa = self.a.tile_signature(grid, r0, r1, k0, k1)
        sb = self.b.tile_signature(grid, r0, r1, k0, k1)
        return None if sa is None or sb is None else (self.symbol, sa, sb)

    def __repr__(self):
        return f"({self.a!r} {self.symbol} {self.b!r})"


class AndMask(_Combined):
    """Both masks allow the key."""
    symbol = "&"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) & self.b.mask_mod(grid, b, h, q, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return torch.minimum(_as_4d(self.a.position_states(grid, q_lo, q_hi, k_lo, k_hi)),
                             _as_4d(self.b.position_states(grid, q_lo, q_hi, k_lo, k_hi)))

    def at(self, grid, b, h, i, k):
        return self.a.at(grid, b, h, i, k) & self.b.at(grid, b, h, i, k)

    def tile(self, grid, r0, r1, k0, k1):
        return self.a.tile(grid, r0, r1, k0, k1) & self.b.tile(grid, r0, r1, k0, k1)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        return torch.minimum(_as_4d(self.a.block_states(grid, r_lo, r_hi, k_lo, k_hi)),
                             _as_4d(self.b.block_states(grid, r_lo, r_hi, k_lo, k_hi)))


class OrMask(_Combined):
    """Either mask allows the key."""
    symbol = "|"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) | self.b.mask_mod(grid, b, h, q, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return torch.maximum(_as_4d(self.a.position_states(grid, q_lo, q_hi, k_lo, k_hi)),
                             _as_4d(self.b.position_states(grid, q_lo, q_hi, k_lo, k_hi)))

    def at(self, grid, b, h, i, k):
        return self.a.at(grid, b, h, i, k) | self.b.at(grid, b, h, i, k)

    def tile(self, grid, r0, r1, k0, k1):
        return self.a.tile(grid, r0, r1, k0, k1) | self.b.tile(grid, r0, r1, k0, k1)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        return torch.maximum(_as_4d(self.a.block_states(grid, r_lo, r_hi, k_lo, k_hi)),
                             _as_4d(self.b.block_states(grid, r_lo, r_hi, k_lo, k_hi)))


# --------------------------------------------------------------------------- windows

def _int_tensor(values) -> Tensor:
    """``torch.as_tensor`` of a sequence meant to hold ints: an empty one (``[]`` or
    ``torch.tensor([])``, float by default) becomes an empty long tensor."""
    t = torch.as_tensor(values)
    return t.long() if t.numel() == 0 and t.is_floating_point() else t


def _check_int(name: str, value, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class CausalMask(Mask):
    """Query at position p sees keys 0..p."""
    relative = True

    def mask_mod(self, grid, b, h, q, k):
        return k <= q

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return _interval_states(q_lo, q_hi, k_lo, k_hi, -math.inf, 0)


def _window_block(span: int) -> int | None:
    """Tiles for a band of ``span`` keys per row: a 128-square tile of a narrow band is
    mostly masked (a +-16 window uses 33 of 256 keys per row), smaller tiles follow it
    (measured at n=8192: +-16 74 -> 36 ms with 32, +-64 73 -> 43 ms with 64)."""
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
    relative = True

    def __init__(self, left: int, right: int | None = None):
        self.left = _check_int("left (window)", left, minimum=None)
        self.right = self.left if right is None else _check_int("right (window)", right,
                                                                 minimum=None)
        self.empty = self.left + self.right < 0
        self.block_size = None if self.empty else _window_block(self.left + self.right + 1)

    def mask_mod(self, grid, b, h, q, k):
        return (k >= q - self.left) & (k <= q + self.right)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        if self.empty:
            shape = torch.broadcast_shapes(q_lo.shape, k_lo.shape)
            return torch.full(shape, EMPTY, dtype=torch.int8, device=q_lo.device)
        return _interval_states(q_lo, q_hi, k_lo, k_hi, -self.left, self.right)

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class DilatedMask(Mask):
    """Query at position p sees keys p + t * dilation for integer t in [-left, right].

    ``dilation`` may be one int or a sequence with one entry per head.
    """
    relative = True

    def __init__(self, left: int, right: int, dilation: int | Sequence[int] | Tensor):
        self.left = _check_int("left (window)", left)
        self.right = _check_int("right (window)", right)
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
        d = _pick(self._d(grid.device), h)
        rel = k - q
        return (rel % d == 0) & (rel >= -self.left * d) & (rel <= self.right * d)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        d = self._d(grid.device).view(1, -1, 1, 1)
        band = _interval_states(q_lo, q_hi, k_lo, k_hi, -self.left * d, self.right * d)
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


# --------------------------------------------------------------------------- tokens

def _prefix_count(flags: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Number of True flags in [lo, hi) (clamped to the table), vectorised."""
    csum = torch.nn.functional.pad(flags.long().cumsum(0), (1, 0))
    n = flags.numel()
    return csum[hi.clamp(0, n)] - csum[lo.clamp(0, n)]


class GlobalTokensMask(Mask):
    """Tokens at ``indices`` see every key and are seen by every query."""

    def __init__(self, indices):
        idx = _int_tensor(indices)
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.dim() > 1:
            raise TypeError(f"indices must be a 1-D sequence of ints, got {indices!r}")
        idx = idx.reshape(-1).long()
        if (idx < 0).any():
            raise ValueError(f"global token indices must be >= 0, got {idx.tolist()}")
        self.indices = idx
        self._tables = {}

    def validate(self, grid):
        if self.indices.numel() and int(self.indices.max()) >= grid.k_len:
            raise ValueError(f"global token index {int(self.indices.max())} is out of range "
                             f"for a key length of {grid.k_len}")

    def _table(self, grid):
        key = (grid.k_len, grid.device)
        if key not in self._tables:
            t = torch.zeros(grid.k_len + 1, dtype=torch.bool)
            t[self.indices[self.indices < grid.k_len]] = True
            self._tables[key] = t.to(grid.device)  # last slot: "not a position"
        return self._tables[key]

    def _is_global(self, grid, pos):
        t = self._table(grid)
        inside = (pos >= 0) & (pos < grid.k_len)
        return t[torch.where(inside, pos, grid.k_len)]

    def mask_mod(self, grid, b, h, q, k):
        return self._is_global(grid, q) | self._is_global(grid, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        t = self._table(grid)[:-1]
        nq = _prefix_count(t, q_lo, q_hi)
        nk = _prefix_count(t, k_lo, k_hi)
        full = (nq == (q_hi - q_lo)) | (nk == (k_hi - k_lo))
        empty = (nq == 0) & (nk == 0)
        return _states(full, empty)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


def _lengths(name: str, lengths) -> Tensor:
    ln = _int_tensor(lengths)
    if ln.is_floating_point() or ln.dtype == torch.bool or ln.dim() > 1:
        raise TypeError(f"{name} must be a 1-D sequence of ints (one per batch element), "
                        f"got {lengths!r}")
    ln = ln.reshape(-1).long()
    if ln.numel() == 0 or (ln < 0).any():
        raise ValueError(f"{name} must be non-empty and >= 0, got {ln.tolist()}")
    return ln


class PaddingMask(Mask):
    """Keys at index >= lengths[b] are padding and are never seen.

    With ``query_lengths`` the batch is ragged on both sides: sequence b has
    ``query_lengths[b]`` real queries in rows 0.. (right-padded) and ``lengths[b]`` real
    keys, and its queries sit bottom-right against its own keys: row i at position
    ``i + lengths[b] - query_lengths[b]``. Causal masks, windows and position biases then
    follow each sequence's own length; padding rows (i >= query_lengths[b]) see nothing.
    """

    def __init__(self, lengths, query_lengths=None):
        self.lengths = _lengths("lengths", lengths)
        self.query_lengths = None
        if query_lengths is not None:
            self.query_lengths = _lengths("query_lengths", query_lengths)
            if self.query_lengths.shape != self.lengths.shape:
                raise ValueError(f"query_lengths {self.query_lengths.tolist()} and lengths "
                                 f"{self.lengths.tolist()} must have one entry per sequence")
            if (self.query_lengths > self.lengths).any():
                raise ValueError(f"query_lengths {self.query_lengths.tolist()} must not exceed "
                                 f"lengths {self.lengths.tolist()} (the queries are the last "
                                 f"tokens of each sequence)")
        self.batch_size = self.lengths.numel()
        self._on = {}

    def validate(self, grid):
        if self.query_lengths is not None and int(self.query_lengths.max()) > grid.q_len:
            raise ValueError(f"query_lengths {self.query_lengths.tolist()} exceed the query "
                             f"length {grid.q_len}")

    def query_positions(self, q_len, k_len):
        if self.query_lengths is None:
            return None
        rows = torch.arange(q_len).view(1, -1)
        return rows + (self.lengths - self.query_lengths).view(-1, 1)

    def _ln(self, device):
        if device not in self._on:
            self._on[device] = self.lengths.to(device)
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        n = _pick(self._ln(grid.device), b)
        allow = k < n
        if self.query_lengths is not None:  # padding queries sit at positions >= n
            allow = allow & (q < n)
        return allow

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        n = self._ln(grid.device).view(-1, 1, 1, 1)
        full, empty = (k_hi <= n) & (q_lo == q_lo), (k_lo >= n) & (q_lo == q_lo)
        if self.query_lengths is not None:
            full, empty = full & (q_hi <= n), empty | (q_lo >= n)
        return _states(full, empty)

    def __repr__(self):
        if self.query_lengths is None:
            return f"padding({self.lengths.tolist()})"
        return f"padding({self.lengths.tolist()}, query_lengths={self.query_lengths.tolist()})"


class KeyPaddingMask(Mask):
    """Keys whose ``keep[b, j]`` is False are never seen, wherever they sit (left padding,
    a zigzag shard of a padded sequence, ...). ``keep`` (B|1, S) bool, True = may attend.

    ``block_states`` counts kept keys per block with one prefix sum: fully padded blocks
    are skipped, unpadded ones run without a mask.
    """

    def __init__(self, keep: Tensor):
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
            raise TypeError(f"keep must be a (batch, keys) bool tensor, got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)} of shape "
                            f"{tuple(getattr(keep, 'shape', ()))}")
        self.keep = keep
        self.batch_size = keep.shape[0] if keep.shape[0] > 1 else None
        self._csum = None

    def validate(self, grid):
        if self.keep.shape[-1] != grid.k_len:
            raise ValueError(f"key padding mask covers {self.keep.shape[-1]} keys but the "
                             f"key length is {grid.k_len}")

    def mask_mod(self, grid, b, h, q, k):
        bi = b if self.keep.shape[0] > 1 else torch.zeros_like(b)
        return self.keep[bi, k]

    def tile(self, grid, r0, r1, k0, k1):
        return self.keep[:, None, None, k0:k1]

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        if self._csum is None or self._csum.device != self.keep.device:
            self._csum = torch.nn.functional.pad(self.keep.long().cumsum(-1), (1, 0))
        lo, hi = k_lo.view(-1), k_hi.view(-1)
        kept = self._csum[:, hi] - self._csum[:, lo]                     # (B, nk)
        width = (hi - lo).view(1, -1)
        st = _states(kept == width, kept == 0).view(kept.shape[0], 1, 1, -1)
        return st.expand(st.shape[0], 1, q_lo.shape[-2], st.shape[-1])

    def __repr__(self):
        return f"key_padding(<{tuple(self.keep.shape)}>)"


def _ids_tensor(name: str, ids) -> Tensor:
    t = _int_tensor(ids)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise TypeError(f"{name} must be an integer tensor (N,) or (B, N), got "
                        f"{getattr(t, 'dtype', type(ids).__name__)} of shape {tuple(t.shape)}")
    return t.long().reshape(-1, t.shape[-1]) if t.dim() == 2 else t.long().reshape(1, -1)


class DocumentMask(Mask):
    """Packed sequences: a token sees only tokens with the same document id.

    ``ids`` is (S,) or (B, S); query position p has id ``ids[..., p]``.

    With ``key_ids`` (S,) or (B, S) the queries carry ``ids`` (L,) or (B, L) row by row and
    the keys ``key_ids``: packed cross-attention, where each document has its own query and
    key lengths (FlashAttention's ``cu_seqlens_q`` / ``cu_seqlens_k``). Each document's
    queries then sit bottom-right against its own keys: a query row of document d at
    position ``i + k_end(d) - q_end(d)``, one past the last key and query of d, so that a
    causal mask or a window is aligned inside every document as in FlashAttention's varlen
    kernels. A document without keys sees nothing (with ids, its queries keep the default
    positions; :func:`packed` knows where its empty key range sits).
    """

    def __init__(self, ids, key_ids=None, positions: Tensor | None = None):
        self.ids = _ids_tensor("ids", ids)
        self.key_ids = None if key_ids is None else _ids_tensor("key_ids", key_ids)
        self._positions = positions  # given by packed(): exact even for empty documents
        sizes = [t.shape[0] if t is not None and t.shape[0] > 1 else None
                 for t in (self.ids, self.key_ids)]
        self.batch_size = _merge_dim(sizes[0], sizes[1], "batch sizes of ids and key_ids")
        self._on = {}

    def validate(self, grid):
        if self.key_ids is None:
            if self.ids.shape[-1] != grid.k_len:
                raise ValueError(f"document ids cover {self.ids.shape[-1]} positions but the "
                                 f"key length is {grid.k_len}")
            return
        if self.ids.shape[-1] != grid.q_len or self.key_ids.shape[-1] != grid.k_len:
            raise ValueError(f"document ids cover {self.ids.shape[-1]} queries and key_ids "
                             f"{self.key_ids.shape[-1]} keys, but attention has "
                             f"q_len={grid.q_len}, k_len={grid.k_len}")

    def query_positions(self, q_len, k_len):
        if self.key_ids is None or self.ids.shape[-1] != q_len or \
                self.key_ids.shape[-1] != k_len:
            return None
        if self._positions is not None:
            return self._positions
        rows = torch.arange(q_len).view(1, -1)
        B = max(self.ids.shape[0], self.key_ids.shape[0])
        q_ids = self.ids.expand(B, -1)
        k_ids = self.key_ids.expand(B, -1)
        # last row / key of each id, + 1: scatter the index of every entry, keep the max
        big = int(max(int(q_ids.max()) if q_ids.numel() else 0,
                      int(k_ids.max()) if k_ids.numel() else 0)) + 1
        low = int(min(int(q_ids.min()) if q_ids.numel() else 0,
                      int(k_ids.min()) if k_ids.numel() else 0))
        width = big - low
        q_end = torch.full((B, width), -1).scatter_reduce(
            1, q_ids - low, rows.expand(B, -1) + 1, "amax")
        k_end = torch.full((B, width), -1).scatter_reduce(
            1, k_ids - low, torch.arange(k_len).view(1, -1).expand(B, -1) + 1, "amax")
        qe, ke = q_end.gather(1, q_ids - low), k_end.gather(1, q_ids - low)
        return torch.where(ke >= 0, rows + ke - qe, rows + (k_len - q_len))

    def _ids(self, device):
        if device not in self._on:
            # one sentinel column that matches nothing, for positions before the first key
            pad = torch.full((self.ids.shape[0], 1), -(2 ** 62))
            self._on[device] = (torch.cat([self.ids, pad], 1).to(device),
                                None if self.key_ids is None else self.key_ids.to(device))
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        if self.key_ids is not None:
            raise NotImplementedError("document(ids, key_ids) gives ids to query rows, not "
                                      "positions: evaluate it with at() or tile()")
        table, _ = self._ids(grid.device)  # (Bm, S + 1); the last column matches nothing
        bi = b if table.shape[0] > 1 else torch.zeros_like(b)
        qi = torch.where((q >= 0) & (q < grid.k_len), q, grid.k_len)
        return table[bi, qi] == table[bi, k]

    def at(self, grid, b, h, i, k):
        if self.key_ids is None:
            return super().at(grid, b, h, i, k)
        q_ids, k_ids = self._ids(grid.device)
        return q_ids[_row(q_ids, b), i] == k_ids[_row(k_ids, b), k]

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        ids, _ = self._ids(grid.device)
        return _document_states(ids[:, :-1], ids[:, :-1], q_lo, q_hi, k_lo, k_hi)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        if self.key_ids is None:
            return super().block_states(grid, r_lo, r_hi, k_lo, k_hi)
        q_ids, k_ids = self._ids(grid.device)
        return _document_states(q_ids[:, :-1], k_ids, r_lo, r_hi, k_lo, k_hi)

    def __repr__(self):
        if self.key_ids is None:
            return f"document(<ids {tuple(self.ids.shape)}>)"
        return f"document(<ids {tuple(self.ids.shape)}>, <key_ids {tuple(self.key_ids.shape)}>)"


def _row(table: Tensor, b: Tensor) -> Tensor:
    return b if table.shape[0] > 1 else torch.zeros_like(b)


def _document_states(q_ids: Tensor, k_ids: Tensor, q_lo, q_hi, k_lo, k_hi) -> Tensor:
    """States of blocks of query ``[q_lo, q_hi)`` x key ``[k_lo, k_hi)`` indices into
    ``q_ids`` (Bq, n) and ``k_ids`` (Bk, S)."""
    lo_q, hi_q = _block_minmax(q_ids, q_lo.view(-1), q_hi.view(-1))
    lo_k, hi_k = _block_minmax(k_ids, k_lo.view(-1), k_hi.view(-1))
    lo_q, hi_q = lo_q[:, None, :, None], hi_q[:, None, :, None]
    lo_k, hi_k = lo_k[:, None, None, :], hi_k[:, None, None, :]
    full = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k)
    empty = (hi_q < lo_k) | (hi_k < lo_q)
    return _states(full, empty)


def _block_minmax(ids: Tensor, lo: Tensor, hi: Tensor):
    """Min and max of ids[:, lo:hi] for each block (blocks clamped to the table)."""
    n = ids.shape[-1]
    lo_c, hi_c = lo.clamp(0, n), hi.clamp(0, n)
    big = torch.iinfo(torch.long).max
    mins, maxs = [], []
    for a, c in zip(lo_c.tolist(), hi_c.tolist()):
        if c > a:
            seg = ids[:, a:c]
            mins.append(seg.amin(-1))
            maxs.append(seg.amax(-1))
        else:  # no real positions: an id range that overlaps nothing
            mins.append(torch.full((ids.shape[0],), big, device=ids.device))
            maxs.append(torch.full((ids.shape[0],), -big, device=ids.device))
    return torch.stack(mins, -1), torch.stack(maxs, -1)


# --------------------------------------------------------------------------- blocks

class BlockSparseMask(Mask):
    """A block layout: query block ``p // block_size`` sees key block ``k // block_size``
    where ``layout[qb, kb]`` (or ``layout[h, qb, kb]`` per head) is True."""

    def __init__(self, layout: Tensor, block_size: int):
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got "
                            f"{getattr(layout, 'dtype', type(layout).__name__)}")
        if layout.dim() not in (2, 3):
            raise ValueError(f"layout must be (num_q_blocks, num_k_blocks) or "
                             f"(heads, num_q_blocks, num_k_blocks), got {tuple(layout.shape)}")
        self.block_size = _check_int("block_size", block_size, 1)
        self.layout = layout if layout.dim() == 3 else layout.unsqueeze(0)
        self.num_heads = self.layout.shape[0] if layout.dim() == 3 and layout.shape[0] > 1 else None
        self._on = {}

    def validate(self, grid):
        bs = self.block_size
        nq = -(-grid.k_len // bs)
        if self.layout.shape[-1] < nq or self.layout.shape[-2] < nq:
            raise ValueError(
                f"block layout {tuple(self.layout.shape[-2:])} with block_size {bs} does not "
                f"cover {grid.k_len} positions ({nq} blocks needed)")

    def _layout(self, device):
        if device not in self._on:
            lay = self.layout.to(device)
            csum = torch.nn.functional.pad(lay.long().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
            self._on[device] = (lay, csum)
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        lay, _ = self._layout(grid.device)
        hh = h if lay.shape[0] > 1 else torch.zeros_like(h)
        qb = torch.div(q, self.block_size, rounding_mode="floor")
        inside = (qb >= 0) & (qb < lay.shape[-2])  # query positions the layout covers
        return lay[hh, qb.clamp(0, lay.shape[-2] - 1),
                   torch.div(k, self.block_size, rounding_mode="floor")] & inside

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        lay, csum = self._layout(grid.device)
        bs, rows = self.block_size, lay.shape[-2]
        qa = torch.div(q_lo, bs, rounding_mode="floor").clamp(0, rows)
        qb = (torch.div(q_hi - 1, bs, rounding_mode="floor") + 1).clamp(0, rows)
        ka = torch.div(k_lo, bs, rounding_mode="floor")
        kb = torch.div(k_hi - 1, bs, rounding_mode="floor") + 1
        c = csum.unsqueeze(0)  # (1, H, nq+1, nk+1)
        rows_q = torch.stack(torch.broadcast_tensors(qa, qb)).expand(2, qa.shape[0], ka.shape[1])
        cols_k = torch.stack(torch.broadcast_tensors(ka, kb)).expand(2, qa.shape[0], ka.shape[1])
        qa_, qb_ = rows_q[0], rows_q[1]
        ka_, kb_ = cols_k[0], cols_k[1]
        count = c[..., qb_, kb_] - c[..., qa_, kb_] - c[..., qb_, ka_] + c[..., qa_, ka_]
        area = (qb_ - qa_) * (kb_ - ka_)
        # query positions outside the layout's rows see nothing
        outside = ((q_hi <= 0) | (q_lo >= rows * bs)).expand_as(area)
        full = (count == area) & (q_lo >= 0) & (q_hi <= rows * bs) & (area > 0)
        empty = (count == 0) | outside
        return _states(full, empty)

    def __repr__(self):
        return f"block_sparse(<layout {tuple(self.layout.shape)}>, {self.block_size})"


def bigbird_layout(num_blocks: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
                   num_random_blocks: int = 3, seed: int = 0,
                   num_heads: int | None = None) -> Tensor:
    """BigBird's block layout (H|1, num_blocks, num_blocks), True = may attend.

    Each query block sees its ``num_window_blocks`` centred neighbours, the global blocks
    (first ``g // 2 + g % 2`` and last ``g // 2``, which also see everything) and
    ``num_random_blocks`` further blocks drawn without replacement from the ones it does
    not see yet, with a CPU generator seeded by ``seed``: the same pattern on any machine.
    """
    n = num_blocks
    half = num_window_blocks // 2
    idx = torch.arange(n)
    base = (idx[:, None] - idx[None, :]).abs() <= half
    g_first = num_global_blocks // 2 + num_global_blocks % 2
    g_last = num_global_blocks // 2
    is_global = (idx < g_first) | (idx >= n - g_last)
    base = base | is_global[None, :] | is_global[:, None]
    gen = torch.Generator().manual_seed(int(seed))
    layouts = []
    for _ in range(num_heads or 1):
        lay = base.clone()
        for qb in range(n):
            if is_global[qb]:
                continue
            candidates = (~lay[qb]).nonzero().flatten()
            if candidates.numel() == 0 or num_random_blocks == 0:
                continue
            pick = candidates[torch.randperm(candidates.numel(), generator=gen)[:num_random_blocks]]
            lay[qb, pick] = True
        layouts.append(lay)
    return torch.stack(layouts)


class BigBirdMask(BlockSparseMask):
    """BigBird's window + global + random block pattern, laid out for the key length."""

    def __init__(self, block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
                 num_random_blocks: int = 3, seed: int = 0, num_heads: int | None = None):
        self.block_size = _check_int("block_size", block_size, 1)
        self.num_window_blocks = _check_int("num_window_blocks", num_window_blocks, 1)
        if self.num_window_blocks % 2 == 0:
            raise ValueError(f"num_window_blocks must be odd (centred), got {num_window_blocks}")
        self.num_global_blocks = _check_int("num_global_blocks", num_global_blocks)
        self.num_random_blocks = _check_int("num_random_blocks", num_random_blocks)
        self.seed = int(seed)
        self.num_heads = None if num_heads is None else _check_int("num_heads", num_heads, 1)
        self._layouts = {}
        self._on = {}

    def _for(self, k_len: int) -> BlockSparseMask:
        n = -(-k_len // self.block_size)
        if n not in self._layouts:
            lay = bigbird_layout(n, self.num_window_blocks, self.num_global_blocks,
                                 self.num_random_blocks, self.seed, self.num_heads)
            self._layouts[n] = BlockSparseMask(lay if self.num_heads else lay[0], self.block_size)
        return self._layouts[n]

    def layout(self, k_len: int) -> Tensor:
        """The (H|1, num_blocks, num_blocks) layout used for ``k_len`` keys."""
        return self._for(k_len).layout

    def validate(self, grid):
        pass

    def mask_mod(self, grid, b, h, q, k):
        return self._for(grid.k_len).mask_mod(grid, b, h, q, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return self._for(grid.k_len).position_states(grid, q_lo, q_hi, k_lo, k_hi)

    def __repr__(self):
        return (f"bigbird({self.block_size}, {self.num_window_blocks}, {self.num_global_blocks}, "
                f"{self.num_random_blocks}, seed={self.seed}, num_heads={self.num_heads})")


# --------------------------------------------------------------------------- tensors

class TensorMask(Mask):
    """A dense bool tensor (B|1, H|1, L|1, S|1), True = may attend. Internal: the
    functional API wraps ``attn_mask`` tensors in it so every backend reads masks one way."""

    def __init__(self, mask: Tensor):
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise TypeError("TensorMask takes a 4-D bool tensor")
        self.mask = mask
        self.batch_size = mask.shape[0] if mask.shape[0] > 1 else None
        self.num_heads = mask.shape[1] if mask.shape[1] > 1 else None

    def _slice(self, r0, r1, k0, k1):
        m = self.mask
        if m.shape[2] > 1:
            m = m[:, :, r0:r1]
        if m.shape[3] > 1:
            m = m[:, :, :, k0:k1]
        return m

    # defined on query rows: these override the position-based defaults

    def tile(self, grid, r0, r1, k0, k1):
        return self._slice(r0, r1, k0, k1)

    def at(self, grid, b, h, i, k):
        m = self.mask
        bi = b if m.shape[0] > 1 else torch.zeros_like(b)
        hi = h if m.shape[1] > 1 else torch.zeros_like(h)
        qi = i if m.shape[2] > 1 else torch.zeros_like(i)
        ki = k if m.shape[3] > 1 else torch.zeros_like(k)
        return m[bi, hi, qi, ki]

    def mask_mod(self, grid, b, h, q, k):
        if not grid.affine:
            raise NotImplementedError("a tensor mask is indexed by query rows; with per-row "
                                      "positions evaluate it with at() or tile()")
        return self.at(grid, b, h, q - grid.q_offset, k)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        rows = []
        qs, qe = r_lo.view(-1).tolist(), r_hi.view(-1).tolist()
        ks, ke = k_lo.view(-1).tolist(), k_hi.view(-1).tolist()
        for a, c in zip(qs, qe):
            t = self._slice(a, c, 0, grid.k_len)
            t = t.expand(*t.shape[:2], c - a, grid.k_len)
            anys = torch.stack([t[..., x:y].any(-1).any(-1) for x, y in zip(ks, ke)], -1)
            alls = torch.stack([t[..., x:y].all(-1).all(-1) for x, y in zip(ks, ke)], -1)
            rows.append(_states(alls, ~anys))
        return torch.stack(rows, -2)

    def __repr__(self):
        return f"TensorMask({tuple(self.mask.shape)})"


# --------------------------------------------------------------------------- constructors

def causal() -> CausalMask:
    """Query at position p sees keys 0..p (bottom-right aligned when L != S)."""
    return CausalMask()


def padding(lengths, query_lengths=None) -> PaddingMask:
    """Keys at index >= ``lengths[b]`` are padding: masked for every query of batch ``b``.

    With ``query_lengths`` (ragged batches): sequence b's ``query_lengths[b]`` queries (rows
    0.., right-padded) sit bottom-right against its own ``lengths[b]`` keys, so causal
    masks, windows and position biases follow each sequence's own length."""
    return PaddingMask(lengths, query_lengths)


def sliding_window(left: int, right: int | None = None) -> SlidingWindowMask:
    """Query at position p sees keys p-left .. p+right (``right`` defaults to ``left``;
    ``right=0`` is causal local attention; transformers' ``sliding_window=W`` is
    ``sliding_window(W - 1, 0)``). A negative ``left`` or ``right`` moves that edge past
    p (one-sided windows); a window with ``left + right < 0`` sees nothing."""
    return SlidingWindowMask(left, right)


def dilated(left: int, right: int, dilation) -> DilatedMask:
    """Longformer's dilated window: keys p + t*dilation, t in [-left, right]; ``dilation``
    may be a per-head sequence."""
    return DilatedMask(left, right, dilation)


def global_tokens(indices) -> GlobalTokensMask:
    """Positions ``indices`` see every key and are seen by every query."""
    return GlobalTokensMask(indices)


def block_sparse(layout: Tensor, block_size: int) -> BlockSparseMask:
    """A (num_q_blocks, num_k_blocks) bool block layout (or (H, nq, nk) per head)."""
    return BlockSparseMask(layout, block_size)


def key_padding(key_padding_mask: Tensor) -> KeyPaddingMask:
    """Per-key padding anywhere in the sequence: ``key_padding_mask`` (B, S) bool with
    True marking padding, as ``nn.MultiheadAttention``'s argument of that name."""
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                        f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
    return KeyPaddingMask(~key_padding_mask)


def document(ids, key_ids=None) -> DocumentMask:
    """Packed sequences: a token sees only tokens with the same id (ids: (S,) or (B, S)).

    With ``key_ids`` (S,) or (B, S), the queries carry ``ids`` ((L,) or (B, L)) and the keys
    ``key_ids``: packed cross-attention, documents with different query and key lengths,
    each document's queries bottom-right against its own keys."""
    return DocumentMask(ids, key_ids)


def _cu_seqlens(name: str, cu) -> Tensor:
    t = torch.as_tensor(cu)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1 or t.numel() == 0:
        raise TypeError(f"{name} must be a 1-D integer tensor of cumulative lengths "
                        f"(0, n_1, n_1 + n_2, ...), got {cu!r}")
    t = t.long()
    if int(t[0]) != 0 or bool((t[1:] < t[:-1]).any()):
        raise ValueError(f"{name} must start at 0 and never decrease, got {t.tolist()}")
    return t


def packed(cu_seqlens_q, cu_seqlens_k=None) -> DocumentMask:
    """Documents packed back to back, as FlashAttention's varlen functions take them:
    document d holds queries ``cu_seqlens_q[d] .. cu_seqlens_q[d+1]-1`` and keys
    ``cu_seqlens_k[d] .. cu_seqlens_k[d+1]-1`` (``cu_seqlens_k=None``: the same as the
    queries, self-attention). Each document's queries sit bottom-right against its own
    keys, so ``is_causal=True`` gives FlashAttention's varlen causal mask."""
    cq = _cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    ids_q = torch.repeat_interleave(torch.arange(cq.numel() - 1), cq.diff())
    if cu_seqlens_k is None:
        return DocumentMask(ids_q)
    ck = _cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if ck.numel() != cq.numel():
        raise ValueError(f"cu_seqlens_q ({cq.numel() - 1} documents) and cu_seqlens_k "
                         f"({ck.numel() - 1} documents) must describe the same documents")
    ids_k = torch.repeat_interleave(torch.arange(ck.numel() - 1), ck.diff())
    # query i of document d at i + k_end(d) - q_end(d): its keys end where its queries end
    positions = (torch.arange(ids_q.numel()) + (ck[1:] - cq[1:])[ids_q]).view(1, -1)
    return DocumentMask(ids_q, ids_k, positions)


def bigbird(block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, seed: int = 0, num_heads: int | None = None) -> BigBirdMask:
    """BigBird's block pattern: window, global and seeded random blocks (see ``bigbird_layout``)."""
    return BigBirdMask(block_size, num_window_blocks, num_global_blocks, num_random_blocks,
                       seed, num_heads)
