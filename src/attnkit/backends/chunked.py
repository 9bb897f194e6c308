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
from ..masks import EMPTY, FULL, PARTIAL, Grid, Mask, _as_4d

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
    st = _as_4d(mask.block_states(grid, q_lo, q_hi, k_lo, k_hi))
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


# ------------------------------------------------------------------ tile helpers

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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

    def add_grad(self, dk: Tensor, dv: Tensor, seg, gk: Tensor, gv: Tensor) -> None:
        if not isinstance(seg, Gathered):
            dk[:, :, seg.k0:seg.k1] += gk
            dv[:, :, seg.k0:seg.k1] += gv
            return
        if seg.index.shape[0] == 1:
            idx = seg.index[0].clamp(min=0)
            dk.index_add_(2, idx, gk.to(dk.dtype))
            dv.index_add_(2, idx, gv.to(dv.dtype))
            return
        B, Hkv, S, _ = dk.shape
        flat = self._flat_index(seg)
        dk.view(B, Hkv * S, -1).index_add_(1, flat, gk.reshape(B, flat.numel(), -1).to(dk.dtype))
        dv.view(B, Hkv * S, -1).index_add_(1, flat, gv.reshape(B, flat.numel(), -1).to(dv.dtype))


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
    tanh(s / softcap) for the softcap derivative."""
    cdt = _compute_dtype(qt.dtype)
    s = torch.matmul(_fold(qt.to(cdt), ks.shape[1]), ks.to(cdt).transpose(-1, -2))
    s = _unfold(s, qt.shape[1]) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = torch.tanh(s / cfg.softcap)
        s = cfg.softcap * t
    return s, t


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


def _segment_forward(cfg, ti, si, qt, ks, vs, add, alive, fused):
    """(out, lse) of one segment; out in the compute dtype, lse in float32/64."""
    if fused:
        out, lse = _fused.forward(qt, ks, vs, add, cfg.scale)
        if alive is not None:  # the fused kernel reports lse = 0 for rows with no key
            lse = lse.masked_fill(~alive, NEG_INF)
        return out, lse
    s, _ = _scores(qt, ks, cfg)
    if add is not None:
        s = s + add
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    if cfg.dropout_p > 0:
        p = p * _keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
    pv = _unfold(torch.matmul(_fold(p, vs.shape[1]), vs.to(p.dtype)), qt.shape[1])
    out = pv / torch.where(denom == 0, 1.0, denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def _merge_into(out: Tensor, lse: Tensor, outs: list, lses: list, acc_dtype) -> None:
    """Merge the partial results of one tile over disjoint key sets straight into the
    tile's rows of ``out`` (B, H, n, Dv) and ``lse`` (B, H, n):

        lse = log sum_i exp(lse_i),   out = sum_i exp(lse_i - lse) out_i

    Rows that see no key anywhere (lse = -inf) get zeros. When ``out`` has the compute
    dtype the sum accumulates in place (no stacked copy of the partial outputs)."""
    if len(outs) == 1:
        out.copy_(outs[0])
        lse.copy_(lses[0])
        return
    total = lses[0]
    for l in lses[1:]:
        total = torch.logaddexp(total, l)
    dead = total == NEG_INF
    weights = [torch.exp(l - total).masked_fill_(dead, 0.0).unsqueeze(-1) for l in lses]
    lse.copy_(total)
    if out.dtype == acc_dtype:
        torch.mul(outs[0], weights[0], out=out)
        for o, w in zip(outs[1:], weights[1:]):
            out.addcmul_(o, w)
        return
    acc = outs[0].to(acc_dtype) * weights[0].to(acc_dtype)
    for o, w in zip(outs[1:], weights[1:]):
        acc.addcmul_(o.to(acc_dtype), w.to(acc_dtype))
    out.copy_(acc)


def _like_query(q: Tensor, dv: int) -> Tensor:
    """An empty (B, H, L, dv) output in the query's memory layout: when q is a (B, L, H, D)
    buffer seen as (B, H, L, D), as a layer's projection gives it, so is the output, and
    the layer's transpose back to (B, L, H * dv) is a view rather than a copy."""
    B, H, L, _ = q.shape
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(B, L, H, dv).transpose(1, 2)
    return q.new_empty(B, H, L, dv)


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _run_forward(cfg, run: _Run, q, k, v, params, add_dtype, out, lse, acc_dtype):
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
        outs, lses = [], []
        for seg, step, (add, alive) in zip(first.segments, run.steps, extras):
            width = seg.k1 - seg.k0
            ks = _tiles_view(k, b, seg.k0, n, width, step)
            vs = _tiles_view(v, b, seg.k0, n, width, step)
            if add is not None and add.shape[0] > 1:
                add = add[b:b + 1]
            if alive is not None and alive.shape[0] > 1:
                alive = alive[b:b + 1]
            o, l = _segment_forward(cfg, run.start, 0, qt, ks, vs, add, alive, True)
            outs.append(o)
            lses.append(l.to(lse.dtype))
        _merge_into(out[b, :, rows].unflatten(1, (n, nq)).transpose(0, 1),
                    lse[b, :, rows].unflatten(1, (n, nq)).transpose(0, 1), outs, lses, acc_dtype)


def _forward(q, k, v, sinks, cfg: _Config, params):
    B, Hq, L, _ = q.shape
    Dv = v.shape[-1]
    fused_ok = _use_fused(cfg, q, k, v)
    out = _like_query(q, Dv)
    lse = torch.empty(B, Hq, L, dtype=_stat_dtype(q.dtype), device=q.device)
    acc_dtype = _compute_dtype(q.dtype)
    kv = _KV(k, v, Hq)
    add_dtype = q.dtype if fused_ok else acc_dtype
    runs = _batched_runs(cfg) if fused_ok else {}
    done = 0
    for ti, tile in enumerate(cfg.tiles):
        if ti < done:
            continue
        if ti in runs:
            _run_forward(cfg, runs[ti], q, k, v, params, add_dtype, out, lse, acc_dtype)
            done = runs[ti].stop
            continue
        qt = q[:, :, tile.r0:tile.r1]
        outs, lses = [], []
        for si, seg in enumerate(tile.segments):
            add, alive = _additive(cfg, tile, seg, params, add_dtype)
            ks, vs = kv.get(seg)
            o, l = _segment_forward(cfg, ti, si, qt, ks, vs, add, alive, fused_ok)
            outs.append(o)
            lses.append(l.to(lse.dtype))
        if not outs:
            out[:, :, tile.r0:tile.r1] = 0
            lse[:, :, tile.r0:tile.r1] = NEG_INF
        else:
            _merge_into(out[:, :, tile.r0:tile.r1], lse[:, :, tile.r0:tile.r1], outs, lses,
                        acc_dtype)
    if sinks is not None:  # a sink is a segment with a logit and no value
        sink_l = sinks.to(lse.dtype).view(1, Hq, 1).expand_as(lse)
        new_l = torch.logaddexp(lse, sink_l)
        out = (out.to(acc_dtype) * torch.exp(lse - new_l).unsqueeze(-1)).to(q.dtype)
        lse = new_l
    if cfg.tile_cache is not None:
        cfg.tile_cache.clear()  # not held until backward (a layer's worth per layer)
        cfg.masters.clear()
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, sinks, cfg: _Config, params):
    B, Hq, L, _ = q.shape
    acc = _compute_dtype(q.dtype)
    need_param_grads = [p.requires_grad for p in params]
    bias_grad = any(need_param_grads)
    fused_ok = dlse is None and _use_fused(cfg, q, k, v, bias_grad)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dparams = [torch.zeros_like(p) if need else None for p, need in zip(params, need_param_grads)]
    # rowsum(dO * O), the softmax-gradient correction, minus the gradient through lse
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse_b = torch.where(lse == NEG_INF, float("inf"), lse)  # rows that see nothing: P = 0
    kv = _KV(k, v, Hq)
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        qt, dot = q[:, :, r], dout[:, :, r]
        for si, seg in enumerate(tile.segments):
            ks, vs = kv.get(seg)
            add, _ = _additive(cfg, tile, seg, params, q.dtype if fused_ok else acc)
            if fused_ok:
                gq, gk, gv = _fused.backward(dot, qt, ks, vs, out[:, :, r], lse_b[:, :, r],
                                             add, cfg.scale)
                dq[:, :, r] += gq
                kv.add_grad(dk, dv, seg, gk, gv)
                continue
            s, t = _scores(qt, ks, cfg)
            if add is not None:
                s = s + add
            p = torch.exp(s - lse_b[:, :, r].unsqueeze(-1).to(acc))
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
            ds = p * (dp - delta[:, :, r].unsqueeze(-1))
            if bias_grad:
                _bias_param_grads(cfg, tile, seg, params, need_param_grads, ds, dparams)
            if t is not None:
                ds = ds * (1 - t * t)
            ds = ds * cfg.scale
            dq[:, :, r] += torch.matmul(_fold(ds, hk), ks.to(acc)).reshape(qt.shape)
            gk = torch.matmul(_fold(ds, hk).transpose(-1, -2), _fold(qt.to(acc), hk))
            kv.add_grad(dk, dv, seg, gk, gv)
    dsinks = None
    if sinks is not None and sinks.requires_grad:
        p_sink = torch.exp(sinks.to(lse.dtype).view(1, Hq, 1) - lse_b)
        dsinks = (-(p_sink * delta.to(lse.dtype))).sum((0, 2)).to(sinks.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks,
            [None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)])


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


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cfg, *params):
        out, lse = _forward(q, k, v, sinks, cfg, params)
        ctx.save_for_backward(q, k, v, out, lse, sinks, *params)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks, dparams = _backward(dout, dlse, q, k, v, out, lse, sinks,
                                                ctx.cfg, params)
        return (dq, dk, dv, dsinks, None, *dparams)


def _weights(q, k, lse, cfg: _Config, params) -> Tensor:
    """The attention weights (B, Hq, L, S) after dropout, tile by tile from the final
    log-sum-exp; differentiable through ordinary autograd."""
    B, Hq, L, _ = q.shape
    acc = _compute_dtype(q.dtype)
    w = torch.zeros(B, Hq, L, k.shape[2], dtype=acc, device=q.device)
    lse_b = torch.where(lse == NEG_INF, float("inf"), lse)
    keys = _KV(k, k, Hq)
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        for si, seg in enumerate(tile.segments):
            s, _ = _scores(q[:, :, r], keys.get(seg)[0], cfg)
            add, _ = _additive(cfg, tile, seg, params, acc)
            if add is not None:
                s = s + add
            p = torch.exp(s - lse_b[:, :, r].unsqueeze(-1).to(acc))
            if cfg.dropout_p > 0:
                p = p * _keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
            if isinstance(seg, Gathered):  # empty slots hold p = 0: adding them is harmless
                at = _gathered_keys(seg).expand(B, Hq, p.shape[2], -1)
                w[:, :, r].scatter_add_(3, at, p)
            else:
                w[:, :, r, seg.k0:seg.k1] = p
    return w.to(q.dtype)


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
        grid = Grid(L, S, query.device, dtype=_compute_dtype(query.dtype))
    split = getattr(mask, "residue_classes", None)
    if (split is not None and bias is None and sinks is None and not return_weights
            and softcap is None and block_q is None and block_k is None and grid.affine):
        done = _by_residue_class(query, key, value, split(), scale=scale,
                                 dropout_p=dropout_p, kernel=kernel)
        if done is not None:
            return done
    natural = mask.block_size if mask is not None else None
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
            natural if natural >= 64 or mask.relative else natural * -(-BLOCK_Q // natural))
    tiles = plan_tiles(mask, grid, block_q, block_k,
                       merge_full_and_partial=bias is not None)
    seed = 0
    if dropout_p > 0:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    relative = ((mask is not None or bias is not None) and grid.affine
                and (mask is None or mask.relative) and (bias is None or bias.relative))
    cfg = _Config(grid, tiles, mask, bias, float(scale), softcap, float(dropout_p), seed, kernel,
                  {} if relative else None, {} if relative else None)
    params = tuple(bias.params) if bias is not None else ()
    out, lse = _ChunkedAttention.apply(query, key, value, sinks, cfg, *params)
    weights = _weights(query, key, lse, cfg, params) if return_weights else None
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
    lse = torch.empty(B, Hq, L, dtype=_stat_dtype(query.dtype), device=query.device)
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
    grid = Grid(query.shape[2], key.shape[2], query.device, dtype=_compute_dtype(query.dtype))
    bk = block_k or BLOCK_K
    tiles = plan_tiles(mask, grid, block_q or BLOCK_Q, bk)
    cfg = _Config(grid, tiles, mask, None, float(scale), None, 0.0, 0, kernel)
    dq, dk, dv, _, _ = _backward(dout, None, query, key, value, out, lse, None, cfg, ())
    return dq, dk, dv
