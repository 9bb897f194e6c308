"""Pure tiling: which key blocks each query tile needs, and which tiles are alike.

The query rows are cut into tiles; for each tile the mask's ``block_states`` say which
key blocks are EMPTY (skipped), FULL (no mask needed) or PARTIAL (mask evaluated for
that block only). A tile reads its keys as *segments*, of one of two kinds behind one
interface (``width``, ``masked``, ``covered``, ``offset``, ``read``, ``add_grad``,
``allowed``, ``bias``, ``place``):

* :class:`Segment`: consecutive key blocks, read as slices of K/V (no copy);
* :class:`Gathered`: scattered blocks (BigBird's random blocks, per-head patterns), read
  through one gather, so cost follows the allowed blocks rather than their union.

Nothing here computes attention; it only looks at block states and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...masks import EMPTY, FULL, PARTIAL, Grid, Mask
from ...masks.grid import as_4d

__all__ = ["BLOCK_Q", "BLOCK_Q_HALF", "BLOCK_Q_EAGER_HALF", "BLOCK_K", "MAX_SEGMENT_KEYS",
           "MERGE_KEYS", "MIN_BATCH_TILES", "Segment", "Gathered", "Tile", "Run", "BlockView",
           "block_view", "cuts", "plan_tiles", "batched_runs", "index_along"]

#: default tile sizes (query rows, key columns), chosen with ``attnkit bench``
BLOCK_Q = 128
#: the tallest tile in half precision on the fused kernel (see ``attention.tall_rows``)
BLOCK_Q_HALF = 4096
#: the rows of an eager tile on half products (a forward no backward follows)
BLOCK_Q_EAGER_HALF = 256

BLOCK_K = 128


#: longest key segment in one kernel call, bounds the (H, BLOCK_Q, keys) bias tile
MAX_SEGMENT_KEYS = 2048


#: a tile gathers its key blocks when the union over heads holds this many times the
#: blocks of its busiest head, or when its blocks fall in more than GATHER_MIN_RUNS runs
GATHER_UNION_RATIO = 1.25


GATHER_MIN_RUNS = 2
#: adjacent segments narrower than this together run as one masked call
MERGE_KEYS = 1024
#: a run of at least this many equal tiles is computed by one batched kernel call
MIN_BATCH_TILES = 2


def index_along(n: int | None, device, dim: int) -> Tensor:
    """arange(n or 1) shaped to broadcast along ``dim`` of a 4-D tensor."""
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    return torch.arange(n or 1, device=device).view(shape)


@dataclass(frozen=True)
class Segment:
    """Keys ``k0..k1-1`` of one query tile; ``masked`` when the mask must be evaluated;
    ``covered`` when one of its blocks is FULL, so every query row of the tile sees a key
    here (no check for rows that see nothing)."""
    k0: int
    k1: int
    masked: bool
    covered: bool = False
    has_empty_slots = False

    @property
    def width(self) -> int:
        return self.k1 - self.k0

    def offset(self, tile: "Tile") -> int | None:
        """Where the keys start relative to the tile's first position: tiles of a
        translation-invariant mask with equal offsets and sizes are equal."""
        return self.k0 - tile.p0

    def read(self, kv) -> tuple[Tensor, Tensor]:
        return kv.slice(self.k0, self.k1)

    def add_grad(self, kv, dk, dv, gk, gv) -> None:
        kv.add_to_slice(self.k0, self.k1, dk, dv, gk, gv)

    def allowed(self, mask: Mask, grid: Grid, tile: "Tile") -> Tensor:
        return mask.tile(grid, tile.r0, tile.r1, self.k0, self.k1)

    def bias(self, bias, grid: Grid, tile: "Tile", params) -> Tensor:
        return bias.tile(grid, tile.r0, tile.r1, self.k0, self.k1, params)

    def place(self, rows: Tensor, values: Tensor) -> Tensor:
        """``rows`` (B, H, n, S + 1) with this segment's columns set to ``values``."""
        rows[..., self.k0:self.k1] = values
        return rows


@dataclass(frozen=True, eq=False)
class Gathered:
    """Scattered key blocks of one query tile read through a gather: ``index`` (H|1, n)
    holds, per head (or shared by all heads), the key indices in the order they are
    copied; -1 marks an empty slot that no query sees."""
    index: Tensor
    masked: bool = True  # False: every gathered block is FULL, only empty slots are masked
    covered = False

    @property
    def width(self) -> int:
        return self.index.shape[-1]

    @property
    def has_empty_slots(self) -> bool:
        return not bool((self.index >= 0).all())

    def offset(self, tile: "Tile") -> None:
        return None  # gathered keys have no single offset: never reused

    def keys(self) -> Tensor:
        """(1, H|1, 1, n) key indices (-1 clamped to 0: those slots are masked anyway)."""
        return self.index.clamp(min=0).view(1, self.index.shape[0], 1, -1)

    def read(self, kv) -> tuple[Tensor, Tensor]:
        return kv.gather(self.index)

    def add_grad(self, kv, dk, dv, gk, gv) -> None:
        kv.add_to_gathered(self.index, dk, dv, gk, gv)

    def _rows(self, grid: Grid, tile: "Tile") -> Tensor:
        return torch.arange(tile.r0, tile.r1, device=grid.device).view(1, 1, -1, 1)

    def allowed(self, mask: Mask | None, grid: Grid, tile: "Tile") -> Tensor:
        allow = (self.index >= 0).view(1, self.index.shape[0], 1, -1)
        if mask is not None and self.masked:
            allow = allow & mask.at(grid, index_along(mask.batch_size or grid.batch_size,
                                                      grid.device, 0),
                                    index_along(mask.num_heads, grid.device, 1),
                                    self._rows(grid, tile), self.keys())
        return allow

    def bias(self, bias, grid: Grid, tile: "Tile", params) -> Tensor:
        return bias.at(grid, index_along(bias.batch_size or grid.batch_size, grid.device, 0),
                       index_along(bias.num_heads, grid.device, 1), self._rows(grid, tile),
                       self.keys(), *params)

    def place(self, rows: Tensor, values: Tensor) -> Tensor:
        """``rows`` (B, H, n, S + 1) with the gathered columns set to ``values``; empty
        slots land in the spare last column."""
        S = rows.shape[-1] - 1
        at = self.index.view(1, self.index.shape[0], 1, -1)
        at = torch.where(at >= 0, at, S).expand(*values.shape)
        return rows.scatter(3, at, values)


@dataclass
class Tile:
    """Query rows ``r0..r1-1`` and their key segments; ``p0..p1-1`` are the rows'
    positions when every row has the same offset (the grid is affine)."""
    r0: int
    r1: int
    p0: int
    p1: int
    segments: list = field(default_factory=list)


def _boundaries(start: int, stop: int, block: int) -> list[int]:
    """Cut [start, stop) at multiples of ``block`` (so tiles align in position space)."""
    cuts = list(range((start // block + 1) * block, stop, block))
    return [start] + cuts + [stop]


def cuts(grid: Grid, block_q: int, block_k: int, extra_q: tuple = ()) -> tuple[list, list]:
    """Where the tiles start and stop: query cuts in position space when the grid is
    affine (equal tiles of a translation-invariant mask then sit at equal offsets), in
    row space when rows carry their own positions, plus the cuts ``extra_q`` (in the
    same space); key cuts at multiples of block_k."""
    off = grid.q_offset if grid.affine else 0
    qb = _boundaries(off, off + grid.q_len, block_q)
    if extra_q:
        qb = sorted(set(qb) | {c for c in extra_q if qb[0] < c < qb[-1]})
    kb = _boundaries(0, grid.k_len, block_k) if grid.k_len else [0]
    return qb, kb


def plan_tiles(mask: Mask | None, grid: Grid, block_q: int, block_k: int,
               merge_full_and_partial: bool = False, gather: bool = True,
               extra_q: tuple = (), max_keys: int = MAX_SEGMENT_KEYS) -> list[Tile]:
    """Split the (L, S) grid into query tiles and the key segments each one needs.

    A tile whose key blocks form one or two contiguous runs reads them as slices of K/V
    (:class:`Segment`, no copy). A tile whose blocks are scattered (BigBird's random
    blocks) or differ per head (per-head patterns) gathers exactly the blocks each head
    needs into one buffer (:class:`Gathered`), so cost follows the allowed blocks rather
    than their union. ``extra_q``: further query cuts (see :func:`cuts`); ``max_keys``:
    the widest segment (one kernel call).
    """
    off = grid.q_offset if grid.affine else 0
    qb, kb = cuts(grid, block_q, block_k, extra_q)
    nq, nk = len(qb) - 1, len(kb) - 1
    tiles = [Tile(qb[i] - off, qb[i + 1] - off, qb[i], qb[i + 1]) for i in range(nq)]
    if nk == 0:
        return tiles
    if mask is None:
        runs = _row_runs(torch.full((1, nk), FULL, dtype=torch.int8), kb, merge_full_and_partial,
                         max_keys)[0]
        for t in tiles:
            t.segments = list(runs)
        return tiles
    view = block_view(mask, grid, qb, kb, gather)
    runs = _row_runs(view.union_states, kb, merge_full_and_partial, max_keys)
    for i, t in enumerate(tiles):
        if bool(view.gathers[i]):
            t.segments = _gathered(view.seen[:, i], view.per_head[:, i] == FULL,
                                   int(view.most[i]), kb, grid.device)
        else:
            t.segments = runs[i]
    return tiles


@dataclass
class BlockView:
    """The block states of a tiling, before any segment is built: ``per_head`` (Hm, nq,
    nk) EMPTY/PARTIAL/FULL over the batch, their union over heads, the blocks each head
    sees, and which query tiles gather (their heads' blocks differ, or are scattered)."""
    qb: list
    kb: list
    per_head: Tensor
    union_states: Tensor
    seen: Tensor
    most: Tensor
    gathers: Tensor

    def computed_entries(self) -> int:
        """Score entries per (batch, head) the tiles compute: a tile reading slices pays
        for the union of its heads' blocks, a gathering one for its busiest head's."""
        heights = torch.tensor(self.qb[1:]) - torch.tensor(self.qb[:-1])
        widths = torch.tensor(self.kb[1:]) - torch.tensor(self.kb[:-1])
        union = (self.seen.any(0).long() * widths.to(self.seen.device)).sum(-1).cpu()
        gathered = self.most.cpu() * int(widths.max())
        per_row = torch.where(self.gathers.cpu(), gathered, union)
        return int((per_row * heights).sum())


def block_view(mask: Mask, grid: Grid, qb: list, kb: list, gather: bool = True) -> BlockView:
    """The mask's block states on the tiling cut at ``qb`` (rows, tile positions when the
    grid is affine) and ``kb`` (keys)."""
    dev = grid.device
    off = grid.q_offset if grid.affine else 0
    q_lo = torch.tensor(qb[:-1], device=dev).view(-1, 1) - off
    q_hi = torch.tensor(qb[1:], device=dev).view(-1, 1) - off
    k_lo = torch.tensor(kb[:-1], device=dev).view(1, -1)
    k_hi = torch.tensor(kb[1:], device=dev).view(1, -1)
    nq, nk = len(qb) - 1, len(kb) - 1
    st = as_4d(mask.block_states(grid, q_lo, q_hi, k_lo, k_hi))
    st = st.expand(*st.shape[:2], nq, nk)
    # per head: reduce over the batch (FULL only if full for every batch element)
    lo_h, hi_h = st.amin(0), st.amax(0)
    per_head = torch.where(hi_h == EMPTY, EMPTY, torch.where(lo_h == FULL, FULL, PARTIAL))
    union_states = torch.where(per_head.amax(0) == EMPTY, EMPTY,
                               torch.where(per_head.amin(0) == FULL, FULL, PARTIAL))
    seen = per_head != EMPTY                               # (Hm, nq, nk)
    union = seen.any(0)                                    # (nq, nk)
    most = seen.sum(-1).amax(0)                            # (nq,) blocks of the busiest head
    runs = (union & ~torch.nn.functional.pad(union, (1, 0))[:, :-1]).sum(-1)
    gathers = (union.sum(-1) > GATHER_UNION_RATIO * most) | (runs > GATHER_MIN_RUNS)
    return BlockView(qb, kb, per_head, union_states, seen, most, gathers & gather)


def _row_runs(states: Tensor, kb: list[int], merge_full_and_partial: bool,
              max_keys: int = MAX_SEGMENT_KEYS) -> list[list]:
    """For each row of (nq, nk) block states: contiguous runs of non-empty key blocks,
    split where FULL meets PARTIAL (so long full runs need no mask) and at
    ``max_keys``; neighbouring runs that together stay under MERGE_KEYS become one
    call (one kernel launch and no merge). Python only visits run boundaries."""
    kind = (states != EMPTY).to(torch.int8) if merge_full_and_partial else states.to(torch.int8)
    padded = torch.nn.functional.pad(kind, (1, 1), value=EMPTY)
    change = padded[:, 1:] != padded[:, :-1]                     # boundary before block j
    rows, cols = change.nonzero(as_tuple=True)
    masked_any = states != FULL
    full_any = states == FULL
    per_row: list[list[int]] = [[] for _ in range(states.shape[0])]
    for r, c in zip(rows.tolist(), cols.tolist()):
        per_row[r].append(c)
    kinds = kind.tolist()
    result = []
    for i, cuts in enumerate(per_row):
        segments = []
        for a, b in zip(cuts, cuts[1:]):
            if kinds[i][a] == EMPTY:
                continue
            masked = (bool(masked_any[i, a:b].any()) if merge_full_and_partial
                      else kinds[i][a] != FULL)
            start = a
            while start < b:  # split at MAX_SEGMENT_KEYS
                stop = start + 1
                while stop < b and kb[stop + 1] - kb[start] <= max_keys:
                    stop += 1
                covered = not masked or bool(full_any[i, start:stop].any())
                segments.append(Segment(kb[start], kb[stop], masked, covered))
                start = stop
        merged = segments[:1]
        for seg in segments[1:]:
            last = merged[-1]
            if last.k1 == seg.k0 and seg.k1 - last.k0 <= MERGE_KEYS:
                merged[-1] = Segment(last.k0, seg.k1, last.masked or seg.masked,
                                     last.covered or seg.covered)
            else:
                merged.append(seg)
        result.append(merged)
    return result


def _gathered(seen: Tensor, full: Tensor, most: int, kb: list[int], device) -> list:
    """Key indices (H|1, n) of the blocks each head sees, padded with -1 to the busiest
    head's count, split into pieces of at most MAX_SEGMENT_KEYS keys. A piece whose
    blocks are all FULL needs no mask evaluation, only its empty slots masked."""
    block = kb[1] - kb[0] if len(kb) > 1 else 1
    order = torch.argsort((~seen).to(torch.int8), dim=-1, stable=True)[:, :most]  # (Hm, m)
    valid = seen.gather(-1, order)
    whole = full.gather(-1, order) | ~valid
    if seen.shape[0] > 1 and bool((order == order[:1]).all() and (valid == valid[:1]).all()):
        order, valid, whole = order[:1], valid[:1], whole[:1]
    starts = torch.tensor(kb[:-1], device=device)[order]                           # (H, m)
    ends = torch.tensor(kb[1:], device=device)[order]
    idx = starts.unsqueeze(-1) + torch.arange(block, device=device)                # (H, m, bk)
    ok = valid.unsqueeze(-1) & (idx < ends.unsqueeze(-1))
    idx = torch.where(ok, idx, -1)
    per = max(1, MAX_SEGMENT_KEYS // block)
    return [Gathered(idx[:, a:a + per].flatten(1), not bool(whole[:, a:a + per].all()))
            for a in range(0, most, per)]


@dataclass(frozen=True)
class Run:
    """Tiles ``start..stop-1`` of equal height whose segments pair up with equal additive
    tiles; segment i of tile t reads keys from ``k0_i + t * steps[i]`` (step = the tile
    height: a band that moves with the tile; 0: the same columns for every tile)."""
    start: int
    stop: int
    steps: tuple


def batched_runs(tiles: list, signature) -> dict:
    """Runs of at least MIN_BATCH_TILES consecutive tiles that one kernel call per
    segment can compute together, keyed by their first tile. ``signature(tile, seg)`` is
    hashable and equal only for segments with equal additive tiles (None: unknown)."""
    runs = {}
    sigs = [tuple(signature(t, s) for s in t.segments) for t in tiles]
    i = 0
    while i < len(tiles):
        first = tiles[i]
        nq = first.r1 - first.r0
        j, steps = i + 1, None
        if first.segments and None not in sigs[i]:
            while j < len(tiles) and sigs[j] == sigs[i] and tiles[j].r0 == tiles[j - 1].r1:
                d = tuple(b.k0 - a.k0 for a, b in zip(tiles[j - 1].segments, tiles[j].segments))
                if any(x not in (0, nq) for x in d) or (steps is not None and d != steps):
                    break
                steps = d
                j += 1
        if j - i >= MIN_BATCH_TILES:
            runs[i] = Run(i, j, steps)
        i = j
    return runs
