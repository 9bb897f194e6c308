"""Masks of single tokens: global tokens, and padding (by lengths or by a keep mask)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import int_tensor
from .base import Mask
from .grid import pick, states_of

__all__ = ["GlobalTokensMask", "PaddingMask", "KeyPaddingMask"]


def _prefix_count(flags: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Number of True flags in [lo, hi) (clamped to the table), vectorised."""
    csum = torch.nn.functional.pad(flags.long().cumsum(0), (1, 0))
    n = flags.numel()
    return csum[hi.clamp(0, n)] - csum[lo.clamp(0, n)]


class GlobalTokensMask(Mask):
    """Tokens at ``indices`` see every key and are seen by every query."""

    def __init__(self, indices):
        idx = int_tensor(indices)
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
        return states_of(full, empty)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


def _lengths(name: str, lengths) -> Tensor:
    ln = int_tensor(lengths)
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
        n = pick(self._ln(grid.device), b)
        allow = k < n
        if self.query_lengths is not None:  # padding queries sit at positions >= n
            allow = allow & (q < n)
        return allow

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        n = self._ln(grid.device).view(-1, 1, 1, 1)
        full, empty = (k_hi <= n) & (q_lo == q_lo), (k_lo >= n) & (q_lo == q_lo)
        if self.query_lengths is not None:
            full, empty = full & (q_hi <= n), empty | (q_lo >= n)
        return states_of(full, empty)

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
        st = states_of(kept == width, kept == 0).view(kept.shape[0], 1, 1, -1)
        return st.expand(st.shape[0], 1, q_lo.shape[-2], st.shape[-1])

    def __repr__(self):
        return f"key_padding(<{tuple(self.keep.shape)}>)"
