"""Tiled online-softmax attention, the entry points: never materialises the L x S
score matrix, in the forward or the backward.

:func:`chunked_attention` plans the tiles (:mod:`.plan`), runs the forward
(:mod:`.forward`) and the recomputing backward (:mod:`.backward`) as one autograd
function, and recomputes the weights when asked. Memory is O(tile) beyond Q, K, V, the
output and the row statistics; time follows the key blocks the mask allows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...bias import Bias
from ...dtypes import HALF, compute_dtype, matmul_dtype, stat_dtype
from ...masks import EMPTY, FULL, Grid, Mask
from .additive import NEG_INF, AdditiveTiles
from .backward import backward as backward_pass
from . import fused
from .forward import could_see_one_key, forward as forward_pass
from .kernels import Call, KeyValues, bounded_scores, dropout_keep, like_query, scores
from .plan import (BLOCK_K, BLOCK_Q, BLOCK_Q_EAGER_HALF, BLOCK_Q_HALF, MAX_SEGMENT_KEYS,
                   block_view, cuts, plan_tiles)

__all__ = ["chunked_attention", "chunked_attention_backward", "weights", "tile_sizes",
           "planned_entries", "tall_rows", "causal_prefix"]


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cfg, *params):
        out, shift, rel = forward_pass(q, k, v, sinks, cfg, params)
        ctx.save_for_backward(q, k, v, out, shift, rel, sinks, *params)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, (shift + rel).to(stat_dtype(q.dtype))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, shift, rel, sinks, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks, dparams = backward_pass(dout, dlse, q, k, v, out, shift, rel, sinks,
                                                ctx.cfg, params)
        return (dq, dk, dv, dsinks, None, *dparams)


def weights(q, k, sinks, cfg: Call, params) -> Tensor:
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
    keys = KeyValues(k, k, Hq)
    for ti, tile in enumerate(cfg.tiles):
        r = slice(tile.r0, tile.r1)
        for si, seg in enumerate(tile.segments):
            s, _ = scores(q[:, :, r], seg.read(keys)[0], cfg)
            add, _ = cfg.additive.get(tile, seg, params, acc)
            if add is not None:
                s = s + add
            s = s.expand(B, Hq, *s.shape[2:])
            keep = None
            if keep_all is not None:
                keep = (dropout_keep(cfg, ti, si, s.shape, s.device) / (1 - cfg.dropout_p)).to(acc)
            s_all[:, :, r] = seg.place(s_all[:, :, r], s)
            if keep is not None:
                keep_all[:, :, r] = seg.place(keep_all[:, :, r], keep)
    s_all = s_all[..., :S]
    if sinks is not None:
        s_all = torch.cat([s_all, sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, L, 1)], -1)
    dead = (s_all == NEG_INF).all(-1, keepdim=True)
    w = torch.softmax(s_all.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)[..., :S]
    if keep_all is not None:
        w = w * keep_all[..., :S]
    return w.to(q.dtype)


def chunked_attention(query: Tensor, key: Tensor, value: Tensor, *, mask: Mask | None = None,
                      bias: Bias | None = None, scale: float, softcap: float | None = None,
                      sinks: Tensor | None = None, dropout_p: float = 0.0,
                      return_weights: bool = False, block_q: int | None = None,
                      block_k: int | None = None, grid: Grid | None = None,
                      need_lse: bool = True):
    """Tiled attention on (B, Hq, L, D) query and (B, Hkv, S, D) key/value.

    Returns ``(out, weights_or_None, lse)`` with out (B, Hq, L, Dv) and lse (B, Hq, L)
    (-inf for rows that see nothing; those rows output zeros). ``grid`` carries the
    query positions and the bias dtype (default: bottom-right, the input's accumulation
    type). ``need_lse=False``: the caller discards lse, which may then be off by float32
    rounding in rows that see a single key (their outputs stay exact).

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
                                 dropout_p=dropout_p)
        if done is not None:
            return done
    params = tuple(bias.params) if bias is not None else ()
    backward_follows = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, sinks, *params))
    half_products = (query.dtype in HALF and not backward_follows
                     and matmul_dtype(query.dtype, query.device) == query.dtype)
    rows, tall = BLOCK_Q, False
    if block_q is None and half_fused_rows(query, key, value, bias, softcap, dropout_p,
                                           sinks, params):
        rows = tall_rows(mask, grid, causal_flag=scale > 0 and (
            bias is None or bias.affine_below_diagonal))
        tall = rows > BLOCK_Q  # fused tiles taller than the default
    elif half_products:
        # the eager kernel on half products: its GEMMs of 256 rows run ~1.5x faster than
        # of 128 (bf16 softcap, causal at 8192: 513 -> 447 ms), for a float32 score
        # tile of (B, H, 256, keys)
        rows = BLOCK_Q_EAGER_HALF
    block_q, block_k = tile_sizes(mask, block_q, block_k, rows)
    # a bias's full blocks carry its tile anyway: merged with their partial neighbours
    # they make one call; tall tiles keep them apart, for the causal flag on the diagonal
    # (a translation-invariant bias is a Hankel view there, not a tile)
    merge = bias is not None and not (tall and bias.translation_invariant)
    # tall tiles of translation-invariant terms carry no tiles (Hankel views): their
    # segments may be twice as wide as the tiles are tall, so a diagonal square stays
    # whole and the kernel's calls stay few (bf16 at 8192: one call per tile row, T5
    # 282 -> 261 ms, dense 249 -> 233, against 4096-key segments)
    max_keys = MAX_SEGMENT_KEYS
    if tall and all(o is None or o.translation_invariant for o in (mask, bias)):
        max_keys = max(MAX_SEGMENT_KEYS, 2 * block_q)
    tiles = plan_tiles(mask, grid, block_q, block_k, merge_full_and_partial=merge,
                       max_keys=max_keys)
    # the EXACT kernel for rows that see one key: only for what a forward alone does not
    # need exactly (see Call.exact_single_keys)
    exact_single_keys = need_lse or return_weights or backward_follows
    if tall and block_q > BLOCK_Q and exact_single_keys:
        # a tall tile with a row that may see one key runs EXACT, on the eager kernel:
        # such a tile (a causal pattern's first) loses its first BLOCK_Q rows to a tile
        # of their own, and the rest (which then sees a full block) stays fused
        first_rows = tuple(t.p0 + BLOCK_Q for t in tiles
                           if t.r1 - t.r0 > BLOCK_Q and could_see_one_key(bias, t))
        if first_rows:
            tiles = plan_tiles(mask, grid, block_q, block_k, merge_full_and_partial=merge,
                               extra_q=first_rows, max_keys=max_keys)
    seed = 0
    if dropout_p > 0:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    cfg = Call(grid, tiles, mask, bias, float(scale), softcap, float(dropout_p), seed,
               AdditiveTiles(grid, tiles, mask, bias, separable=query.dtype in HALF,
                             causal_flag=scale > 0),
               half_products=half_products,
               sink_grad=backward_follows and sinks is not None and sinks.requires_grad,
               exact_single_keys=exact_single_keys,
               fixed_scale=bounded_scores(softcap, bias, query.dtype if half_products
                                          else compute_dtype(query.dtype)))
    out, lse = _ChunkedAttention.apply(query, key, value, sinks, cfg, *params)
    w = weights(query, key, sinks, cfg, params) if return_weights else None
    return out, w, lse


def half_fused_rows(query, key, value, bias, softcap, dropout_p, sinks, params) -> bool:
    """Whether a call's tiles are tall (:func:`tall_rows`): half precision inputs on a CPU
    that multiplies them fast, every tile on the fused kernel, and nothing that sends
    tiles to the eager kernel, whose float32 score tiles grow with the rows. Measured
    with bf16 on AMX: the kernel reaches its GEMM rate only from about 768 query rows
    per call (128 rows run at half the rate of 1024), and its causal flag skips blocks of
    256 x 512, which waste less of a tall diagonal tile than of a short one (chunked
    causal at 16384, OMP_WAIT_POLICY=PASSIVE: 1.35x torch's time with 2048-row tiles,
    1.27x with 4096). The cost of a tall tile: where the forward must recompute one on
    the eager kernel (a log-sum-exp too large for the fused statistics), its float32
    score tile is (B, H, rows, keys)."""
    if query.dtype not in HALF or matmul_dtype(query.dtype, query.device) != query.dtype:
        return False
    if softcap is not None or dropout_p > 0 or sinks is not None:
        return False
    if any(p.requires_grad for p in params) and torch.is_grad_enabled():
        return False
    if bias is not None and not fused.takes_float32_masks(query.dtype):
        return False
    return fused.usable(query, key, value)


def tile_sizes(mask: Mask | None, block_q: int | None = None,
               block_k: int | None = None, rows: int = BLOCK_Q) -> tuple[int, int]:
    """The (query rows, key columns) of the engine's tiles for ``mask``, unless given;
    ``rows``: the query rows of a tile the mask does not size (BLOCK_Q, or
    :func:`tall_rows` where :func:`half_fused_rows`)."""
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
        block_q = rows if natural is None else (
            natural if natural >= 64 or mask.translation_invariant
            else natural * -(-rows // natural))
    return block_q, block_k


def planned_entries(mask: Mask | None, grid: Grid, rows: int = BLOCK_Q) -> int:
    """The score entries per (batch, head) the engine's tiles would compute for this
    call (tiles of ``rows`` query rows where the mask does not size them), read from the
    mask's block states without building the plan."""
    if mask is None or grid.q_len == 0 or grid.k_len == 0:
        return grid.q_len * grid.k_len
    qb, kb = cuts(grid, *tile_sizes(mask, rows=rows))
    return block_view(mask, grid, qb, kb).computed_entries()


#: a taller tile is taken while it computes at most this many times the entries of
#: BLOCK_Q-row tiles (the kernel's rate rises with the rows: see :func:`half_fused_rows`)
TALL_WASTE = 1.5


def tall_rows(mask: Mask | None, grid: Grid, causal_flag: bool = False) -> int:
    """The query rows of tall tiles for this mask: the tallest of BLOCK_Q_HALF, half of
    it, ... down to BLOCK_Q whose tiles compute at most TALL_WASTE times the entries of
    BLOCK_Q-row tiles. A narrow band keeps short tiles (a +-256 window: 256 rows), a
    causal pattern or no mask the tallest. One block view at BLOCK_Q rows: a taller
    tile's key blocks are the union of its short tiles' (their cuts align).
    ``causal_flag``: the bias (if any) lets a causal diagonal's square run on the
    kernel's causal flag, which skips its upper triangle (see :func:`causal_prefix`)."""
    if mask is None or grid.q_len == 0 or grid.k_len == 0:
        return BLOCK_Q_HALF
    fine_q, block_k = tile_sizes(mask, rows=BLOCK_Q)
    if fine_q != BLOCK_Q or tile_sizes(mask, rows=BLOCK_Q_HALF)[0] != BLOCK_Q_HALF:
        return BLOCK_Q  # the mask sizes its own tiles
    qb, kb = cuts(grid, BLOCK_Q, block_k)
    view = block_view(mask, grid, qb, kb)
    if causal_flag and mask.translation_invariant and causal_prefix(view):
        return BLOCK_Q_HALF
    seen = view.seen.any(0).cpu()                                  # (tiles, key blocks)
    widths = torch.tensor(kb[1:]) - torch.tensor(kb[:-1])
    heights = torch.tensor(qb[1:]) - torch.tensor(qb[:-1])
    starts = torch.tensor(qb[:-1])
    least = view.computed_entries()
    rows = BLOCK_Q_HALF
    while rows > BLOCK_Q:
        group = torch.div(starts, rows, rounding_mode="floor")
        group = group - group[0]
        n = int(group[-1]) + 1
        union = torch.zeros(n, seen.shape[1], dtype=torch.long).index_add_(
            0, group, seen.long()) > 0
        tall = torch.zeros(n, dtype=torch.long).index_add_(0, group, heights)
        if int(((union.long() * widths).sum(-1) * tall).sum()) <= TALL_WASTE * least:
            break
        rows //= 2
    return rows


def causal_prefix(view) -> bool:
    """Whether every row block sees a prefix of the key blocks, all FULL but its last (a
    causal pattern from key 0 on, as ``masks.causal()`` draws it): tall tiles then
    compute no more than short ones, their diagonal squares on the kernel's causal
    flag (which skips the upper triangle) and everything left of them full."""
    states = view.union_states.cpu()
    seen = states != EMPTY
    count = seen.sum(-1, keepdim=True)
    index = torch.arange(states.shape[-1])
    prefix = bool((seen == (index < count)).all())
    return prefix and bool(((states == FULL) | (index >= count - 1)).all())


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
    out = like_query(query, value.shape[-1])
    lse = torch.empty(B, Hq, L, dtype=stat_dtype(query.dtype), device=query.device)
    off = S - L
    for heads, kv_heads, d, inner in plans:
        hs, ks = _head_index(heads, query.device), _head_index(kv_heads, query.device)
        q, k, v = query[:, hs], key[:, ks], value[:, ks]
        if d > 1 and L % d == 0 and S % d == 0 and off % d == 0:
            # every class has L/d rows and S/d keys: the d classes run as one batch
            o, _, l = chunked_attention(_classes_as_batch(q, d), _classes_as_batch(k, d),
                                        _classes_as_batch(v, d), mask=inner, **kw)
            out[:, hs] = _batch_as_classes(o, d)
            lse[:, hs] = _batch_as_classes(l.unsqueeze(-1), d).squeeze(-1)
            continue
        for r in range(d):
            i0 = (r - off) % d
            if i0 >= L:
                continue
            o, _, l = chunked_attention(q[:, :, i0::d], k[:, :, r::d], v[:, :, r::d],
                                        mask=inner, **kw)
            out[:, hs, i0::d] = o
            lse[:, hs, i0::d] = l
    return out, None, lse


def _classes_as_batch(x: Tensor, d: int) -> Tensor:
    """(B, H, n, D) -> (d * B, H, n / d, D): rows r, r + d, r + 2d, ... as batch entry
    r * B + b (a copy)."""
    B, H, n, D = x.shape
    return x.view(B, H, n // d, d, D).permute(3, 0, 1, 2, 4).reshape(d * B, H, n // d, D)


def _batch_as_classes(x: Tensor, d: int) -> Tensor:
    """The inverse of :func:`_classes_as_batch`."""
    dB, H, m, D = x.shape
    return x.view(d, dB // d, H, m, D).permute(1, 2, 3, 0, 4).reshape(dB // d, H, m * d, D)


def chunked_attention_backward(dout: Tensor, query: Tensor, key: Tensor, value: Tensor,
                               out: Tensor, lse: Tensor, *, mask: Mask | None = None,
                               scale: float, block_q: int | None = None,
                               block_k: int | None = None):
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
    cfg = Call(grid, tiles, mask, None, float(scale), None, 0.0, 0,
               AdditiveTiles(grid, tiles, mask, None))
    dq, dk, dv, _, _ = backward_pass(dout, None, query, key, value, out, None, lse, None, cfg, ())
    return dq, dk, dv
