"""The additive tile of a segment: the float term added to its scores (the mask as -inf,
plus the bias), with one owner for the caches that reuse equal tiles.

When the mask and the bias are both *translation invariant* (what position p sees and
adds depends only on k - p: causal, windows, ALiBi, T5) and every query row has the same
offset, the term is one vector over the offsets k - p per head: the fused kernel reads a
tile of it as a strided (Hankel) view, the eager kernel gets it copied out once per
geometry into a small cache. Otherwise every tile is built from the mask and bias
objects.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...bias import Bias
from ...masks import Grid, Mask
from ...masks.grid import as_4d
from .plan import Tile

__all__ = ["AdditiveTiles", "FusedAdd", "NEG_INF", "PLAIN", "REVERSED", "CAUSAL"]

NEG_INF = float("-inf")

#: how the fused kernel takes a segment's additive term (:meth:`AdditiveTiles.fused`): as
#: a tile (or nothing), as a Hankel view over the query rows reversed, or as the
#: kernel's own causal flag
PLAIN, REVERSED, CAUSAL = "plain", "reversed", "causal"

#: bounds of the per-call cache of tiles of translation-invariant masks and biases
TILE_CACHE_ENTRIES = 16
TILE_CACHE_ELEMENTS = 1 << 20


class FusedAdd(NamedTuple):
    """What the fused kernel adds to a segment's scores (:meth:`AdditiveTiles.fused`):
    ``add`` (None: nothing), the rows that see a key (``alive``, None: all), ``how`` it
    takes ``add`` (PLAIN, REVERSED, CAUSAL), and ``row_shift`` (B|1, H|1, nq), the part of
    the term constant along each row that ``add`` leaves out, to add to the kernel's
    log-sum-exp (None: none)."""
    add: Tensor | None
    alive: Tensor | None
    how: str
    row_shift: Tensor | None = None


class AdditiveTiles:
    """The additive tiles of one call (``grid``, its ``tiles``, ``mask``, ``bias``).

    ``translation_invariant`` says whether equal geometries give equal tiles; only then
    are tiles reused (``diagonals``: per dtype, the term at every offset; ``cache``:
    tiles by geometry; :meth:`release` drops both: they are not held until backward).
    ``separable``: a causal diagonal tile whose bias is affine in k - p may run as a
    per-key bias plus a per-row shift (exact up to the float32 rounding of terms as
    large as the tile's offsets: for half precision inputs). ``causal_flag``: such tiles
    may run on the kernel's causal flag at all (False for a scale <= 0: torch's kernel
    masks before it scales, and its causal rows come out NaN).
    """

    def __init__(self, grid: Grid, tiles: list, mask: Mask | None, bias: Bias | None,
                 separable: bool = False, causal_flag: bool = True):
        self.grid, self.tiles, self.mask, self.bias = grid, tiles, mask, bias
        self.separable, self.causal_flag = separable, causal_flag
        self.translation_invariant = bool(
            (mask is not None or bias is not None) and grid.affine
            and (mask is None or mask.translation_invariant)
            and (bias is None or bias.translation_invariant))
        self.cache: dict = {}
        self.diagonals: dict = {}

    def release(self) -> None:
        self.cache.clear()
        self.diagonals.clear()

    # ---- what the kernels ask

    def get(self, tile: Tile, seg, params, dtype) -> tuple[Tensor | None, Tensor | None]:
        """(add, alive): the float term added to this segment's scores (None: nothing to
        add), and the rows that can see at least one key of it (None: every row can).
        Translation-invariant terms are read off the vector of offsets (:meth:`_diagonal`)
        and kept in a small cache by geometry."""
        offset = seg.offset(tile) if self.translation_invariant else None
        if offset is None:
            return self.build(tile, seg, params, dtype)
        if not seg.masked and self.bias is None:
            return None, None
        key = (offset, tile.r1 - tile.r0, seg.width, dtype, seg.masked)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        add = self._hankel(tile, seg, params, dtype).flip(-2)
        alive = None
        if seg.masked and not seg.covered:
            alive = (add > NEG_INF).any(-1)
            alive = None if bool(alive.all()) else alive
        if len(self.cache) < TILE_CACHE_ENTRIES and add.numel() <= TILE_CACHE_ELEMENTS:
            self.cache[key] = (add, alive)
        return add, alive

    def fused(self, tile: Tile, seg, params, dtype):
        """:class:`FusedAdd` for the fused kernel (``how``: PLAIN, REVERSED or CAUSAL). A
        translation-invariant term f(k - p) is a Toeplitz tile; over the tile's query
        rows in *reverse* order it is a Hankel tile, ``H[i', j] = f(k0 - (p1 - 1) + i' +
        j)``, a strided view (strides 1, 1) of one vector of offsets per head: nq + nk - 1
        numbers that stay
        in cache, instead of an (nq, nk) tile read from memory (the kernel reads masks
        through their strides). REVERSED: the caller runs the kernel on the query rows
        reversed and reverses its results back; ``alive`` is in the rows' own order.
        CAUSAL: the square tile on the diagonal of a causal pattern, no add (or a
        per-key one, see :meth:`_causal_split`). Tiles small enough to stay in cache go
        PLAIN, copied out once per geometry."""
        offset = seg.offset(tile) if self.translation_invariant else None
        if offset is None or not (seg.masked or self.bias is not None):
            return FusedAdd(*self.get(tile, seg, params, dtype), PLAIN)
        nq, nk = tile.r1 - tile.r0, seg.width
        if offset == 0 and nq == nk and self.causal_flag:
            diag, c = self._diagonal(params, dtype)
            split = self._causal_split(diag, seg.k0 - (tile.p1 - 1) + c, nq)
            if split is not None:
                return FusedAdd(split[0], None, CAUSAL, split[1])
        add = self._hankel(tile, seg, params, dtype)
        if add.shape[0] * add.shape[1] * nq * nk <= TILE_CACHE_ELEMENTS:
            # a small tile is copied out once per geometry and stays in cache: no
            # reversed rows (a narrow band's runs of equal tiles share it)
            return FusedAdd(*self.get(tile, seg, params, dtype), PLAIN)
        alive = None
        if seg.masked and not seg.covered:
            key = ("alive", offset, nq, nk)
            if key not in self.cache:
                rows = (add > NEG_INF).any(-1).flip(-1)
                self.cache[key] = None if bool(rows.all()) else rows
            alive = self.cache[key]
        return FusedAdd(add, alive, REVERSED)

    def _hankel(self, tile: Tile, seg, params, dtype) -> Tensor:
        """The segment's translation-invariant term over the tile's query rows in reverse
        order, ``H[b, h, i', j] = f(k0 + j - (p1 - 1 - i'))``: a view of :meth:`_diagonal`
        with strides (1, 1), (B|1, H|1, nq, nk)."""
        diag, c = self._diagonal(params, dtype)
        a = seg.k0 - (tile.p1 - 1) + c
        return diag.as_strided((*diag.shape[:2], tile.r1 - tile.r0, seg.width),
                               (diag.stride(0), diag.stride(1), 1, 1), diag.storage_offset() + a)

    def _causal_split(self, diag: Tensor, a: int, n: int):
        """For the square tile of offsets -(n-1)..n-1 (``diag[..., a:a + 2n - 1]``): when it
        is -inf after offset 0 (the kernel's own top-left causal pattern, computed
        without the upper triangle) and, up to offset 0, zero or (``separable``) affine
        in the offset, ``f(k - p) = u[k] + c[p]`` (ALiBi): ``(u, c)``, the per-key part
        (B|1, H|1, 1, n) added by the kernel and the per-row part (B|1, H|1, n) added to
        its log-sum-exp (None, None without a bias); else None. Checked on 2n - 1
        numbers, once per offset."""
        key = ("causal", a, n)
        if key in self.cache:
            return self.cache[key]
        d = diag[..., a:a + 2 * n - 1]
        lower, upper = d[..., :n], d[..., n:]
        split = None
        if bool((upper == NEG_INF).all()) and bool(torch.isfinite(lower).all()):
            if bool((lower == 0).all()):
                split = (None, None)
            elif self.separable:
                step = lower[..., 1:] - lower[..., :-1]
                tol = 16 * torch.finfo(lower.dtype).eps * float(lower.abs().max())
                if bool(((step - step[..., :1]).abs() <= tol).all()):
                    # f(j - i) = f(j - (n-1)) + f(0) - f(i - (n-1)): u[j] = lower[j],
                    # c[i] = f(0) - lower[i]
                    split = (lower.unsqueeze(-2), lower[..., -1:] - lower)
        self.cache[key] = split
        return split

    def _diagonal(self, params, dtype):
        """``(D, c)``: the additive term at position 0 for every offset, ``D[b, h, t] =
        additive(p = 0, k = t - c)`` with t in [0, L + S + 1), c = S (B|1, H|1, L + S + 1)."""
        if dtype not in self.diagonals:
            grid = self.grid
            c = grid.k_len
            width = grid.k_len + grid.q_len + 1
            r0 = -grid.q_offset  # the row at position 0
            add = None
            if self.bias is not None:
                add = self.bias.tile(grid, r0, r0 + 1, -c, width - c, params).to(dtype)
            if self.mask is not None:
                allow = self.mask.tile(grid, r0, r0 + 1, -c, width - c)
                base = add if add is not None else torch.zeros((), dtype=dtype,
                                                                device=allow.device)
                add = torch.where(allow, base, torch.full((), NEG_INF, dtype=dtype,
                                                          device=allow.device))
            add = as_4d(add)
            add = add.expand(*add.shape[:2], 1, width)[:, :, 0].contiguous()
            self.diagonals[dtype] = (add, c)
        return self.diagonals[dtype]

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
