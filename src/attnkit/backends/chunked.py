"""Tiled online-softmax attention: never materialises the L x S score matrix.

The query rows are cut into tiles; for each tile the mask's ``block_states`` say which
key blocks are EMPTY (skipped), FULL (no mask needed) or PARTIAL (mask evaluated for
that block only). Consecutive non-empty key blocks form a *segment*; each segment is one
call of a kernel that returns ``(out_s, lse_s)`` = softmax-weighted values and the
log-sum-exp of the segment's scores. Segments merge exactly:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

so memory is O(tile) beyond Q, K, V and the output, and time follows the allowed blocks.

Two kernels compute a segment:

* ``fused``: torch's fused CPU flash kernel (see :mod:`attnkit.backends._fused`), when
  the segment needs nothing it cannot do;
* ``eager``: a few matmuls, the general case: softcap, dropout, learned biases,
  value head dim != query head dim, and any device.

The backward pass (FlashAttention's trick) recomputes each segment's probabilities from
the saved output and log-sum-exp, ``P = exp(S - lse)``, and accumulates
``dS = P * (dP - rowsum(dO * O) + dlse)``: training memory stays linear as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _fused
from ..bias import Bias
from ..dtypes import compute_dtype, stat_dtype
from ..masks import EMPTY, FULL, PARTIAL, Grid, Mask
from ..masks.grid import as_4d

__all__ = ["chunked_attention", "chunked_attention_backward", "plan_tiles", "Tile", "Segment",
           "Gathered"]

NEG_INF = float("-inf")

#: default tile sizes (query rows, key columns); measured on 2 CPU cores, see benchmarks/
BLOCK_Q = 128
BLOCK_K = 128
#: longest key segment in one kernel call, bounds the (H, BLOCK_Q, keys) bias tile
MAX_SEGMENT_KEYS = 2048
#: a tile gathers its key blocks when the union over heads holds this many times the
#: blocks of its busiest head, or when its blocks fall in more than GATHER_MIN_RUNS runs
GATHER_UNION_RATIO = 1.25
GATHER_MIN_RUNS = 2
#: largest Toeplitz master tile (elements) built for a translation-invariant mask/bias
MASTER_ELEMENTS = 1 << 25
#: adjacent segments narrower than this together run as one masked call
MERGE_KEYS = 1024
#: a run of at least this many equal tiles is computed by one batched kernel call
MIN_BATCH_TILES = 2
#: bounds of the per-call cache of tiles of translation-invariant masks and biases
TILE_CACHE_ENTRIES = 16
TILE_CACHE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Segment:
    """Keys ``k0..k1-1`` of one query tile; ``masked`` when the mask must be evaluated;
    ``covered`` when one of its blocks is FULL, so every query row of the tile sees a key
    here (no check for rows that see nothing)."""
    k0: int
    k1: int
    masked: bool
    covered: bool = False


@dataclass(frozen=True, eq=False)
class Gathered:
    """Scattered key blocks of one query tile read through a gather: ``index`` (H|1, n)
    holds, per head (or shared by all heads), the key indices in the order they are
    copied; -1 marks an empty slot that no query sees."""
    index: Tensor
    masked: bool = True  # False: every gathered block is FULL, only empty slots are masked


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


def plan_tiles(mask: Mask | None, grid: Grid, block_q: int, block_k: int,
               merge_full_and_partial: bool = False, gather: bool = True) -> list[Tile]:
    """Split the (L, S) grid into query tiles and the key segments each one needs.

    A tile whose key blocks form one or two contiguous runs reads them as slices of K/V
    (:class:`Segment`, no copy). A tile whose blocks are scattered (BigBird's random
    blocks) or differ per head (per-head patterns) gathers exactly the blocks each head
    needs into one buffer (:class:`Gathered`), so cost follows the allowed blocks rather
    than their union.
    """
    # tiles aligned in position space (equal tiles of a translation-invariant mask then
    # sit at equal offsets), or in row space when rows carry their own positions
    off = grid.q_offset if grid.affine else 0
    qb = _boundaries(off, off + grid.q_len, block_q)
    kb = _boundaries(0, grid.k_len, block_k) if grid.k_len else [0]
    nq, nk = len(qb) - 1, len(kb) - 1
    tiles = [Tile(qb[i] - off, qb[i + 1] - off, qb[i], qb[i + 1]) for i in range(nq)]
    if nk == 0:
        return tiles
    if mask is None:
        runs = _row_runs(torch.full((1, nk), FULL, dtype=torch.int8), kb, merge_full_and_partial)[0]
        for t in tiles:
            t.segments = list(runs)
        return tiles
    dev = grid.device
    q_lo = torch.tensor([t.r0 for t in tiles], device=dev).view(-1, 1)
    q_hi = torch.tensor([t.r1 for t in tiles], device=dev).view(-1, 1)
    k_lo = torch.tensor(kb[:-1], device=dev).view(1, -1)
    k_hi = torch.tensor(kb[1:], device=dev).view(1, -1)
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
    use_gather = (union.sum(-1) > GATHER_UNION_RATIO * most) | (runs > GATHER_MIN_RUNS)
    use_gather &= gather
    runs = _row_runs(union_states, kb, merge_full_and_partial)
    for i, t in enumerate(tiles):
        if bool(use_gather[i]):
            t.segments = _gathered(seen[:, i], per_head[:, i] == FULL, int(most[i]), kb, dev)
        else:
            t.segments = runs[i]
    return tiles


def _row_runs(states: Tensor, kb: list[int], merge_full_and_partial: bool) -> list[list]:
    """For each row of (nq, nk) block states: contiguous runs of non-empty key blocks,
    split where FULL meets PARTIAL (so long full runs need no mask) and at
    MAX_SEGMENT_KEYS; neighbouring runs that together stay under MERGE_KEYS become one
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
            masked = bool(masked_any[i, a:b].any()) if merge_full_and_partial else kinds[i][a] != FULL
            start = a
            while start < b:  # split at MAX_SEGMENT_KEYS
                stop = start + 1
                while stop < b and kb[stop + 1] - kb[start] <= MAX_SEGMENT_KEYS:
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


@dataclass
class _Config:
    grid: Grid
    tiles: list
    mask: Mask | None
    bias: Bias | None
    scale: float
    softcap: float | None
    dropout_p: float
    seed: int
    kernel: str  # "auto" | "eager"
    #: additive tiles of translation-invariant masks/biases, keyed by their geometry
    tile_cache: dict | None = None
    #: per dtype, the Toeplitz master tile of a translation-invariant mask/bias (see
    #: _master): every tile of the call is a view into it
    masters: dict | None = None
    #: per tile, the kernel the forward used (FUSED, EAGER, EXACT); the backward follows
    modes: list | None = None


# ------------------------------------------------------------------ tile helpers

def _index(n: int | None, device, dim: int) -> Tensor:
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    return torch.arange(n or 1, device=device).view(shape)


def _gathered_keys(seg: Gathered) -> Tensor:
    """(1, H|1, 1, n) key indices of a gathered segment (-1 clamped to 0: masked anyway)."""
    return seg.index.clamp(min=0).view(1, seg.index.shape[0], 1, -1)


def _allowed(cfg: _Config, tile: Tile, seg) -> Tensor:
    """Bool (B|1, H|1, nq, nk): which keys of the segment the tile's queries may see."""
    grid = cfg.grid
    if isinstance(seg, Gathered):
        allow = (seg.index >= 0).view(1, seg.index.shape[0], 1, -1)
        if cfg.mask is not None and seg.masked:
            m = cfg.mask
            rows = torch.arange(tile.r0, tile.r1, device=grid.device).view(1, 1, -1, 1)
            allow = allow & m.at(grid, _index(m.batch_size or grid.batch_size, grid.device, 0),
                                 _index(m.num_heads, grid.device, 1), rows, _gathered_keys(seg))
        return allow
    return cfg.mask.tile(grid, tile.r0, tile.r1, seg.k0, seg.k1)


def _bias_values(cfg: _Config, tile: Tile, seg, params) -> Tensor:
    """Float (B|1, H|1, nq, nk): the bias of the segment's scores."""
    grid, b = cfg.grid, cfg.bias
    if isinstance(seg, Gathered):
        rows = torch.arange(tile.r0, tile.r1, device=grid.device).view(1, 1, -1, 1)
        return b.at(grid, _index(b.batch_size or grid.batch_size, grid.device, 0),
                    _index(b.num_heads, grid.device, 1), rows, _gathered_keys(seg), *params)
    return b.tile(grid, tile.r0, tile.r1, seg.k0, seg.k1, params)


def _width(seg) -> int:
    return seg.index.shape[-1] if isinstance(seg, Gathered) else seg.k1 - seg.k0


def _additive(cfg: _Config, tile: Tile, seg, params, dtype):
    """The float term added to this segment's scores (mask as -inf, plus bias), and the
    rows that can see at least one key of it (None when every row can).

    When the mask and bias depend only on the offset k - p (causal, windows, ALiBi, T5),
    tiles of the same geometry are equal: they are built once and reused."""
    if cfg.masters is not None and not isinstance(seg, Gathered):
        view = _master_view(cfg, tile, seg, params, dtype)
        if view is not None:
            return view
    key = None
    if cfg.tile_cache is not None and not isinstance(seg, Gathered):
        key = (tile.p0 - seg.k0, tile.r1 - tile.r0, seg.k1 - seg.k0, dtype, seg.masked)
        hit = cfg.tile_cache.get(key)
        if hit is not None:
            return hit
    add, alive = _build_additive(cfg, tile, seg, params, dtype)
    if key is not None and len(cfg.tile_cache) < TILE_CACHE_ENTRIES and (
            add is None or add.numel() <= TILE_CACHE_ELEMENTS):
        cfg.tile_cache[key] = (add, alive)
    return add, alive


def _master(cfg: _Config, params, dtype):
    """For a mask and bias that depend only on k - p: one (H|1, block_q, L + S + 1) tile
    holding every offset, ``M[h, i, t] = additive(p = i, k = t - S)``. The tile of query
    positions p0.. and keys k0..k1 is the view ``M[:, :nq, k0 - p0 + S : k1 - p0 + S]``:
    no per-tile construction, and memory linear in L + S. None when it would be large."""
    if dtype in cfg.masters:
        return cfg.masters[dtype]
    grid = cfg.grid
    rows = max(t.r1 - t.r0 for t in cfg.tiles)
    c = grid.k_len
    width = grid.k_len + grid.q_len + 1
    heads = max((o.num_heads or 1) for o in (cfg.mask, cfg.bias) if o is not None)
    batch = max((o.batch_size or 1) for o in (cfg.mask, cfg.bias) if o is not None)
    if batch * heads * rows * width > MASTER_ELEMENTS:
        cfg.masters[dtype] = None
        return None
    allow = add = None
    r0 = -grid.q_offset  # the row at position 0
    if cfg.mask is not None:
        allow = cfg.mask.tile(grid, r0, r0 + rows, -c, width - c)
        allow = allow.expand(*allow.shape[:2], rows, width).contiguous()
    if cfg.bias is not None:
        add = cfg.bias.tile(grid, r0, r0 + rows, -c, width - c, params).to(dtype)
    if allow is not None:
        inf = torch.full((), NEG_INF, dtype=dtype, device=allow.device)
        add = torch.where(allow, add if add is not None else torch.zeros((), dtype=dtype,
                                                                          device=allow.device), inf)
    add = add.expand(*add.shape[:2], rows, width).contiguous()
    cfg.masters[dtype] = (allow, add, c)
    return cfg.masters[dtype]


def _master_view(cfg: _Config, tile: Tile, seg, params, dtype):
    m = _master(cfg, params, dtype)
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
    if not seg.masked and cfg.bias is None:
        return None, None
    return add[:, :, :nq, a:b], alive


def _build_additive(cfg: _Config, tile: Tile, seg, params, dtype):
    add, alive = None, None
    nq, nk = tile.r1 - tile.r0, _width(seg)
    slots = isinstance(seg, Gathered) and not bool((seg.index >= 0).all())
    if (seg.masked and cfg.mask is not None) or slots:
        allow = _allowed(cfg, tile, seg)
        allow = allow.expand(*allow.shape[:2], nq, nk)
        alive = None if getattr(seg, "covered", False) else allow.any(-1)
        add = torch.where(allow, torch.zeros((), dtype=dtype, device=allow.device),
                          torch.full((), NEG_INF, dtype=dtype, device=allow.device))
    if cfg.bias is not None:
        b = _bias_values(cfg, tile, seg, params).to(dtype)
        add = b if add is None else add + b
        if cfg.bias.may_mask:
            add = add.expand(*add.shape[:2], nq, nk)
            alive = (add > NEG_INF).any(-1)
    if add is not None:
        add = add.expand(*add.shape[:2], nq, nk)
    if alive is not None and bool(alive.all()):
        alive = None  # every row sees a key: no lse fix needed
    return add, alive


class _KV:
    """Key/value access for segments: slices for contiguous segments, gathers (and the
    matching scatter-add of gradients) for :class:`Gathered` ones."""

    def __init__(self, k: Tensor, v: Tensor, q_heads: int):
        self.k, self.v, self.q_heads = k, v, q_heads
        self._flat = None

    def _flat_kv(self):
        if self._flat is None:
            B, H, S, _ = self.k.shape
            self._flat = (self.k.contiguous().view(B, H * S, -1),
                          self.v.contiguous().view(B, H * S, -1))
        return self._flat

    def _flat_index(self, seg: Gathered) -> Tensor:
        """Per query head h: index into the (B, Hkv * S) rows of kv head h // groups."""
        Hkv, S = self.k.shape[1], self.k.shape[2]
        kv_head = torch.arange(self.q_heads, device=seg.index.device) // (self.q_heads // Hkv)
        return (kv_head.view(-1, 1) * S + seg.index.clamp(min=0)).flatten()

    def get(self, seg):
        if not isinstance(seg, Gathered):
            return self.k[:, :, seg.k0:seg.k1], self.v[:, :, seg.k0:seg.k1]
        n = seg.index.shape[-1]
        if seg.index.shape[0] == 1:  # the same keys for every head: grouped heads still shared
            idx = seg.index[0].clamp(min=0)
            return self.k.index_select(2, idx), self.v.index_select(2, idx)
        kf, vf = self._flat_kv()
        flat = self._flat_index(seg)
        B = kf.shape[0]
        return (kf.index_select(1, flat).view(B, self.q_heads, n, -1),
                vf.index_select(1, flat).view(B, self.q_heads, n, -1))

    def add_grad(self, dk: Tensor, dv: Tensor | None, seg, gk: Tensor, gv: Tensor | None) -> None:
        """Add a segment's key and value gradients (``gv`` None: keys only)."""
        pairs = [(dk, gk)] + ([] if gv is None else [(dv, gv)])
        if not isinstance(seg, Gathered):
            for acc, g in pairs:
                acc[:, :, seg.k0:seg.k1] += g
            return
        if seg.index.shape[0] == 1:
            idx = seg.index[0].clamp(min=0)
            for acc, g in pairs:
                acc.index_add_(2, idx, g.to(acc.dtype))
            return
        B, Hkv, S, _ = dk.shape
        flat = self._flat_index(seg)
        for acc, g in pairs:
            acc.view(B, Hkv * S, -1).index_add_(1, flat, g.reshape(B, flat.numel(), -1).to(acc.dtype))


def _fold(x: Tensor, kv_heads: int) -> Tensor:
    """(B, Hq, n, d) -> (B, Hkv, G*n, d): a query group's heads become extra rows."""
    B, H, n, d = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads) * n, d)


def _unfold(x: Tensor, q_heads: int) -> Tensor:
    """(B, Hkv, G*n, d) -> (B, Hq, n, d)."""
    B, _, gn, d = x.shape
    return x.reshape(B, q_heads, gn * x.shape[1] // q_heads, d)


def _scores(qt: Tensor, ks: Tensor, cfg: _Config):
    """Scaled (and soft-capped) scores (B, Hq, nq, nk) in the compute dtype, plus
    x = s / softcap, from which the backward forms softcap's derivative."""
    cdt = compute_dtype(qt.dtype)
    s = torch.matmul(_fold(qt.to(cdt), ks.shape[1]), ks.to(cdt).transpose(-1, -2))
    s = _unfold(s, qt.shape[1]) * cfg.scale
    x = None
    if cfg.softcap is not None:
        x = s / cfg.softcap
        s = cfg.softcap * torch.tanh(x)
    return s, x


def _keep(cfg: _Config, ti: int, si: int, shape, device) -> Tensor:
    """The dropout keep-mask of segment ``si`` of tile ``ti``: regenerated identically in
    forward, backward and the weights pass from one seed drawn per call."""
    g = torch.Generator(device=device)
    g.manual_seed((cfg.seed * 1_000_003 + ti * 65_537 + si) % (2 ** 63))
    return torch.rand(shape, generator=g, device=device) >= cfg.dropout_p


def _use_fused(cfg: _Config, q, k, v, need_bias_grad: bool = False) -> bool:
    if cfg.kernel == "eager" or cfg.softcap is not None or cfg.dropout_p > 0 or need_bias_grad:
        return False
    if cfg.bias is not None and q.dtype in (torch.float16, torch.bfloat16):
        return False  # a bias rounded to half precision would change the softmax
    return _fused.usable(q, k, v)


def _like_query(q: Tensor, dv: int) -> Tensor:
    """An empty (B, H, L, dv) output in the query's memory layout: when q is a (B, L, H, D)
    buffer seen as (B, H, L, D), as a layer's projection gives it, so is the output, and
    the layer's transpose back to (B, L, H * dv) is a view rather than a copy."""
    B, H, L, _ = q.shape
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(B, L, H, dv).transpose(1, 2)
    return q.new_empty(B, H, L, dv)


def _signature(cfg: _Config, tile: Tile, seg):
    """Hashable and equal for two (tile, segment) pairs only when their additive tiles
    (mask and bias) are equal; None when that is not known."""
    if isinstance(seg, Gathered):
        return None
    nq, width = tile.r1 - tile.r0, seg.k1 - seg.k0
    if cfg.bias is not None:
        if cfg.masters is None:  # a bias that is not translation-invariant
            return None
        return ("relative", seg.k0 - tile.p0, nq, width, seg.masked)
    if not seg.masked or cfg.mask is None:
        return ("open", nq, width)
    sig = cfg.mask.tile_signature(cfg.grid, tile.r0, tile.r1, seg.k0, seg.k1)
    return None if sig is None else ("mask", sig)


@dataclass(frozen=True)
class _Run:
    """Tiles ``start..stop-1`` of equal height whose segments pair up with equal additive
    tiles; segment i of tile t reads keys from ``k0_i + t * steps[i]`` (step = the tile
    height: a band that moves with the tile; 0: the same columns for every tile)."""
    start: int
    stop: int
    steps: tuple


def _batched_runs(cfg: _Config) -> dict:
    """Runs of at least MIN_BATCH_TILES consecutive tiles that one kernel call per
    segment can compute together, keyed by their first tile."""
    tiles, runs = cfg.tiles, {}
    sigs = [tuple(_signature(cfg, t, s) for s in t.segments) for t in tiles]
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
            runs[i] = _Run(i, j, steps)
        i = j
    return runs


def _tiles_view(t: Tensor, b: int, start: int, count: int, rows: int, step: int) -> Tensor:
    """(count, H, rows, D) strided view of ``t[b]`` (H, N, D): item i is rows
    ``start + i * step ..`` (overlapping windows when step < rows; step 0 repeats them)."""
    x = t[b]
    sh, sn, sd = x.stride()
    return x.as_strided((count, x.shape[0], rows, x.shape[2]), (step * sn, sh, sn, sd),
                        x.storage_offset() + start * sn)


@dataclass
class _Part:
    """One segment's contribution to a tile's rows. Fused kernel: ``out`` normalised over
    the segment and its log-sum-exp ``rel`` (``shift`` None). Eager kernel: ``out`` the
    unnormalised sum P V with P = exp(s - shift), ``shift`` each row's largest score and
    ``denom`` the sum of P, so that the merge normalises once, as the textbook does. A
    sink is a part with a logit (``shift``), ``denom`` 1 and no value."""
    out: Tensor | None
    shift: Tensor | None
    rel: Tensor
    denom: Tensor | None = None


def _segment_forward(cfg, ti, si, qt, ks, vs, add, alive, fused) -> _Part:
    """One segment's :class:`_Part`; rows that see no key: rel = -inf (denom 0)."""
    if fused:
        out, lse = _fused.forward(qt, ks, vs, add, cfg.scale)
        if alive is not None:  # the fused kernel reports lse = 0 for rows with no key
            lse = lse.masked_fill(~alive, NEG_INF)
        return _Part(out, None, lse)
    s, _ = _scores(qt, ks, cfg)
    if add is not None:
        s = s + add
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    p = torch.exp(s - m)
    denom = p.sum(-1)
    if cfg.dropout_p > 0:
        p = p * _keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
    pv = _unfold(torch.matmul(_fold(p, vs.shape[1]), vs.to(p.dtype)), qt.shape[1])
    return _Part(pv, m.squeeze(-1), torch.log(denom), denom)


def _merge_into(out: Tensor, shift: Tensor, rel: Tensor, parts: list, acc_dtype,
                sink: Tensor | None = None) -> None:
    """Merge the :class:`_Part` s of one tile over disjoint key sets (and a sink logit,
    a key with no value) straight into the tile's rows of ``out`` (B, H, n, Dv) and its
    statistics ``shift``, ``rel`` (B, H, n), so that ``shift + rel`` is the log-sum-exp of
    all the scores and each row is rounded to the output dtype once. Rows that see no
    key anywhere get zeros and rel = -inf.

    Eager parts merge as sums, ``out = sum_i e_i pv_i / sum_i e_i denom_i`` with
    ``e_i = exp(shift_i - max shift)``; fused parts as log-sum-exps,
    ``out = sum_i exp(lse_i - lse) out_i``."""
    if all(p.denom is not None for p in parts):
        if sink is not None:
            parts = parts + [_Part(None, sink, torch.zeros((), dtype=rel.dtype, device=rel.device),
                                   torch.ones((), dtype=rel.dtype, device=rel.device))]
        _merge_sums(out, shift, rel, parts, acc_dtype)
        return
    # fused parts: lse_i (shift None), merged as log-sum-exps; the sink scales the result
    # by sigmoid(lse - sink) = exp(lse) / (exp(lse) + exp(sink)), one rounding
    shift.zero_()
    if len(parts) == 1:
        (part,) = parts
        total = part.rel.to(rel.dtype).expand_as(rel)
        valued = [] if part.out is None else [(part.out, None)]
    else:
        lses = [p.rel.to(rel.dtype) for p in parts]
        total = lses[0]
        for l in lses[1:]:
            total = torch.logaddexp(total, l)
        dead = total == NEG_INF
        valued = [(p.out, torch.exp(l - total).masked_fill(dead, 0.0).unsqueeze(-1))
                  for p, l in zip(parts, lses) if p.out is not None]
    if sink is not None:
        keep = torch.sigmoid(total - sink).unsqueeze(-1)
        valued = [(o, keep if w is None else w * keep) for o, w in valued]
        total = torch.logaddexp(total, sink.expand_as(total))
    rel.copy_(total.expand_as(rel))
    if len(valued) == 1 and valued[0][1] is None:
        out.copy_(valued[0][0])
        return
    _weighted_sum(out, valued, acc_dtype)


def _merge_sums(out, shift, rel, parts, acc_dtype):
    """The eager parts' merge: numerator and denominator summed on the common scale of
    the largest row maximum (the part holding it gets scale 1, exactly), one division."""
    M = parts[0].shift.to(rel.dtype)
    for p in parts[1:]:
        M = torch.maximum(M, p.shift.to(rel.dtype))
    scales = [torch.exp(p.shift.to(rel.dtype) - M) for p in parts]
    total = scales[0] * parts[0].denom.to(rel.dtype)
    for e, p in zip(scales[1:], parts[1:]):
        total = total + e * p.denom.to(rel.dtype)
    dead = total == 0
    rel.copy_(torch.log(total).expand_as(rel))
    shift.copy_(torch.where(dead, 0.0, M).expand_as(shift))
    valued = [(p.out, e) for e, p in zip(scales, parts) if p.out is not None]
    if not valued:
        out.zero_()
        return
    num = valued[0][0].to(acc_dtype) * valued[0][1].to(acc_dtype).unsqueeze(-1)
    for o, e in valued[1:]:
        num.addcmul_(o.to(acc_dtype), e.to(acc_dtype).unsqueeze(-1))
    num = num / torch.where(dead, 1.0, total).to(acc_dtype).unsqueeze(-1)
    out.copy_(num.masked_fill(dead.unsqueeze(-1), 0.0))


def _weighted_sum(out, valued, acc_dtype):
    """out = sum of o * w over (o, w) pairs, accumulated in the compute dtype."""
    if not valued:
        out.zero_()
        return
    if out.dtype == acc_dtype and valued[0][0].shape == out.shape:
        torch.mul(valued[0][0], valued[0][1], out=out)
        for o, w in valued[1:]:
            out.addcmul_(o, w)
        return
    acc = valued[0][0].to(acc_dtype) * valued[0][1].to(acc_dtype)
    for o, w in valued[1:]:
        acc.addcmul_(o.to(acc_dtype), w.to(acc_dtype))
    out.copy_(acc)


#: how a tile is computed: torch's fused kernel, the eager kernel, or the eager kernel
#: with a backward that forms rowsum(P * dP) from the same dP it uses (exact for rows
#: that see a single key: their gradients with respect to q and k are exactly zero)
FUSED, EAGER, EXACT = "fused", "eager", "exact"
#: a fused tile whose log-sum-exp is this large lost digits that P = exp(s - lse) needs
#: (its rounding, |lse| * eps, becomes P's relative error; with an additive offset such
#: as a masking constant, the scores themselves carry no such error): it is recomputed
#: by the eager kernel, whose statistics keep the row maximum apart. Keyed by the dtype
#: the scores are computed in.
LARGE_LSE = {torch.float32: 2.0 ** 8, torch.float64: 2.0 ** 5}


def _single_key_rows(tile: Tile, adds: list) -> bool:
    """Whether some row of the tile sees exactly one key, counted from the segments'
    additive tiles."""
    count = 0
    for seg, (add, _) in zip(tile.segments, adds):
        if add is None:
            count = count + _width(seg)
        else:
            count = count + (add > NEG_INF).sum(-1)
    return bool((torch.as_tensor(count) == 1).any())


def _tile_forward(cfg, ti, tile, q, kv, params, add_dtype, mode, out, shift, rel, acc_dtype,
                  sink, adds=None):
    """Compute one tile's rows of out/shift/rel with the kernel its mode asks for."""
    r = slice(tile.r0, tile.r1)
    qt = q[:, :, r]
    parts = []
    for si, seg in enumerate(tile.segments):
        add, alive = adds[si] if adds is not None else _additive(cfg, tile, seg, params,
                                                                   add_dtype)
        ks, vs = kv.get(seg)
        parts.append(_segment_forward(cfg, ti, si, qt, ks, vs, add, alive, mode == FUSED))
    if not parts:  # the tile sees no key at all
        parts = [_Part(None, None, torch.full((), NEG_INF, dtype=rel.dtype, device=q.device))]
    _merge_into(out[:, :, r], shift[:, :, r], rel[:, :, r], parts, acc_dtype, sink)


def _forward(q, k, v, sinks, cfg: _Config, params):
    B, Hq, L, _ = q.shape
    Dv = v.shape[-1]
    # in float32/64 a sink belongs in the softmax's one normalisation, which only the eager
    # kernel can give it (the fused kernel's output would be rescaled, rounding twice); in
    # half precision that rescale is far inside the dtype's own rounding
    fused_ok = _use_fused(cfg, q, k, v) and not (
        sinks is not None and q.dtype in (torch.float32, torch.float64))
    out = _like_query(q, Dv)
    # statistics in float64 whatever the inputs: shift is a float32 score (exact), and
    # rel = log(denominator) keeps the digits that P_sink and dsinks need
    stat = torch.float64
    shift = torch.empty(B, Hq, L, dtype=stat, device=q.device)
    rel = torch.empty(B, Hq, L, dtype=stat, device=q.device)
    acc_dtype = compute_dtype(q.dtype)
    sink = None if sinks is None else sinks.to(stat).view(1, Hq, 1)
    kv = _KV(k, v, Hq)
    fused_dtype = q.dtype
    runs = _batched_runs(cfg) if fused_ok else {}
    cfg.modes = [FUSED if fused_ok else EAGER] * len(cfg.tiles)
    done = 0
    for ti, tile in enumerate(cfg.tiles):
        if ti < done:
            continue
        run = runs.get(ti)
        if _could_see_one_key(cfg, tile):
            adds = [_additive(cfg, tile, seg, params, acc_dtype) for seg in tile.segments]
            if _single_key_rows(tile, adds):
                stop = run.stop if run is not None else ti + 1
                for t in range(ti, stop):  # a run's tiles share their additive tiles
                    cfg.modes[t] = EXACT
                    _tile_forward(cfg, t, cfg.tiles[t], q, kv, params, acc_dtype, EXACT,
                                  out, shift, rel, acc_dtype, sink, adds if t == ti else None)
                done = stop
                continue
        if run is not None:
            _run_forward(cfg, run, q, k, v, params, fused_dtype, out, shift, rel, acc_dtype, sink)
            done = run.stop
            continue
        mode = cfg.modes[ti]
        _tile_forward(cfg, ti, tile, q, kv, params, fused_dtype if mode == FUSED else acc_dtype,
                      mode, out, shift, rel, acc_dtype, sink)
    if fused_ok:  # fused tiles whose log-sum-exp is too large to recompute P from
        large = (shift + rel).abs()
        large = large.masked_fill(~torch.isfinite(large), 0.0) >= LARGE_LSE[acc_dtype]
        if bool(large.any()):
            rows = large.any(0).any(0)
            for ti, tile in enumerate(cfg.tiles):
                if cfg.modes[ti] == FUSED and bool(rows[tile.r0:tile.r1].any()):
                    cfg.modes[ti] = EAGER
                    _tile_forward(cfg, ti, tile, q, kv, params, acc_dtype, EAGER, out, shift,
                                  rel, acc_dtype, sink)
    if cfg.tile_cache is not None:
        cfg.tile_cache.clear()  # not held until backward (a layer's worth per layer)
        cfg.masters.clear()
    return out, shift, rel


def _could_see_one_key(cfg: _Config, tile: Tile) -> bool:
    """Cheap test before counting: only a tile without a FULL block (or with a float mask,
    which may hold -inf anywhere) can have a row that sees a single key."""
    if not tile.segments:
        return False
    if cfg.bias is not None and cfg.bias.may_mask:
        return True
    return not any((getattr(seg, "covered", False) or not getattr(seg, "masked", True))
                   and _width(seg) > 1 for seg in tile.segments)


def _run_forward(cfg, run: _Run, q, k, v, params, add_dtype, out, shift, rel, acc_dtype, sink):
    """A run of equal tiles as one fused call per segment: queries and keys as strided
    tile views (no copies), the run's tiles as the kernel's batch dimension, one shared
    additive tile; then one vectorised merge into the output rows."""
    first = cfg.tiles[run.start]
    n, nq = run.stop - run.start, first.r1 - first.r0
    rows = slice(first.r0, first.r0 + n * nq)
    # the shared additive tile, compact: the kernel reads it once per tile of the run
    extras = [(None if a is None else a.contiguous(), alive)
              for a, alive in (_additive(cfg, first, seg, params, add_dtype)
                               for seg in first.segments)]
    for b in range(q.shape[0]):
        qt = _tiles_view(q, b, first.r0, n, nq, nq)
        parts = []
        for seg, step, (add, alive) in zip(first.segments, run.steps, extras):
            width = seg.k1 - seg.k0
            ks = _tiles_view(k, b, seg.k0, n, width, step)
            vs = _tiles_view(v, b, seg.k0, n, width, step)
            if add is not None and add.shape[0] > 1:
                add = add[b:b + 1]
            if alive is not None and alive.shape[0] > 1:
                alive = alive[b:b + 1]
            parts.append(_segment_forward(cfg, run.start, 0, qt, ks, vs, add, alive, True))
        view = lambda t: t[b, :, rows].unflatten(1, (n, nq)).transpose(0, 1)
        _merge_into(view(out), view(shift), view(rel), parts, acc_dtype,
                    None if sink is None else sink[0].view(1, -1, 1))


def _probabilities(cfg, qt, ks, add, shift_t, rel_t, acc):
    """P = exp(s + add - shift) / exp(rel) for one segment, with the scores computed as the
    forward's eager kernel computed them, and tanh(s / softcap) for softcap's derivative."""
    s, t = _scores(qt, ks, cfg)
    if add is not None:
        s = s + add
    if shift_t is None:  # the fused kernel's statistics: lse alone
        return torch.exp(s - rel_t.unsqueeze(-1).to(acc)), t
    # exp(s - shift) / denom as the forward formed it (1/denom = exp(-rel) rounded once,
    # from float64), not exp(s - shift - rel), whose argument rounds with |rel|
    inv = torch.exp(-rel_t.unsqueeze(-1)).to(acc)
    return torch.exp(s - shift_t.unsqueeze(-1).to(acc)) * inv, t


def _segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta_t, need, params,
                   dparams, dq, dk, dv, kv, r, sums=None):
    """Accumulate one segment's dq, dk, dv (and bias-parameter gradients) from its
    probabilities ``p`` and the rows' softmax correction ``delta_t``; with ``sums``
    (B, Hq, L) also add this segment's rowsum(P * dP) to its rows."""
    acc = p.dtype
    Hq = qt.shape[1]
    keep = None
    if cfg.dropout_p > 0:
        keep = _keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
    pd = p if keep is None else p * keep
    do_f = dot.to(acc)
    hk = ks.shape[1]
    gv = torch.matmul(_fold(pd, hk).transpose(-1, -2), _fold(do_f, hk))
    dp = _unfold(torch.matmul(_fold(do_f, hk), vs.to(acc).transpose(-1, -2)), Hq)
    if keep is not None:
        dp = dp * keep
    if sums is not None:
        sums[:, :, r] += (p * dp).sum(-1).to(sums.dtype)
    ds = p * (dp - delta_t.unsqueeze(-1))
    if any(need):
        _bias_param_grads(cfg, tile, seg, params, need, ds, dparams)
    if t is not None:
        # d softcap * tanh(x) / ds = 1 - tanh(x)^2 = 1 / cosh(x)^2: no cancellation when
        # |tanh(x)| is near 1
        ds = ds / torch.cosh(t).square()
    ds = ds * cfg.scale
    dq[:, :, r] += torch.matmul(_fold(ds, hk), ks.to(acc)).reshape(qt.shape)
    gk = torch.matmul(_fold(ds, hk).transpose(-1, -2), _fold(qt.to(acc), hk))
    kv.add_grad(dk, dv, seg, gk, gv)


def _backward(dout, dlse, q, k, v, out, shift, rel, sinks, cfg: _Config, params):
    """Gradients from the saved output and statistics (lse = shift + rel), tile by tile,
    each tile with the kernel that computed it (``cfg.modes``; None: fused if usable)."""
    B, Hq, L, _ = q.shape
    acc = compute_dtype(q.dtype)
    need = [p.requires_grad for p in params]
    fused_ok = _use_fused(cfg, q, k, v, any(need))
    modes = cfg.modes or [FUSED if fused_ok else EAGER] * len(cfg.tiles)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dparams = [torch.zeros_like(p) if n else None for p, n in zip(params, need)]
    lse = rel if shift is None else shift + rel
    # rowsum(dO * O), the softmax-gradient correction; the gradient through lse, dlse, is
    # a term of its own: dS = P * (dP - rowsum(dO * O) + dlse)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dead = rel == NEG_INF  # rows that see nothing: P = 0
    lse_b = torch.where(dead, float("inf"), lse)
    rel_b = torch.where(dead, float("inf"), rel)
    kv = _KV(k, v, Hq)
    # the sinks' gradient, -sum P_sink * rowsum(P * dP): the sum formed from P and dP
    # wherever the eager kernel runs (rowsum(dO * O) in float64 where the fused one does)
    sink_grad = sinks is not None and sinks.requires_grad
    sums = torch.zeros(B, Hq, L, dtype=torch.float64, device=q.device) if sink_grad else None
    summed = torch.zeros(L, dtype=torch.bool, device=q.device) if sink_grad else None
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        qt, dot = q[:, :, r], dout[:, :, r]
        mode = modes[ti] if (modes[ti] != FUSED or fused_ok) else EAGER
        if sink_grad and mode != FUSED:
            summed[r] = True
        if mode == EXACT:
            _exact_tile_backward(cfg, ti, tile, qt, dot, kv, params, need, dparams, shift,
                                 rel_b, dlse, dq, dk, dv, r, acc, sums)
            continue
        for si, seg in enumerate(tile.segments):
            ks, vs = kv.get(seg)
            if mode == FUSED:
                add, _ = _additive(cfg, tile, seg, params, q.dtype)
                gq, gk, gv = _fused_backward(dot, qt, ks, vs, out[:, :, r],
                                             lse_b[:, :, r].to(stat_dtype(q.dtype)), add,
                                             cfg.scale)
                dq[:, :, r] += gq
                kv.add_grad(dk, dv, seg, gk, gv)
                if dlse is not None:  # the lse term, P * dlse, with dV untouched
                    p, _ = _probabilities(cfg, qt, ks, add if add is None else add.to(acc),
                                          None, lse_b[:, :, r], acc)
                    _lse_term(cfg, p, dlse[:, :, r].to(acc), qt, ks, dq, dk, kv, seg, r)
                continue
            add, _ = _additive(cfg, tile, seg, params, acc)
            p, t = _probabilities(cfg, qt, ks, add, None if shift is None else shift[:, :, r],
                                  rel_b[:, :, r], acc)
            _segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta[:, :, r], need,
                           params, dparams, dq, dk, dv, kv, r, sums)
    dsinks = None
    if sink_grad:
        full = (dout.double() * out.double()).sum(-1)
        d = torch.where(summed.view(1, 1, -1), sums, full)
        if dlse is not None:
            d = d - dlse.double()
        lse64 = (rel_b.double() if shift is None else shift.double() + rel_b.double())
        p_sink = torch.exp(sinks.double().view(1, Hq, 1) - lse64)
        dsinks = (-(p_sink * d)).sum((0, 2)).to(sinks.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks,
            [None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)])


def _lse_term(cfg, p, dlse_t, qt, ks, dq, dk, kv, seg, r):
    """dq and dk of lse alone: dS = P * dlse (dV gets nothing)."""
    hk = ks.shape[1]
    ds = p * dlse_t.unsqueeze(-1) * cfg.scale
    acc = p.dtype
    dq[:, :, r] += torch.matmul(_fold(ds, hk), ks.to(acc)).reshape(qt.shape)
    gk = torch.matmul(_fold(ds, hk).transpose(-1, -2), _fold(qt.to(acc), hk))
    kv.add_grad(dk, None, seg, gk, None)


def _exact_tile_backward(cfg, ti, tile, qt, dot, kv, params, need, dparams, shift, rel_b,
                         dlse, dq, dk, dv, r, acc, sums=None):
    """A tile's gradients with the softmax correction formed from the same dP the
    gradients use, delta = rowsum(P * dP) (torch's own softmax backward), in two passes
    over its segments: a row that sees one key has P = 1 and delta = dP exactly, so its
    dS, and its gradients with respect to q and k, are exactly zero."""
    hk = None
    delta = None
    for si, seg in enumerate(tile.segments):
        ks, vs = kv.get(seg)
        hk = ks.shape[1]
        add, _ = _additive(cfg, tile, seg, params, acc)
        p, _ = _probabilities(cfg, qt, ks, add, shift[:, :, r], rel_b[:, :, r], acc)
        dp = _unfold(torch.matmul(_fold(dot.to(acc), hk), vs.to(acc).transpose(-1, -2)),
                     qt.shape[1])
        if cfg.dropout_p > 0:
            dp = dp * (_keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p))
        part = (p * dp).sum(-1)
        delta = part if delta is None else delta + part
    if delta is None:
        return
    if sums is not None:
        sums[:, :, r] += delta.to(sums.dtype)
    if dlse is not None:
        delta = delta - dlse[:, :, r].to(acc)
    for si, seg in enumerate(tile.segments):
        ks, vs = kv.get(seg)
        add, _ = _additive(cfg, tile, seg, params, acc)
        p, t = _probabilities(cfg, qt, ks, add, shift[:, :, r], rel_b[:, :, r], acc)
        _segment_grads(cfg, ti, si, tile, seg, qt, dot, ks, vs, p, t, delta, need, params,
                       dparams, dq, dk, dv, kv, r)


def _fused_backward(dot, qt, ks, vs, out_t, lse_t, add, scale):
    """The fused kernel's (dq, dk, dv) of one segment. In half precision with grouped
    key/value heads, the kernel would sum a group's gradients in the half dtype; it gets
    the key/value heads repeated as views instead, and the group sums run in float32."""
    Hq, Hkv = qt.shape[1], ks.shape[1]
    if Hq == Hkv or qt.dtype not in (torch.float16, torch.bfloat16):
        return _fused.backward(dot, qt, ks, vs, out_t, lse_t, add, scale)
    G = Hq // Hkv
    expand = lambda x: x.unsqueeze(2).expand(x.shape[0], Hkv, G, *x.shape[2:]).reshape(
        x.shape[0], Hq, *x.shape[2:])
    gq, gk, gv = _fused.backward(dot, qt, expand(ks), expand(vs), out_t, lse_t, add, scale)
    fold = lambda g: g.float().view(g.shape[0], Hkv, G, *g.shape[2:]).sum(2)
    return gq, fold(gk), fold(gv)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cfg, *params):
        out, shift, rel = _forward(q, k, v, sinks, cfg, params)
        ctx.save_for_backward(q, k, v, out, shift, rel, sinks, *params)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, (shift + rel).to(stat_dtype(q.dtype))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, shift, rel, sinks, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks, dparams = _backward(dout, dlse, q, k, v, out, shift, rel, sinks,
                                                ctx.cfg, params)
        return (dq, dk, dv, dsinks, None, *dparams)


def _weights(q, k, sinks, cfg: _Config, params) -> Tensor:
    """The attention weights (B, Hq, L, S) after dropout: the scores recomputed tile by
    tile into one (B, Hq, L, S) tensor and normalised by one softmax over each whole row
    (with the sink in its denominator), so a row's weights sum to 1 to rounding whatever
    the size of its scores; differentiable through ordinary autograd."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    acc = compute_dtype(q.dtype)
    # one spare column: where a gathered segment's empty slots land
    s_all = torch.full((B, Hq, L, S + 1), NEG_INF, dtype=acc, device=q.device)
    keep_all = None
    if cfg.dropout_p > 0:
        keep_all = torch.zeros(B, Hq, L, S + 1, dtype=acc, device=q.device)
    keys = _KV(k, k, Hq)
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        for si, seg in enumerate(tile.segments):
            s, _ = _scores(q[:, :, r], keys.get(seg)[0], cfg)
            add, _ = _additive(cfg, tile, seg, params, acc)
            if add is not None:
                s = s + add
            s = s.expand(B, Hq, *s.shape[2:])
            keep = None
            if keep_all is not None:
                keep = (_keep(cfg, ti, si, s.shape, s.device) / (1 - cfg.dropout_p)).to(acc)
            if isinstance(seg, Gathered):
                at = seg.index.view(1, seg.index.shape[0], 1, -1)
                at = torch.where(at >= 0, at, S).expand(B, Hq, s.shape[2], -1)
                s_all[:, :, r] = s_all[:, :, r].scatter(3, at, s)
                if keep is not None:
                    keep_all[:, :, r] = keep_all[:, :, r].scatter(3, at, keep)
            else:
                s_all[:, :, r, seg.k0:seg.k1] = s
                if keep is not None:
                    keep_all[:, :, r, seg.k0:seg.k1] = keep
    s_all = s_all[..., :S]
    if sinks is not None:
        s_all = torch.cat([s_all, sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, L, 1)], -1)
    dead = (s_all == NEG_INF).all(-1, keepdim=True)
    w = torch.softmax(s_all.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)[..., :S]
    if keep_all is not None:
        w = w * keep_all[..., :S]
    return w.to(q.dtype)


def _bias_param_grads(cfg, tile, seg, params, need, ds, dparams):
    """Push this segment's score gradient into the bias parameters (e.g. T5's table)."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need)]
        t = _bias_values(cfg, tile, seg, leaves)
        g = ds.to(t.dtype)
        if g.shape != t.shape:
            g = g.sum_to_size(t.shape)
        wanted = [x for x, n in zip(leaves, need) if n]
        grads = torch.autograd.grad(t, wanted, g, allow_unused=True)
    it = iter(grads)
    for i, n in enumerate(need):
        if n:
            gi = next(it)
            if gi is not None:
                dparams[i] += gi


def chunked_attention(query: Tensor, key: Tensor, value: Tensor, *, mask: Mask | None = None,
                      bias: Bias | None = None, scale: float, softcap: float | None = None,
                      sinks: Tensor | None = None, dropout_p: float = 0.0,
                      return_weights: bool = False, block_q: int | None = None,
                      block_k: int | None = None, kernel: str = "auto",
                      grid: Grid | None = None):
    """Tiled attention on (B, Hq, L, D) query and (B, Hkv, S, D) key/value.

    Returns ``(out, weights_or_None, lse)`` with out (B, Hq, L, Dv) and lse (B, Hq, L)
    (-inf for rows that see nothing; those rows output zeros). ``grid`` carries the
    query positions and the bias dtype (default: bottom-right, the input's accumulation
    type).

    A mask that splits by residue class (``residue_classes()``: a dilated window) runs as
    one inner-mask problem per class on strided views, unless a bias, sinks, softcap,
    weights or explicit block sizes ask for the single plan over the whole grid.
    """
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    if grid is None:
        grid = Grid(L, S, query.device, dtype=compute_dtype(query.dtype))
    split = None if mask is None else mask.residue_classes()
    if (split is not None and bias is None and sinks is None and not return_weights
            and softcap is None and block_q is None and block_k is None and grid.affine):
        done = _by_residue_class(query, key, value, split, scale=scale,
                                 dropout_p=dropout_p, kernel=kernel)
        if done is not None:
            return done
    natural = mask.tile_hint if mask is not None else None
    if natural is not None and not 16 <= natural <= 512:
        natural = None
    if block_k is None:
        block_k = natural or BLOCK_K
    if block_q is None:
        # a mask's own blocks of 64+ rows are the tiles (BigBird's 64: one query block per
        # tile, its gathered keys exactly that block's), and so are a narrow band's (its
        # equal tiles run batched); other finer hints (Longformer's 16-wide global slots)
        # only place key cuts, and query tiles stay about BLOCK_Q rows, where the kernel's
        # GEMMs run near peak
        block_q = BLOCK_Q if natural is None else (
            natural if natural >= 64 or mask.translation_invariant else natural * -(-BLOCK_Q // natural))
    tiles = plan_tiles(mask, grid, block_q, block_k,
                       merge_full_and_partial=bias is not None)
    seed = 0
    if dropout_p > 0:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    relative = ((mask is not None or bias is not None) and grid.affine
                and (mask is None or mask.translation_invariant)
                and (bias is None or bias.translation_invariant))
    cfg = _Config(grid, tiles, mask, bias, float(scale), softcap, float(dropout_p), seed, kernel,
                  {} if relative else None, {} if relative else None)
    params = tuple(bias.params) if bias is not None else ()
    out, lse = _ChunkedAttention.apply(query, key, value, sinks, cfg, *params)
    weights = _weights(query, key, sinks, cfg, params) if return_weights else None
    return out, weights, lse


def _head_index(heads: list[int] | None, device):
    """Index of a group of heads along dim 1: a slice (views, no copies) when they are
    contiguous, else an index tensor."""
    if heads is None:
        return slice(None)
    if heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return torch.tensor(heads, device=device)


def _by_residue_class(query, key, value, classes, **kw):
    """Attention under a mask that splits by residue class (``mask.residue_classes()``,
    e.g. a dilated window): for each group of heads with period d and each residue r,

        out[rows p = r (mod d)] = attention(Q[rows p = r], K[keys k = r], V[keys k = r],
                                            inner mask)

    on strided views (no copies when a group's heads are contiguous). Query row i sits at
    position p = i + (S - L); with that bottom-right alignment the last query and key of
    each class share a position, so the inner mask's own alignment holds in every class.
    Returns None when key/value heads are shared across groups (GQA with per-head
    periods that split a group): the caller runs the general path."""
    B, Hq, L, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    per = Hq // Hkv
    plans = []
    for heads, d, inner in classes:
        kv_heads = None
        if heads is not None:
            kv_heads = sorted({h // per for h in heads})
            if [h for k in kv_heads for h in range(k * per, (k + 1) * per)] != heads:
                return None
        plans.append((heads, kv_heads, d, inner))
    out = _like_query(query, value.shape[-1])
    lse = torch.empty(B, Hq, L, dtype=stat_dtype(query.dtype), device=query.device)
    off = S - L
    for heads, kv_heads, d, inner in plans:
        hs, ks = _head_index(heads, query.device), _head_index(kv_heads, query.device)
        q, k, v = query[:, hs], key[:, ks], value[:, ks]
        for r in range(d):
            i0 = (r - off) % d
            if i0 >= L:
                continue
            o, _, l = chunked_attention(q[:, :, i0::d], k[:, :, r::d], v[:, :, r::d],
                                        mask=inner, **kw)
            out[:, hs, i0::d] = o
            lse[:, hs, i0::d] = l
    return out, None, lse


def chunked_attention_backward(dout: Tensor, query: Tensor, key: Tensor, value: Tensor,
                               out: Tensor, lse: Tensor, *, mask: Mask | None = None,
                               scale: float, block_q: int | None = None,
                               block_k: int | None = None, kernel: str = "auto"):
    """Gradients (dq, dk, dv) of attention over one block of keys, given the output ``out``
    (B, Hq, L, Dv) and log-sum-exp ``lse`` (B, Hq, L) of attention over a larger key set
    that contains the block (FlashAttention's split backward):

        P  = exp(scale * Q K^T + mask - lse)        (this block's share of the softmax)
        dS = P * (dO V^T - rowsum(dO * out))
        dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO

    Summing the results over blocks gives the gradients of the whole attention; ring
    attention uses it for the K/V blocks that travel around the ring.
    """
    grid = Grid(query.shape[2], key.shape[2], query.device, dtype=compute_dtype(query.dtype))
    bk = block_k or BLOCK_K
    tiles = plan_tiles(mask, grid, block_q or BLOCK_Q, bk)
    cfg = _Config(grid, tiles, mask, None, float(scale), None, 0.0, 0, kernel)
    dq, dk, dv, _, _ = _backward(dout, None, query, key, value, out, None, lse, None, cfg, ())
    return dq, dk, dv
