"""A dense bool tensor as a mask, indexed by query row."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Mask
from .grid import states_of

__all__ = ["TensorMask"]


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

    def validate(self, grid):
        if self.mask.device != torch.device(grid.device):
            raise ValueError(f"a bool tensor mask on {self.mask.device} cannot mask a call "
                             f"on {grid.device}")
        L, S = self.mask.shape[2:]
        if L not in (1, grid.q_len) or S not in (1, grid.k_len):
            raise ValueError(f"a bool tensor mask of shape {tuple(self.mask.shape)} does not "
                             f"broadcast to the call's (L, S) = ({grid.q_len}, {grid.k_len})")

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
            rows.append(states_of(alls, ~anys))
        return torch.stack(rows, -2)

    def __repr__(self):
        return f"TensorMask({tuple(self.mask.shape)})"
