"""Mask objects: which keys each query may see.

Every mask speaks in *positions*. Key ``j`` sits at position ``j``; query row ``i``
sits at position ``p = i + (S - L)`` (bottom-right alignment, what KV-cache decoding
needs). A mask answers three questions, from cheap to exact:

* ``block_states(grid, q_lo, q_hi, k_lo, k_hi)``: for every rectangle of query
  positions ``[q_lo, q_hi)`` x keys ``[k_lo, k_hi)``, is it ``EMPTY`` (no entry
  allowed), ``FULL`` (every entry allowed) or ``PARTIAL``? The chunked engine skips
  empty tiles and runs full tiles without a mask, so cost follows what the mask allows.
* ``tile(grid, q0, q1, k0, k1)``: the exact bool block ``(B|1, H|1, q1-q0, k1-k0)``.
* ``mask_mod(grid, b, h, q, k)``: the elementwise rule on broadcasting index tensors,
  FlexAttention's ``mask_mod`` with the grid bound in.

``True`` means "may attend", as in ``torch.nn.functional.scaled_dot_product_attention``.
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
    "block_sparse", "document", "bigbird", "KeyPaddingMask",
    "CausalMask", "PaddingMask", "SlidingWindowMask", "DilatedMask", "GlobalTokensMask",
    "BlockSparseMask", "BigBirdMask", "DocumentMask", "TensorMask", "AndMask", "OrMask",
    "bigbird_layout",
]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Grid:
    """The shape of one attention call as masks and biases see it.

    ``q_len`` query rows, ``k_len`` keys; query row ``i`` sits at position
    ``i + offset`` with ``offset = k_len - q_len`` unless given explicitly.
    """

    q_len: int
    k_len: int
    device: torch.device = torch.device("cpu")
    offset: int | None = None

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len if self.offset is None else self.offset

    def positions(self, q0: int, q1: int) -> Tensor:
        return torch.arange(q0, q1, device=self.device)

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
    ``block_states``; the default says every block is PARTIAL (correct, no skipping)."""

    #: batch size of a mask that differs per batch element (None: the same for all)
    batch_size: int | None = None
    #: number of heads of a mask that differs per head (None: the same for all)
    num_heads: int | None = None
    #: a natural block size the engine may align its tiles to
    block_size: int | None = None
    #: True when what a query sees depends only on the offset k - p (and the head):
    #: tiles of the same geometry are then equal and the engine reuses them
    relative: bool = False

    def mask_mod(self, grid: Grid, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        raise NotImplementedError

    def tile_signature(self, grid: Grid, q0: int, q1: int, k0: int, k1: int):
        """A hashable value that two blocks share only when their :meth:`tile` is equal,
        or None (no promise). A translation-invariant mask's block depends only on the
        offset ``k0 - q0`` and its size; the engine runs blocks with equal signatures as
        one batched kernel call."""
        if self.relative:
            return ("relative", k0 - q0, q1 - q0, k1 - k0)
        return None

    def tile(self, grid: Grid, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """Exact bool block for query positions ``q0..q1-1`` and keys ``k0..k1-1``."""
        b = _batch_index(self.batch_size, grid.device)
        h = _head_index(self.num_heads, grid.device)
        q = grid.positions(q0, q1).view(1, 1, -1, 1)
        k = grid.keys(k0, k1).view(1, 1, 1, -1)
        return _as_4d(self.mask_mod(grid, b, h, q, k))

    def block_states(self, grid: Grid, q_lo: Tensor, q_hi: Tensor, k_lo: Tensor,
                     k_hi: Tensor) -> Tensor:
        """EMPTY/PARTIAL/FULL per block; ``q_lo`` etc. are (nq, 1) and (1, nk) tensors."""
        return torch.full(torch.broadcast_shapes(q_lo.shape, k_lo.shape), PARTIAL,
                          dtype=torch.int8, device=q_lo.device)

    def validate(self, grid: Grid) -> None:
        """Raise ValueError when the mask cannot describe this grid."""

    def materialize(self, q_len: int, k_len: int | None = None, device=None) -> Tensor:
        """Dense bool mask: (L, S), or (B|1, H|1, L, S) when it depends on batch/head."""
        k_len = q_len if k_len is None else k_len
        grid = Grid(int(q_len), int(k_len), torch.device(device or "cpu"))
        self.validate(grid)
        off = grid.q_offset
        dense = self.tile(grid, off, off + q_len, 0, k_len)
        dense = dense.expand(*dense.shape[:2], q_len, k_len)
        if self.batch_size is None and self.num_heads is None:
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

    def __repr__(self):
        return f"({self.a!r} {self.symbol} {self.b!r})"


class AndMask(_Combined):
    """Both masks allow the key."""
    symbol = "&"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) & self.b.mask_mod(grid, b, h, q, k)

    def tile(self, grid, q0, q1, k0, k1):
        return self.a.tile(grid, q0, q1, k0, k1) & self.b.tile(grid, q0, q1, k0, k1)

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        sa = self.a.block_states(grid, q_lo, q_hi, k_lo, k_hi)
        sb = self.b.block_states(grid, q_lo, q_hi, k_lo, k_hi)
        return torch.minimum(_as_4d(sa), _as_4d(sb))


class OrMask(_Combined):
    """Either mask allows the key."""
    symbol = "|"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) | self.b.mask_mod(grid, b, h, q, k)

    def tile(self, grid, q0, q1, k0, k1):
        return self.a.tile(grid, q0, q1, k0, k1) | self.b.tile(grid, q0, q1, k0, k1)

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        sa = self.a.block_states(grid, q_lo, q_hi, k_lo, k_hi)
        sb = self.b.block_states(grid, q_lo, q_hi, k_lo, k_hi)
        return torch.maximum(_as_4d(sa), _as_4d(sb))


# --------------------------------------------------------------------------- windows

def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class CausalMask(Mask):
    """Query at position p sees keys 0..p."""
    relative = True

    def mask_mod(self, grid, b, h, q, k):
        return k <= q

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
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
    """Query at position p sees keys p - left .. p + right."""
    relative = True

    def __init__(self, left: int, right: int | None = None):
        self.left = _check_int("left (window)", left)
        self.right = self.left if right is None else _check_int("right (window)", right)
        self.block_size = _window_block(self.left + self.right + 1)

    def mask_mod(self, grid, b, h, q, k):
        return (k >= q - self.left) & (k <= q + self.right)

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
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

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
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
        idx = torch.as_tensor(indices)
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

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        t = self._table(grid)[:-1]
        nq = _prefix_count(t, q_lo, q_hi)
        nk = _prefix_count(t, k_lo, k_hi)
        full = (nq == (q_hi - q_lo)) | (nk == (k_hi - k_lo))
        empty = (nq == 0) & (nk == 0)
        return _states(full, empty)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


class PaddingMask(Mask):
    """Keys at index >= lengths[b] are padding and are never seen."""

    def __init__(self, lengths):
        ln = torch.as_tensor(lengths)
        if ln.is_floating_point() or ln.dtype == torch.bool or ln.dim() > 1:
            raise TypeError(f"lengths must be a 1-D sequence of ints (one per batch element), "
                            f"got {lengths!r}")
        ln = ln.reshape(-1).long()
        if ln.numel() == 0 or (ln < 0).any():
            raise ValueError(f"lengths must be non-empty and >= 0, got {ln.tolist()}")
        self.lengths = ln
        self.batch_size = ln.numel()
        self._on = {}

    def _ln(self, device):
        if device not in self._on:
            self._on[device] = self.lengths.to(device)
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        return k < _pick(self._ln(grid.device), b)

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        n = self._ln(grid.device).view(-1, 1, 1, 1)
        return _states((k_hi <= n) & (q_lo == q_lo), (k_lo >= n) & (q_lo == q_lo))

    def __repr__(self):
        return f"padding({self.lengths.tolist()})"


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

    def tile(self, grid, q0, q1, k0, k1):
        return self.keep[:, None, None, k0:k1]

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        if self._csum is None or self._csum.device != self.keep.device:
            self._csum = torch.nn.functional.pad(self.keep.long().cumsum(-1), (1, 0))
        lo, hi = k_lo.view(-1), k_hi.view(-1)
        kept = self._csum[:, hi] - self._csum[:, lo]                     # (B, nk)
        width = (hi - lo).view(1, -1)
        st = _states(kept == width, kept == 0).view(kept.shape[0], 1, 1, -1)
        return st.expand(st.shape[0], 1, q_lo.shape[0], st.shape[-1])

    def __repr__(self):
        return f"key_padding(<{tuple(self.keep.shape)}>)"


class DocumentMask(Mask):
    """Packed sequences: a token sees only tokens with the same document id.

    ``ids`` is (S,) or (B, S); query position p has id ``ids[..., p]``.
    """

    def __init__(self, ids):
        t = torch.as_tensor(ids)
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() not in (1, 2):
            raise TypeError(f"ids must be an integer tensor (S,) or (B, S), got "
                            f"{type(ids).__name__} of shape {tuple(t.shape)}")
        self.ids = t.long().view(-1, t.shape[-1])
        self.batch_size = self.ids.shape[0] if t.dim() == 2 else None
        self._on = {}

    def validate(self, grid):
        if self.ids.shape[-1] != grid.k_len:
            raise ValueError(f"document ids cover {self.ids.shape[-1]} positions but the key "
                             f"length is {grid.k_len}")

    def _ids(self, device):
        if device not in self._on:
            # one sentinel column that matches nothing, for positions before the first key
            pad = torch.full((self.ids.shape[0], 1), -(2 ** 62))
            self._on[device] = torch.cat([self.ids, pad], 1).to(device)
        return self._on[device]

    def mask_mod(self, grid, b, h, q, k):
        table = self._ids(grid.device)  # (Bm, S + 1); the last column matches nothing
        bi = b if table.shape[0] > 1 else torch.zeros_like(b)
        qi = torch.where((q >= 0) & (q < grid.k_len), q, grid.k_len)
        return table[bi, qi] == table[bi, k]

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        ids = self._ids(grid.device)[:, :-1]
        lo_q, hi_q = _block_minmax(ids, q_lo.view(-1), q_hi.view(-1))
        lo_k, hi_k = _block_minmax(ids, k_lo.view(-1), k_hi.view(-1))
        lo_q, hi_q = lo_q[:, None, :, None], hi_q[:, None, :, None]
        lo_k, hi_k = lo_k[:, None, None, :], hi_k[:, None, None, :]
        full = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k)
        empty = (hi_q < lo_k) | (hi_k < lo_q)
        return _states(full, empty)

    def __repr__(self):
        return f"document(<ids {tuple(self.ids.shape)}>)"


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
        inside = qb >= 0
        return lay[hh, qb.clamp(min=0), torch.div(k, self.block_size, rounding_mode="floor")] & inside

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        lay, csum = self._layout(grid.device)
        bs = self.block_size
        qa = torch.div(q_lo, bs, rounding_mode="floor").clamp(min=0)
        qb = torch.div(q_hi - 1, bs, rounding_mode="floor") + 1
        ka = torch.div(k_lo, bs, rounding_mode="floor")
        kb = torch.div(k_hi - 1, bs, rounding_mode="floor") + 1
        c = csum.unsqueeze(0)  # (1, H, nq+1, nk+1)
        rows_q = torch.stack(torch.broadcast_tensors(qa, qb)).expand(2, qa.shape[0], ka.shape[1])
        cols_k = torch.stack(torch.broadcast_tensors(ka, kb)).expand(2, qa.shape[0], ka.shape[1])
        qa_, qb_ = rows_q[0], rows_q[1]
        ka_, kb_ = cols_k[0], cols_k[1]
        count = c[..., qb_, kb_] - c[..., qa_, kb_] - c[..., qb_, ka_] + c[..., qa_, ka_]
        area = (qb_ - qa_) * (kb_ - ka_)
        before_start = (q_hi <= 0).expand_as(area)  # query rows at negative positions
        full = (count == area) & (q_lo >= 0)
        empty = (count == 0) | before_start
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

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return self._for(grid.k_len).block_states(grid, q_lo, q_hi, k_lo, k_hi)

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

    def _slice(self, grid, q0, q1, k0, k1):
        m = self.mask
        off = grid.q_offset
        if m.shape[2] > 1:
            m = m[:, :, q0 - off:q1 - off]
        if m.shape[3] > 1:
            m = m[:, :, :, k0:k1]
        return m

    def tile(self, grid, q0, q1, k0, k1):
        return self._slice(grid, q0, q1, k0, k1)

    def mask_mod(self, grid, b, h, q, k):
        m = self.mask
        bi = b if m.shape[0] > 1 else torch.zeros_like(b)
        hi = h if m.shape[1] > 1 else torch.zeros_like(h)
        qi = q - grid.q_offset if m.shape[2] > 1 else torch.zeros_like(q)
        ki = k if m.shape[3] > 1 else torch.zeros_like(k)
        return m[bi, hi, qi, ki]

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        rows = []
        qs, qe = q_lo.view(-1).tolist(), q_hi.view(-1).tolist()
        ks, ke = k_lo.view(-1).tolist(), k_hi.view(-1).tolist()
        for a, c in zip(qs, qe):
            t = self._slice(grid, a, c, 0, grid.k_len)
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


def padding(lengths) -> PaddingMask:
    """Keys at index >= ``lengths[b]`` are padding: masked for every query of batch ``b``."""
    return PaddingMask(lengths)


def sliding_window(left: int, right: int | None = None) -> SlidingWindowMask:
    """Query at position p sees keys p-left .. p+right (``right`` defaults to ``left``;
    ``right=0`` is causal local attention; transformers' ``sliding_window=W`` is
    ``sliding_window(W - 1, 0)``)."""
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


def document(ids) -> DocumentMask:
    """Packed sequences: a token sees only tokens with the same id (ids: (S,) or (B, S))."""
    return DocumentMask(ids)


def bigbird(block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, seed: int = 0, num_heads: int | None = None) -> BigBirdMask:
    """BigBird's block pattern: window, global and seeded random blocks (see ``bigbird_layout``)."""
    return BigBirdMask(block_size, num_window_blocks, num_global_blocks, num_random_blocks,
                       seed, num_heads)
