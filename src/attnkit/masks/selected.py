"""Data-dependent masks: each query row (or block of rows) attends to the keys it chose.

DeepSeek Sparse Attention's lightning indexer picks the top-k keys of every query token;
Native Sparse Attention picks the top-n key *blocks* of every query block. Either way the
pattern is a table of indices, not a rule on positions, so this mask is defined on query
rows (as a dense tensor mask is) and evaluated from the table block by block: it never
materialises the (L, S) picture unless asked to draw it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Mask
from .grid import states_of

__all__ = ["SelectedMask"]


class SelectedMask(Mask):
    """Query row i of batch b, head h sees the keys listed in ``indices[b, h, i]``.

    ``indices`` (B|1, H|1, L, k) integer: token level (DSA), each row's k key indices.
    With ``block_size`` it is block level (NSA): ``indices`` (B|1, H|1, ceil(L / bs), n)
    lists, for each block of ``block_size`` query rows, the key blocks (of the same size)
    its rows see. Entries < 0 are unused slots (fewer than k chosen). Combine with
    ``&`` (``causal() & selected(...)``) to keep the choice causal.
    """

    def __init__(self, indices: Tensor, block_size: int | None = None):
        if not isinstance(indices, Tensor) or indices.is_floating_point() or \
                indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.dim() != 4:
            raise ValueError(f"indices must be (B|1, H|1, rows, k), got {tuple(indices.shape)}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(
                block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        # sorted, each key at most once per row (a repeated choice is one choice)
        idx = indices.long().sort(-1).values
        if idx.shape[-1] > 1:
            idx[..., 1:] = idx[..., 1:].masked_fill(idx[..., 1:] == idx[..., :-1], -1)
        self.indices = idx
        self.block_size = block_size
        self.tile_hint = block_size
        self.batch_size = indices.shape[0] if indices.shape[0] > 1 else None
        self.num_heads = indices.shape[1] if indices.shape[1] > 1 else None

    @property
    def per_token(self) -> bool:
        return self.block_size is None

    def validate(self, grid):
        if self.indices.device != torch.device(grid.device):
            raise ValueError(f"indices on {self.indices.device} cannot select keys of a call "
                             f"on {grid.device}")
        bs = self.block_size or 1
        rows = -(-grid.q_len // bs)
        if self.indices.shape[2] != rows:
            what = "query rows" if self.per_token else f"query blocks of {bs}"
            raise ValueError(f"indices {tuple(self.indices.shape)} must have one entry per "
                             f"{what}: {rows} for L = {grid.q_len}")
        top = -(-grid.k_len // bs)
        if self.indices.numel() and int(self.indices.max()) >= top:
            raise ValueError(f"indices must be < {top} (the call's {grid.k_len} keys"
                             f"{'' if self.per_token else f' in blocks of {bs}'}), got "
                             f"{int(self.indices.max())}")

    def _rows(self, r0: int, r1: int) -> Tensor:
        """(B|1, H|1, r1 - r0, k) selected key indices (token level) of rows r0..r1-1."""
        if self.per_token:
            return self.indices[:, :, r0:r1]
        bs = self.block_size
        blocks = self.indices[:, :, torch.arange(r0, r1, device=self.indices.device) // bs]
        keys = blocks.unsqueeze(-1) * bs + torch.arange(bs, device=blocks.device)
        keys = torch.where(blocks.unsqueeze(-1) < 0, -1, keys)
        return keys.flatten(-2)

    # defined on query rows: these override the position-based defaults

    def tile(self, grid, r0, r1, k0, k1):
        idx = self._rows(r0, r1)
        width = k1 - k0
        local = idx - k0
        local = torch.where((local >= 0) & (local < width), local, width)  # spare column
        out = torch.zeros(*idx.shape[:3], width + 1, dtype=torch.bool, device=idx.device)
        return out.scatter_(-1, local, True)[..., :width]

    def at(self, grid, b, h, i, k):
        idx = self.indices
        bi = b if idx.shape[0] > 1 else torch.zeros_like(b)
        hi = h if idx.shape[1] > 1 else torch.zeros_like(h)
        if self.per_token:
            return (idx[bi, hi, i] == k.unsqueeze(-1)).any(-1)
        bs = self.block_size
        return (idx[bi, hi, torch.div(i, bs, rounding_mode="floor")]
                == torch.div(k, bs, rounding_mode="floor").unsqueeze(-1)).any(-1)

    def mask_mod(self, grid, b, h, q, k):
        if not grid.affine:
            raise NotImplementedError("a selection is indexed by query rows; with per-row "
                                      "positions evaluate it with at() or tile()")
        return self.at(grid, b, h, q - grid.q_offset, k)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        """Count each row's selected keys per key block: EMPTY where no row of the row
        block chose any, FULL where every row chose every key of the block."""
        ks, ke = k_lo.view(-1), k_hi.view(-1)
        rows = []
        for a, c in zip(r_lo.view(-1).tolist(), r_hi.view(-1).tolist()):
            idx = self._rows(a, c)
            bucket = torch.searchsorted(ke.to(idx.device), idx.contiguous(), right=True)
            ok = (idx >= 0) & (bucket < ks.numel())
            ok = ok & (idx >= ks.to(idx.device)[bucket.clamp(max=ks.numel() - 1)])
            bucket = torch.where(ok, bucket, ks.numel())
            counts = torch.zeros(*idx.shape[:3], ks.numel() + 1, dtype=torch.long,
                                 device=idx.device)
            counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
            counts = counts[..., :-1]
            width = (ke - ks).to(idx.device)
            rows.append(states_of((counts >= width).all(-2), (counts == 0).all(-2)))
        return torch.stack(rows, -2)

    def __repr__(self):
        level = "" if self.per_token else f", block_size={self.block_size}"
        return f"selected(<indices {tuple(self.indices.shape)}>{level})"
