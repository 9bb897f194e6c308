"""The Mask protocol (:class:`Mask`) and its combinations with ``&`` and ``|``."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import PARTIAL, Grid, as_4d, batch_index, head_index, merge_dim

__all__ = ["Mask", "AndMask", "OrMask", "check_mask"]


class Mask:
    """Base class of all masks.

    The protocol, every part of which the engine relies on and tests/test_mask_contract.py
    checks for every subclass:

    * ``mask_mod`` (required): the rule in positions;
    * ``position_states`` (optional, default PARTIAL everywhere): must be *sound*, FULL
      only where every entry is allowed and EMPTY only where none is;
    * ``at`` / ``tile`` / ``block_states``: the same in query rows (override only for
      masks defined on rows, such as a dense tensor); ``tile`` must equal the
      corresponding block of ``materialize``;
    * ``translation_invariant``: a promise that what position p sees depends only on
      k - p (and b, h): the engine then builds one tile per offset and reuses it;
    * ``tile_signature``: equal only for blocks whose ``tile`` is equal;
    * ``tile_hint``: a block size tiles may align to (tuning, never semantics);
    * ``residue_classes``: None, or the mask split into classes of positions (dilation).
    """

    #: batch size of a mask that differs per batch element (None: the same for all)
    batch_size: int | None = None
    #: number of heads of a mask that differs per head (None: the same for all)
    num_heads: int | None = None
    #: a block size the engine may align its tiles to: a tuning hint, not a layout
    tile_hint: int | None = None
    #: True when what a query sees depends only on the offset k - p (and b, h): tiles of
    #: the same geometry are then equal and the engine builds them once
    translation_invariant: bool = False

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
        b = batch_index(self.batch_size or grid.batch_size, grid.device)
        h = head_index(self.num_heads, grid.device)
        i = torch.arange(r0, r1, device=grid.device).view(1, 1, -1, 1)
        k = grid.keys(k0, k1).view(1, 1, 1, -1)
        return as_4d(self.at(grid, b, h, i, k))

    def block_states(self, grid: Grid, r_lo: Tensor, r_hi: Tensor, k_lo: Tensor,
                     k_hi: Tensor) -> Tensor:
        """EMPTY/PARTIAL/FULL per block of query rows ``[r_lo, r_hi)`` ((nq, 1)) and keys
        ``[k_lo, k_hi)`` ((1, nk))."""
        q_lo, q_hi = grid.position_bounds(r_lo, r_hi)
        if q_lo.dim() == 2:
            return self.position_states(grid, q_lo, q_hi, k_lo, k_hi)
        if q_lo.shape[0] == 1:  # positions per row, shared by the batch
            return as_4d(self.position_states(grid, q_lo[0, 0], q_hi[0, 0], k_lo, k_hi))
        per_batch = []  # positions given per batch element: ask about each one's blocks
        for b in range(q_lo.shape[0]):
            st = as_4d(self.position_states(grid, q_lo[b, 0], q_hi[b, 0], k_lo, k_hi))
            per_batch.append(st[b:b + 1] if st.shape[0] > 1 else st)
        return torch.cat(per_batch, 0)

    def tile_signature(self, grid: Grid, r0: int, r1: int, k0: int, k1: int):
        """A hashable value that two blocks share only when their :meth:`tile` is equal,
        or None (no promise). A translation-invariant mask's block depends only on the
        offset ``k0 - r0`` and its size (when every row has the same offset); the engine
        runs blocks with equal signatures as one batched kernel call."""
        if self.translation_invariant and grid.affine:
            return ("offset", k0 - r0, r1 - r0, k1 - k0)
        return None

    def residue_classes(self) -> list | None:
        """None, or ``[(heads, d, inner), ...]``: for the heads listed (None: all), a query
        at position p sees only keys k = p (mod d), and within one class the pattern is
        the mask ``inner`` on the class's own positions (see DilatedMask)."""
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
        return AndMask(self, check_mask(other, "&"))

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask(self, check_mask(other, "|"))

    def __rand__(self, other) -> "Mask":
        return AndMask(check_mask(other, "&"), self)

    def __ror__(self, other) -> "Mask":
        return OrMask(check_mask(other, "|"), self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_mask(m, op: str) -> Mask:
    """A mask to combine with ``op``: masks as they are; a bool tensor (True = may
    attend) broadcastable to (B, H, L, S) as :class:`~attnkit.masks.TensorMask`."""
    if isinstance(m, Mask):
        return m
    if isinstance(m, torch.Tensor):
        if m.dtype != torch.bool or not 1 <= m.dim() <= 4:
            raise TypeError(f"masks combine with {op} with other masks or with a bool tensor "
                            f"(True = may attend) of 1 to 4 dims broadcastable to (B, H, L, S); "
                            f"got a {m.dtype} tensor of shape {tuple(m.shape)}. A float "
                            f"tensor is a bias: pass it as attn_mask or bias=")
        from .dense import TensorMask
        return TensorMask(m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)))
    raise TypeError(f"masks combine with {op} with other masks or with a bool tensor "
                    f"(True = may attend), got {type(m).__name__}")


class Combined(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.batch_size = merge_dim(a.batch_size, b.batch_size, "batch sizes")
        self.num_heads = merge_dim(a.num_heads, b.num_heads, "head counts")
        self.tile_hint = a.tile_hint or b.tile_hint
        self.translation_invariant = a.translation_invariant and b.translation_invariant

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


class AndMask(Combined):
    """Both masks allow the key."""
    symbol = "&"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) & self.b.mask_mod(grid, b, h, q, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return torch.minimum(as_4d(self.a.position_states(grid, q_lo, q_hi, k_lo, k_hi)),
                             as_4d(self.b.position_states(grid, q_lo, q_hi, k_lo, k_hi)))

    def at(self, grid, b, h, i, k):
        return self.a.at(grid, b, h, i, k) & self.b.at(grid, b, h, i, k)

    def tile(self, grid, r0, r1, k0, k1):
        return self.a.tile(grid, r0, r1, k0, k1) & self.b.tile(grid, r0, r1, k0, k1)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        return torch.minimum(as_4d(self.a.block_states(grid, r_lo, r_hi, k_lo, k_hi)),
                             as_4d(self.b.block_states(grid, r_lo, r_hi, k_lo, k_hi)))


class OrMask(Combined):
    """Either mask allows the key."""
    symbol = "|"

    def mask_mod(self, grid, b, h, q, k):
        return self.a.mask_mod(grid, b, h, q, k) | self.b.mask_mod(grid, b, h, q, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return torch.maximum(as_4d(self.a.position_states(grid, q_lo, q_hi, k_lo, k_hi)),
                             as_4d(self.b.position_states(grid, q_lo, q_hi, k_lo, k_hi)))

    def at(self, grid, b, h, i, k):
        return self.a.at(grid, b, h, i, k) | self.b.at(grid, b, h, i, k)

    def tile(self, grid, r0, r1, k0, k1):
        return self.a.tile(grid, r0, r1, k0, k1) | self.b.tile(grid, r0, r1, k0, k1)

    def block_states(self, grid, r_lo, r_hi, k_lo, k_hi):
        return torch.maximum(as_4d(self.a.block_states(grid, r_lo, r_hi, k_lo, k_hi)),
                             as_4d(self.b.block_states(grid, r_lo, r_hi, k_lo, k_hi)))
