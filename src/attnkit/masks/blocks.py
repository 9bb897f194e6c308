"""Block layouts: an arbitrary block-sparse layout, and BigBird's."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_int
from .base import Mask
from .grid import states_of

__all__ = ["BlockSparseMask", "BigBirdMask", "bigbird_layout"]


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
        self.block_size = check_int("block_size", block_size, 1)  # the layout's block
        self.tile_hint = self.block_size
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
        return states_of(full, empty)

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
        self.block_size = check_int("block_size", block_size, 1)
        self.tile_hint = self.block_size
        self.num_window_blocks = check_int("num_window_blocks", num_window_blocks, 1)
        if self.num_window_blocks % 2 == 0:
            raise ValueError(f"num_window_blocks must be odd (centred), got {num_window_blocks}")
        self.num_global_blocks = check_int("num_global_blocks", num_global_blocks)
        self.num_random_blocks = check_int("num_random_blocks", num_random_blocks)
        self.seed = int(seed)
        self.num_heads = None if num_heads is None else check_int("num_heads", num_heads, 1)
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
