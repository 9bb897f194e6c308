"""The forward pass: every tile's rows of the output and of the softmax statistics.

Each row keeps ``shift`` (its largest score) and ``rel`` (log of its denominator on that
scale), both float64: ``shift + rel`` is the row's log-sum-exp. A tile is computed in one
of three modes, which the backward then follows: FUSED (torch's kernel), EAGER (the
matmul kernel), EXACT (eager, for tiles with a row that sees a single key).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...dtypes import compute_dtype
from .additive import NEG_INF, PLAIN
from .kernels import (Call, KeyValues, Part, fused_add_dtype, like_query, segment_forward,
                      use_fused)
from .merge import merge_into
from .plan import Run, Tile, batched_runs

__all__ = ["FUSED", "EAGER", "EXACT", "forward"]


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


def single_key_rows(tile: Tile, adds: list) -> bool:
    """Whether some row of the tile sees exactly one key, counted from the segments'
    additive tiles."""
    count = 0
    for seg, (add, _) in zip(tile.segments, adds):
        if add is None:
            count = count + seg.width
        else:
            count = count + (add > NEG_INF).sum(-1)
    return bool((torch.as_tensor(count) == 1).any())


def tile_forward(cfg, ti, tile, q, kv, params, add_dtype, mode, out, shift, rel, acc_dtype,
                  sink, adds=None):
    """Compute one tile's rows of out/shift/rel with the kernel its mode asks for."""
    r = slice(tile.r0, tile.r1)
    qt = q[:, :, r]
    parts = []
    for si, seg in enumerate(tile.segments):
        how, row_shift = PLAIN, None
        if adds is not None:
            add, alive = adds[si]
        elif mode == FUSED:
            add, alive, how, row_shift = cfg.additive.fused(tile, seg, params, add_dtype)
        else:
            add, alive = cfg.additive.get(tile, seg, params, add_dtype)
        ks, vs = seg.read(kv)
        parts.append(segment_forward(cfg, ti, si, qt, ks, vs, add, alive, mode == FUSED,
                                     how, row_shift))
    if not parts:  # the tile sees no key at all
        parts = [Part(None, None, torch.full((), NEG_INF, dtype=rel.dtype, device=q.device))]
    merge_into(out[:, :, r], shift[:, :, r], rel[:, :, r], parts, acc_dtype, sink)


def forward(q, k, v, sinks, cfg: Call, params):
    B, Hq, L, _ = q.shape
    Dv = v.shape[-1]
    # a sink belongs in the softmax's one normalisation, which only the eager kernel can
    # give it (the fused kernel's output would be rescaled, rounding twice). In half
    # precision the second rounding stays inside the output's own tolerance, but not in
    # the sinks' gradient, a sum over every row of rowsum(dO * O): when it is wanted,
    # eager tiles form it from P and dP instead
    fused_ok = use_fused(cfg, q, k, v) and not (
        sinks is not None and (q.dtype in (torch.float32, torch.float64) or cfg.sink_grad))
    out = like_query(q, Dv)
    # statistics in float64 whatever the inputs: shift is a float32 score (exact), and
    # rel = log(denominator) keeps the digits that P_sink and dsinks need
    stat = torch.float64
    shift = torch.empty(B, Hq, L, dtype=stat, device=q.device)
    rel = torch.empty(B, Hq, L, dtype=stat, device=q.device)
    acc_dtype = compute_dtype(q.dtype)
    sink = None if sinks is None else sinks.to(stat).view(1, Hq, 1)
    kv = KeyValues(k, v, Hq)
    fused_dtype = fused_add_dtype(cfg, q)
    runs = batched_runs(cfg.tiles, cfg.additive.signature) if fused_ok else {}
    cfg.modes = [FUSED if fused_ok else EAGER] * len(cfg.tiles)
    done = 0
    for ti, tile in enumerate(cfg.tiles):
        if ti < done:
            continue
        run = runs.get(ti)
        if cfg.exact_single_keys and could_see_one_key(cfg.bias, tile):
            adds = [cfg.additive.get(tile, seg, params, acc_dtype) for seg in tile.segments]
            if single_key_rows(tile, adds):
                stop = run.stop if run is not None else ti + 1
                for t in range(ti, stop):  # a run's tiles share their additive tiles
                    cfg.modes[t] = EXACT
                    tile_forward(cfg, t, cfg.tiles[t], q, kv, params, acc_dtype, EXACT,
                                  out, shift, rel, acc_dtype, sink, adds if t == ti else None)
                done = stop
                continue
        if run is not None:
            run_forward(cfg, run, q, k, v, params, fused_dtype, out, shift, rel, acc_dtype, sink)
            done = run.stop
            continue
        mode = cfg.modes[ti]
        tile_forward(cfg, ti, tile, q, kv, params, fused_dtype if mode == FUSED else acc_dtype,
                      mode, out, shift, rel, acc_dtype, sink)
    # fused tiles whose log-sum-exp is too large to recompute P from: only where P is
    # recomputed later or the log-sum-exp is returned (the output itself is fine)
    if fused_ok and cfg.exact_single_keys:
        large = (shift + rel).abs()
        large = large.masked_fill(~torch.isfinite(large), 0.0) >= LARGE_LSE[acc_dtype]
        if bool(large.any()):
            rows = large.any(0).any(0)
            for ti, tile in enumerate(cfg.tiles):
                if cfg.modes[ti] == FUSED and bool(rows[tile.r0:tile.r1].any()):
                    cfg.modes[ti] = EAGER
                    tile_forward(cfg, ti, tile, q, kv, params, acc_dtype, EAGER, out, shift,
                                  rel, acc_dtype, sink)
    cfg.additive.release()  # not held until backward
    cfg.work.release()
    return out, shift, rel


def could_see_one_key(bias, tile: Tile) -> bool:
    """Cheap test before counting: only a tile without a FULL block (or with a float mask
    as ``bias``, which may hold -inf anywhere) can have a row that sees a single key."""
    if not tile.segments:
        return False
    if bias is not None and bias.may_mask:
        return True
    return not any((seg.covered or not seg.masked) and seg.width > 1
                   for seg in tile.segments)


def run_forward(cfg, run: Run, q, k, v, params, add_dtype, out, shift, rel, acc_dtype, sink):
    """A run of equal tiles as one fused call per segment: queries and keys as strided
    tile views (no copies), the run's tiles as the kernel's batch dimension, one shared
    additive tile; then one vectorised merge into the output rows."""
    first = cfg.tiles[run.start]
    n, nq = run.stop - run.start, first.r1 - first.r0
    rows = slice(first.r0, first.r0 + n * nq)
    # the shared additive tile, compact: the kernel reads it once per tile of the run
    extras = [t._replace(add=t.add.contiguous()) if t.add is not None and t.how == PLAIN else t
              for t in (cfg.additive.fused(first, seg, params, add_dtype)
                        for seg in first.segments)]
    for b in range(q.shape[0]):
        qt = tiles_view(q, b, first.r0, n, nq, nq)
        parts = []
        for seg, step, (add, alive, how, row_shift) in zip(first.segments, run.steps, extras):
            width = seg.k1 - seg.k0
            ks = tiles_view(k, b, seg.k0, n, width, step)
            vs = tiles_view(v, b, seg.k0, n, width, step)
            if add is not None and add.shape[0] > 1:
                add = add[b:b + 1]
            if alive is not None and alive.shape[0] > 1:
                alive = alive[b:b + 1]
            parts.append(segment_forward(cfg, run.start, 0, qt, ks, vs, add, alive, True, how,
                                         row_shift))
        view = lambda t: t[b, :, rows].unflatten(1, (n, nq)).transpose(0, 1)
        merge_into(view(out), view(shift), view(rel), parts, acc_dtype,
                    None if sink is None else sink[0].view(1, -1, 1))


def tiles_view(t: Tensor, b: int, start: int, count: int, rows: int, step: int) -> Tensor:
    """(count, H, rows, D) strided view of ``t[b]`` (H, N, D): item i is rows
    ``start + i * step ..`` (overlapping windows when step < rows; step 0 repeats them)."""
    x = t[b]
    sh, sn, sd = x.stride()
    return x.as_strided((count, x.shape[0], rows, x.shape[2]), (step * sn, sh, sn, sd),
                        x.storage_offset() + start * sn)
