"""Packed sequences: documents of queries and keys, by id or by cumulative lengths."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import int_tensor
from .base import Mask
from .grid import merge_dim, states_of

__all__ = ["DocumentMask"]


def _ids_tensor(name: str, ids) -> Tensor:
    t = int_tensor(ids)
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
        self.batch_size = merge_dim(sizes[0], sizes[1], "batch sizes of ids and key_ids")
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
    # a block reaching past its id table holds positions that match nothing: never FULL
    inside_q = ((q_lo.view(-1) >= 0) & (q_hi.view(-1) <= q_ids.shape[-1]))[None, None, :, None]
    inside_k = ((k_lo.view(-1) >= 0) & (k_hi.view(-1) <= k_ids.shape[-1]))[None, None, None, :]
    full = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k) & inside_q & inside_k
    empty = (hi_q < lo_k) | (hi_k < lo_q)
    return states_of(full, empty)


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
