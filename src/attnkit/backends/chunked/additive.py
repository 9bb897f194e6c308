"""The additive tile of a segment: the float term added to its scores (the mask as -inf,
plus the bias), with one owner for the caches that reuse equal tiles.

When the mask and the bias are both *translation invariant* (what position p sees and
adds depends only on k - p: causal, windows, ALiBi, T5) and every query row has the same
offset, tiles of the same geometry are equal: :class:`AdditiveTiles` builds them once,
as views into one Toeplitz "master" tile, or from a small cache. Otherwise every tile is
built from the mask and bias objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...bias import Bias
from ...masks import Grid, Mask
from .plan import Tile

__all__ = ["AdditiveTiles", "NEG_INF"]

NEG_INF = float("-inf")

#: largest master tile (elements) built for a translation-invariant mask and bias
MASTER_ELEMENTS = 1 << 25
#: bounds of the per-call cache of tiles of translation-invariant masks and biases
TILE_CACHE_ENTRIES = 16
TILE_CACHE_ELEMENTS = 1 << 20


class AdditiveTiles:
    """The additive tiles of one call (``grid``, its ``tiles``, ``mask``, ``bias``).

    ``translation_invariant`` says whether equal geometries give equal tiles; only then
    are tiles reused (``masters``: per dtype, one tile holding every offset; ``cache``:
    tiles by geometry). :meth:`release` drops both (they are not held until backward).
    """

    def __init__(self, grid: Grid, tiles: list, mask: Mask | None, bias: Bias | None):
        self.grid, self.tiles, self.mask, self.bias = grid, tiles, mask, bias
        self.translation_invariant = bool(
            (mask is not None or bias is not None) and grid.affine
            and (mask is None or mask.translation_invariant)
            and (bias is None or bias.translation_invariant))
        self.masters: dict = {}
        self.cache: dict = {}

    def release(self) -> None:
        self.masters.clear()
        self.cache.clear()

    # ---- what the kernels ask

    def get(self, tile: Tile, seg, params, dtype) -> tuple[Tensor | None, Tensor | None]:
        """(add, alive): the float term added to this segment's scores (None: nothing to
        add), and the rows that can see at least one key of it (None: every row can)."""
        offset = seg.offset(tile) if self.translation_invariant else None
        if offset is None:
            return self.build(tile, seg, params, dtype)
        view = self._master_view(tile, seg, params, dtype)
        if view is not None:
            return view
        key = (offset, tile.r1 - tile.r0, seg.width, dtype, seg.masked)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        add, alive = self.build(tile, seg, params, dtype)
        if len(self.cache) < TILE_CACHE_ENTRIES and (
                add is None or add.numel() <= TILE_CACHE_ELEMENTS):
            self.cache[key] = (add, alive)
        return add, alive

    def signature(self, tile: Tile, seg):
        """Hashable and equal for two (tile, segment) pairs only when their additive tiles
        are equal; None when that is not known."""
        offset = seg.offset(tile)
        if offset is None:
            return None
        nq = tile.r1 - tile.r0
        if self.bias is not None:
            if not self.translation_invariant:
                return None
            return ("offset", offset, nq, seg.width, seg.masked)
        if not seg.masked or self.mask is None:
            return ("open", nq, seg.width)
        sig = self.mask.tile_signature(self.grid, tile.r0, tile.r1, seg.k0, seg.k1)
        return None if sig is None else ("mask", sig)

    def bias_values(self, tile: Tile, seg, params) -> Tensor:
        """Float (B|1, H|1, nq, nk): the bias of the segment's scores, as a function of
        ``params`` (autograd reaches the bias parameters through it)."""
        return seg.bias(self.bias, self.grid, tile, params)

    # ---- building

    def build(self, tile: Tile, seg, params, dtype):
        """The additive tile from the mask and bias objects (no reuse)."""
        add, alive = None, None
        nq, nk = tile.r1 - tile.r0, seg.width
        if (seg.masked and self.mask is not None) or seg.has_empty_slots:
            allow = seg.allowed(self.mask, self.grid, tile)
            allow = allow.expand(*allow.shape[:2], nq, nk)
            alive = None if seg.covered else allow.any(-1)
            add = torch.where(allow, torch.zeros((), dtype=dtype, device=allow.device),
                              torch.full((), NEG_INF, dtype=dtype, device=allow.device))
        if self.bias is not None:
            b = self.bias_values(tile, seg, params).to(dtype)
            add = b if add is None else add + b
            if self.bias.may_mask:
                add = add.expand(*add.shape[:2], nq, nk)
                alive = (add > NEG_INF).any(-1)
        if add is not None:
            add = add.expand(*add.shape[:2], nq, nk)
        if alive is not None and bool(alive.all()):
            alive = None  # every row sees a key: no lse fix needed
        return add, alive

    def _master(self, params, dtype):
        """One (H|1, block_q, L + S + 1) tile holding every offset, ``M[h, i, t] =
        additive(p = i, k = t - S)``. The tile of query positions p0.. and keys k0..k1 is
        the view ``M[:, :nq, k0 - p0 + S : k1 - p0 + S]``: no per-tile construction, and
        memory linear in L + S. None when it would be large."""
        if dtype in self.masters:
            return self.masters[dtype]
        grid, objs = self.grid, [o for o in (self.mask, self.bias) if o is not None]
        rows = max(t.r1 - t.r0 for t in self.tiles)
        c = grid.k_len
        width = grid.k_len + grid.q_len + 1
        heads = max((o.num_heads or 1) for o in objs)
        batch = max((o.batch_size or 1) for o in objs)
        if batch * heads * rows * width > MASTER_ELEMENTS:
            self.masters[dtype] = None
            return None
        allow = add = None
        r0 = -grid.q_offset  # the row at position 0
        if self.mask is not None:
            allow = self.mask.tile(grid, r0, r0 + rows, -c, width - c)
            allow = allow.expand(*allow.shape[:2], rows, width).contiguous()
        if self.bias is not None:
            add = self.bias.tile(grid, r0, r0 + rows, -c, width - c, params).to(dtype)
        if allow is not None:
            zero = torch.zeros((), dtype=dtype, device=allow.device)
            inf = torch.full((), NEG_INF, dtype=dtype, device=allow.device)
            add = torch.where(allow, add if add is not None else zero, inf)
        add = add.expand(*add.shape[:2], rows, width).contiguous()
        self.masters[dtype] = (allow, add, c)
        return self.masters[dtype]

    def _master_view(self, tile: Tile, seg, params, dtype):
        m = self._master(params, dtype)
        if m is None:
            return None
        allow, add, c = m
        nq = tile.r1 - tile.r0
        a, b = seg.k0 - tile.p0 + c, seg.k1 - tile.p0 + c
        alive = None
        if seg.masked and allow is not None and not seg.covered:
            alive = allow[:, :, :nq, a:b].any(-1)
            if bool(alive.all()):
                alive = None
        if not seg.masked and self.bias is None:
            return None, None
        return add[:, :, :nq, a:b], alive
