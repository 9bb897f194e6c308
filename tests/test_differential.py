"""The differential campaign: random attention calls against an oracle written apart
from attnkit.

Each case draws shapes (batch dims, grouped and multi-query heads, L != S, value head
dims), a dtype, a mask (every mask kind, dense bool tensors of broadcast shapes, and
compositions with & and |), a bias (ALiBi per head or per batch, T5 buckets, dense
tensors, additive float masks with -inf and finfo.min rows), softcap, sinks, scale,
is_causal, and what to return (lse, weights, gradients). The mask and bias are built
twice: as attnkit objects, and as dense tensors by the formulas below (not attnkit's).
Every backend that accepts the call is compared with the float64 oracle
(``attention_oracle.attention``) by FlashAttention's rule: its error may be at most twice
that of the same math done by torch in the test dtype, plus FlashAttention's rounding
slack; outputs, lse, weights and the gradients of q, k, v, sinks and dense biases. A
backend that cannot honour the call must raise NotImplementedError; ``auto`` never may.

* fast slice: part of the default test run (``FAST_EXAMPLES`` cases);
* the long run: ``python -m pytest -m fuzz tests/test_differential.py`` runs
  ``ATTNKIT_FUZZ_EXAMPLES`` cases (default 10000); ``--hypothesis-seed=N`` picks the
  seed, and a failure prints the ``@reproduce_failure`` line that replays it. The
  terminal summary gives the case count and the slowest 5%.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import bias as ak_bias
from attnkit import masks as M
from attnkit.positional import T5RelativeBias
from attention_oracle import (attention, fa_close, flash_gradients, gradient_magnitudes,
                              t5_bucket)

FAST_EXAMPLES = 300
LONG_EXAMPLES = int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", "10000"))
BACKENDS = ("reference", "chunked", "torch", "auto")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

#: what the campaign measured: (seconds, description) per case, read by conftest's summary
RECORD: list = []


Tensor = torch.Tensor


# ------------------------------------------------------------------ the oracle's masks

def default_positions(B: int, L: int, S: int) -> Tensor:
    return (torch.arange(L) + (S - L)).view(1, L).expand(B, L)


@dataclass
class Spec:
    """A mask or bias: the attnkit object, and the oracle's dense (B, Hq, L, S) tensor
    computed from query positions ``pos`` (B, L) by the formula in ``dense``."""
    kind: str
    make: object                    # () -> attnkit object
    dense: object                   # (pos (B, L)) -> (B|1, Hq|1, L, S) tensor
    positions: object = None        # (B, L, S) -> (B, L) query positions it declares
    describe: str = ""


def mask_specs(draw, B, Hq, L, S):
    """One leaf mask spec."""
    kind = draw(st.sampled_from(["causal", "window", "dilated", "global", "padding",
                                 "ragged", "key_padding", "document", "packed_cross",
                                 "block_sparse", "bigbird", "tensor"]))
    k = torch.arange(S).view(1, 1, 1, S)
    if kind == "causal":
        return Spec(kind, M.causal, lambda pos: k <= pos[:, None, :, None])
    if kind == "window":
        left = draw(st.integers(-4, 12))
        right = draw(st.integers(-4, 12))
        return Spec(kind, lambda: M.sliding_window(left, right),
                    lambda pos: (k >= pos[:, None, :, None] - left) & (k <= pos[:, None, :, None] + right),
                    describe=f"window({left},{right})")
    if kind == "dilated":
        left, right = draw(st.integers(0, 4)), draw(st.integers(0, 4))
        per_head = draw(st.booleans()) and Hq > 1
        dil = [draw(st.integers(1, 3)) for _ in range(Hq)] if per_head else draw(st.integers(1, 3))
        d = torch.tensor(dil if per_head else [dil]).view(1, -1, 1, 1)

        def dense(pos):
            rel = k - pos[:, None, :, None]
            return (rel % d == 0) & (rel >= -left * d) & (rel <= right * d)
        return Spec(kind, lambda: M.dilated(left, right, dil), dense,
                    describe=f"dilated({left},{right},{dil})")
    if kind == "global":
        idx = sorted(set(draw(st.lists(st.integers(0, S - 1), min_size=0, max_size=3))))
        flags = torch.zeros(S + 200, dtype=torch.bool)
        flags[idx] = True

        def dense(pos):
            p = pos[:, None, :, None]
            qg = flags[p.clamp(0, S)] & (p >= 0) & (p < S)
            return qg | flags[:S].view(1, 1, 1, S)
        return Spec(kind, lambda: M.global_tokens(idx), dense, describe=f"global{idx}")
    if kind in ("padding", "ragged"):
        lengths = torch.tensor([draw(st.integers(0, S)) for _ in range(B)])
        if kind == "padding":
            return Spec(kind, lambda: M.padding(lengths),
                        lambda pos: k < lengths.view(-1, 1, 1, 1),
                        describe=f"padding({lengths.tolist()})")
        qls = torch.tensor([draw(st.integers(0, min(L, int(n)))) for n in lengths])
        return Spec(kind, lambda: M.padding(lengths, qls),
                    lambda pos: (k < lengths.view(-1, 1, 1, 1))
                    & (pos[:, None, :, None] < lengths.view(-1, 1, 1, 1)),
                    positions=lambda B_, L_, S_: torch.arange(L_).view(1, -1)
                    + (lengths - qls).view(-1, 1),
                    describe=f"padding({lengths.tolist()}, query_lengths={qls.tolist()})")
    if kind == "key_padding":
        pad = torch.tensor([[draw(st.booleans()) for _ in range(S)] for _ in range(B)])
        return Spec(kind, lambda: M.key_padding(pad), lambda pos: ~pad.view(B, 1, 1, S),
                    describe="key_padding")
    if kind == "document":
        sizes = _sizes(draw, S)
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

        def dense(pos):
            p = pos[:, None, :, None]
            inside = (p >= 0) & (p < S)
            return inside & (ids[p.clamp(0, S - 1)] == ids.view(1, 1, 1, S))
        return Spec(kind, lambda: M.document(ids), dense, describe=f"document{sizes}")
    if kind == "packed_cross":
        n = draw(st.integers(1, 4))
        q_sizes, k_sizes = _split(draw, L, n), _split(draw, S, n)
        cq = torch.tensor([0] + q_sizes).cumsum(0)
        ck = torch.tensor([0] + k_sizes).cumsum(0)
        q_ids = torch.repeat_interleave(torch.arange(n), torch.tensor(q_sizes))
        k_ids = torch.repeat_interleave(torch.arange(n), torch.tensor(k_sizes))

        def positions(B_, L_, S_):
            # each document's queries bottom-right against its own keys
            i = torch.arange(L_)
            return (i + ck[1:][q_ids] - cq[1:][q_ids]).view(1, -1)
        return Spec(kind, lambda: M.packed(cq, ck),
                    lambda pos: q_ids.view(1, 1, L, 1) == k_ids.view(1, 1, 1, S),
                    positions=positions, describe=f"packed({q_sizes}, {k_sizes})")
    if kind == "block_sparse":
        bs = draw(st.integers(1, 8))
        nb = -(-S // bs)
        per_head = draw(st.booleans()) and Hq > 1
        g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
        layout = torch.rand((Hq if per_head else 1), nb, nb, generator=g) < 0.5

        def dense(pos):
            p = pos[:, None, :, None]
            qb = (p // bs).clamp(0, nb - 1)
            hh = torch.arange(layout.shape[0]).view(1, -1, 1, 1)
            return layout[hh, qb, (k // bs)] & (p >= 0) & (p < nb * bs)
        return Spec(kind, lambda: M.block_sparse(layout if per_head else layout[0], bs), dense,
                    describe=f"block_sparse(bs={bs})")
    if kind == "bigbird":
        bs = draw(st.integers(1, 8))
        heads = Hq if (draw(st.booleans()) and Hq > 1) else None
        seed = draw(st.integers(0, 100))
        mk = lambda: M.bigbird(bs, 3, 2, 1, seed=seed, num_heads=heads)
        layout = mk().layout(S)  # the seeded layout is data the API defines; the rule is ours
        nb = layout.shape[-1]

        def dense(pos):  # query block p // bs for positions the layout's rows cover
            p = pos[:, None, :, None]
            hh = torch.arange(layout.shape[0]).view(1, -1, 1, 1)
            return layout[hh, (p // bs).clamp(0, nb - 1), k // bs] & (p >= 0) & (p < nb * bs)
        return Spec(kind, mk, dense, describe=f"bigbird(bs={bs}, heads={heads})")
    # a dense bool tensor of a broadcast shape, given as attn_mask (not an object)
    shape = _broadcast_shape(draw, B, Hq, L, S)
    g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
    t = torch.rand(shape, generator=g) < draw(st.sampled_from([0.3, 0.7, 0.95]))
    return Spec(kind, lambda: t, lambda pos: t.view(_as4(shape)), describe=f"tensor{shape}")


def _sizes(draw, S):
    sizes, left = [], S
    while left > 0:
        n = draw(st.integers(1, left))
        sizes.append(n)
        left -= n
    return sizes


def _split(draw, total, n):
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n - 1, max_size=n - 1)))
    edges = [0] + cuts + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


def _broadcast_shape(draw, B, Hq, L, S):
    """A right-aligned broadcastable shape for (B, Hq, L, S): 2-D, 3-D or 4-D, 1s allowed."""
    rank = draw(st.sampled_from([2, 3, 4]))
    full = (B, Hq, L, S)[4 - rank:]
    return tuple(n if draw(st.booleans()) or n == 1 else 1 for n in full)


def _as4(shape):
    return (1,) * (4 - len(shape)) + tuple(shape)


# ------------------------------------------------------------------ the oracle's biases

def bias_spec(draw, B, Hq, L, S, dtype):
    kind = draw(st.sampled_from(["alibi", "alibi_batch", "t5", "tensor", "float_mask"]))
    k = torch.arange(S).view(1, 1, 1, S)
    if kind in ("alibi", "alibi_batch"):
        if kind == "alibi":
            slopes = ak_bias.alibi_slopes(Hq)
            sl = slopes.double().view(1, Hq, 1, 1)
        else:
            g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
            slopes = torch.rand(B, Hq, generator=g)
            sl = slopes.double().view(B, Hq, 1, 1)
        return Spec(kind, lambda: ak_bias.alibi(Hq, slopes),
                    lambda pos: -sl * (pos[:, None, :, None] - k).abs().double())
    if kind == "t5":
        bidirectional = draw(st.booleans())
        buckets, dist = draw(st.sampled_from([(8, 20), (32, 128)]))
        torch.manual_seed(draw(st.integers(0, 10 ** 6)))
        table = T5RelativeBias(Hq, buckets, dist, bidirectional=bidirectional)
        with torch.no_grad():
            table.embedding.weight.normal_()
        w = table.embedding.weight.detach().double()

        def dense(pos):  # (B, 1, L, S) buckets -> (B, 1, L, S, H) -> (B, H, L, S)
            rel = k - pos[:, None, :, None]
            return w[t5_bucket(rel, bidirectional, buckets, dist)].squeeze(1).permute(0, 3, 1, 2)
        return Spec(kind, lambda: table.bias(L, S), dense,
                    describe=f"t5({buckets},{dist},bi={bidirectional})")
    shape = _broadcast_shape(draw, B, Hq, L, S)
    g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "float_mask":  # additive masking: -inf, and transformers' finfo.min rows
        low = draw(st.sampled_from([float("-inf"), torch.finfo(torch.float32).min, -1e9]))
        t = torch.where(torch.rand(shape, generator=g) < 0.3, low, 0.0).double()
        if len(shape) >= 2 and shape[-2] > 1 and draw(st.booleans()):
            t[..., 0, :] = low  # a whole row masked this way
    return Spec(kind, lambda: t, lambda pos: t.view(_as4(shape)), describe=f"{kind}{shape}")


# ------------------------------------------------------------------ a case

@dataclass
class Case:
    batch: tuple
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    Dv: int
    dtype: torch.dtype
    mask: object = None            # Spec, or ("&"|"|", Spec, Spec)
    bias: Spec | None = None
    float_mask_as_attn_mask: bool = False
    is_causal: bool = False
    scale: float | None = None
    softcap: float | None = None
    sinks: bool = False
    return_lse: bool = False
    return_weights: bool = False
    grad: bool = True
    seed: int = 0

    def describe(self) -> str:
        m = self.mask
        if isinstance(m, tuple):
            m = f"({m[1].describe or m[1].kind} {m[0]} {m[2].describe or m[2].kind})"
        elif m is not None:
            m = m.describe or m.kind
        b = None if self.bias is None else (self.bias.describe or self.bias.kind)
        return (f"{str(self.dtype)[6:]} batch={self.batch} Hq={self.Hq} Hkv={self.Hkv} "
                f"L={self.L} S={self.S} D={self.D} Dv={self.Dv} mask={m} bias={b} "
                f"causal={self.is_causal} scale={self.scale} softcap={self.softcap} "
                f"sinks={self.sinks} lse={self.return_lse} weights={self.return_weights} "
                f"grad={self.grad}")


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(1,), (2,), (3,), (2, 2)]))
    B = math.prod(batch)
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    big = draw(st.integers(0, 9)) == 0  # sometimes several tiles
    L = draw(st.integers(1, 300 if big else 40))
    S = draw(st.integers(1, 300 if big else 40))
    D = draw(st.sampled_from([4, 8, 16, 32]))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from([4, 8, 24]))
    c = Case(batch, Hq, Hkv, L, S, D, Dv, dtype, seed=draw(st.integers(0, 2 ** 31 - 1)))
    which = draw(st.sampled_from(["none", "leaf", "leaf", "and", "or"]))
    if which == "leaf":
        c.mask = mask_specs(draw, B, Hq, L, S)
    elif which in ("and", "or"):
        a, b = mask_specs(draw, B, Hq, L, S), mask_specs(draw, B, Hq, L, S)
        if a.kind != "tensor" and b.kind != "tensor" and not (a.positions and b.positions):
            c.mask = ("&" if which == "and" else "|", a, b)
        else:
            c.mask = a
    if draw(st.integers(0, 2)) == 0:
        c.bias = bias_spec(draw, B, Hq, L, S, dtype)
        # an additive float mask given as attn_mask itself, the way transformers does
        c.float_mask_as_attn_mask = (c.bias.kind == "float_mask" and c.mask is None
                                     and draw(st.booleans()))
    c.is_causal = draw(st.booleans())
    c.scale = draw(st.sampled_from([None, None, None, 0.3, 1.0, 0.0, -0.5]))
    c.softcap = draw(st.sampled_from([None, None, None, 0.7, 5.0]))
    c.sinks = draw(st.integers(0, 3)) == 0
    c.return_lse = draw(st.booleans())
    c.return_weights = draw(st.integers(0, 3)) == 0
    c.grad = draw(st.integers(0, 3)) != 0
    return c


# ------------------------------------------------------------------ running a case

def _leaves(mask):
    if mask is None:
        return []
    if isinstance(mask, tuple):
        return [mask[1], mask[2]]
    return [mask]


def build(case: Case):
    """(kwargs for attnkit, dense allowed (B, Hq, L, S) bool or None, dense bias or None,
    positions (B, L)) for one case."""
    B = math.prod(case.batch)
    L, S, Hq = case.L, case.S, case.Hq
    pos = default_positions(B, L, S)
    for leaf in _leaves(case.mask):
        if leaf.positions is not None:
            pos = leaf.positions(B, L, S).expand(B, L)
    allowed = None
    attn_mask = None
    if isinstance(case.mask, tuple):
        op, a, b = case.mask
        attn_mask = a.make() & b.make() if op == "&" else a.make() | b.make()
        da, db = a.dense(pos), b.dense(pos)
        allowed = (da & db) if op == "&" else (da | db)
    elif case.mask is not None:
        attn_mask = case.mask.make()
        if case.mask.kind == "tensor":
            attn_mask = attn_mask.view(*_fold_batch(attn_mask.shape, case.batch))
        allowed = case.mask.dense(pos)
    if case.is_causal:
        c = torch.arange(S).view(1, 1, 1, S) <= pos[:, None, :, None]
        allowed = c if allowed is None else allowed & c
    if allowed is not None:
        allowed = allowed.expand(B, Hq, L, S)
    bias_obj = dense_bias = None
    if case.bias is not None:
        bias_obj = case.bias.make()
        dense_bias = case.bias.dense(pos).expand(B, Hq, L, S)
        if case.bias.kind in ("tensor", "float_mask"):
            bias_obj = bias_obj.view(*_fold_batch(bias_obj.shape, case.batch))
    kwargs = dict(is_causal=case.is_causal, scale=case.scale, softcap=case.softcap,
                  return_lse=case.return_lse, return_weights=case.return_weights)
    if case.float_mask_as_attn_mask:
        kwargs.update(attn_mask=bias_obj, bias=None)
    else:
        kwargs.update(attn_mask=attn_mask, bias=bias_obj)
    return kwargs, allowed, dense_bias, pos


def _fold_batch(shape, batch):
    """A tensor mask or bias drawn for folded batch B, shaped for the call's batch dims."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] > 1 and len(batch) > 1:
        return (*batch, *shape[1:])
    return shape


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(*case.batch, case.Hq, case.L, case.D, generator=g, dtype=torch.float64)
    k = torch.randn(*case.batch, case.Hkv, case.S, case.D, generator=g, dtype=torch.float64)
    v = torch.randn(*case.batch, case.Hkv, case.S, case.Dv, generator=g, dtype=torch.float64)
    sinks = torch.randn(case.Hq, generator=g, dtype=torch.float64) if case.sinks else None
    dout = torch.randn(*case.batch, case.Hq, case.L, case.Dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(*case.batch, case.Hq, case.L, generator=g, dtype=torch.float64)
    return q, k, v, sinks, dout, dlse


def _oracle(case, q, k, v, sinks, allowed, dense_bias, dtype, dout, dlse, **order):
    """Outputs and gradients of the dense formula with every op in ``dtype``."""
    B = math.prod(case.batch)
    flat = lambda t: t.reshape(B, *t.shape[len(case.batch):])
    leaves = [t.detach().to(dtype).requires_grad_(case.grad) for t in (q, k, v)]
    s = None if sinks is None else sinks.detach().to(dtype).requires_grad_(case.grad)
    D = case.D
    scale = 1 / math.sqrt(D) if case.scale is None else case.scale
    bias = None if dense_bias is None else dense_bias.to(dtype)
    with torch.enable_grad():
        out, w, lse = attention(*(flat(t) for t in leaves), allowed, bias, scale,
                                case.softcap, s, **order)
        result = {"out": out, "lse": lse, "weights": w}
        if case.grad:
            loss = (out * flat(dout).to(dtype)).sum()
            if case.return_lse:
                finite = torch.isfinite(lse)
                loss = loss + (torch.where(finite, lse, 0.0) * flat(dlse).to(dtype)).sum()
            wrt = leaves + ([s] if s is not None else [])
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            for name, gr in zip(["dq", "dk", "dv", "dsinks"], grads):
                result[name] = None if gr is None else (gr if name == "dsinks" else flat(gr))
    result = {n: (None if t is None else t.detach()) for n, t in result.items()}
    if case.grad and dtype == torch.float64:
        result["magnitudes"] = gradient_magnitudes(
            *(flat(t.detach()).to(dtype) for t in (q, k, v)), result["weights"],
            flat(dout).to(dtype), scale, flat(dlse).to(dtype) if case.return_lse else None)
    return result


def _flash_peer(case, q, k, v, sinks, allowed, dense_bias, dout, dlse):
    """Gradients of the dense formula in the test dtype, with the softmax correction
    from the stored output (``attention_oracle.flash_gradients``)."""
    B, dt = math.prod(case.batch), case.dtype
    flat = lambda t: t.reshape(B, *t.shape[len(case.batch):]).to(dt)
    scale = 1 / math.sqrt(case.D) if case.scale is None else case.scale
    g = flash_gradients(flat(q), flat(k), flat(v), allowed,
                        None if dense_bias is None else dense_bias.to(dt), scale, case.softcap,
                        None if sinks is None else sinks.to(dt), flat(dout),
                        flat(dlse) if case.return_lse else None)
    return g


def _ours(case, backend, q, k, v, sinks, kwargs, dout, dlse):
    B = math.prod(case.batch)
    flat = lambda t: t.reshape(B, *t.shape[len(case.batch):])
    leaves = [t.detach().to(case.dtype).requires_grad_(case.grad) for t in (q, k, v)]
    s = None if sinks is None else sinks.detach().to(case.dtype).requires_grad_(case.grad)
    kw = dict(kwargs)
    for name in ("attn_mask", "bias"):
        t = kw.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            kw[name] = t.to(case.dtype) if case.dtype != torch.float64 else t
    with torch.enable_grad():
        res = attnkit.scaled_dot_product_attention(*leaves, sinks=s, backend=backend, **kw)
        res = res if isinstance(res, tuple) else (res,)
        out = res[0]
        names = ["out"] + (["weights"] if case.return_weights else []) + \
            (["lse"] if case.return_lse else [])
        result = {n: flat(t) for n, t in zip(names, res)}
        if case.grad:
            loss = (out * dout.to(case.dtype)).sum()
            if case.return_lse:
                lse = res[-1]
                finite = torch.isfinite(lse)
                loss = loss + (torch.where(finite, lse, 0.0) * dlse.to(lse.dtype)).sum()
            wrt = leaves + ([s] if s is not None else [])
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            for name, gr in zip(["dq", "dk", "dv", "dsinks"], grads):
                result[name] = None if gr is None else flat(gr) if name != "dsinks" else gr
    return {n: t.detach() for n, t in result.items() if t is not None}


def check_case(case: Case):
    # inputs as the test dtype holds them: the reference is exact for these (as in
    # FlashAttention's tests, whose reference upcasts the half-precision inputs)
    rounded = lambda t: None if t is None else t.to(case.dtype).double()
    q, k, v, sinks, dout, dlse = (rounded(t) for t in _inputs(case))
    kwargs, allowed, dense_bias, _ = build(case)
    if case.bias is not None and case.bias.kind in ("tensor", "float_mask"):
        dense_bias = rounded(dense_bias)  # given to attnkit in the test dtype
    ref = _oracle(case, q, k, v, sinks, allowed, dense_bias, torch.float64, dout, dlse)
    # the same math done by torch in the test dtype, in its valid orders (in float64 only
    # the reordered ones: the plain order is the reference itself)
    orders = [dict(reorder=True), dict(normalize_after=True),
              dict(normalize_after=True, fold_groups=True), dict(rowwise=True)]
    if case.dtype != torch.float64:
        orders.append({})
    peers = [_oracle(case, q, k, v, sinks, allowed, dense_bias, case.dtype, dout, dlse, **o)
             for o in orders]
    if case.grad:  # and the gradients in the order a flash kernel forms them
        peers.append(_flash_peer(case, q, k, v, sinks, allowed, dense_bias, dout, dlse))
    failures = []
    for backend in BACKENDS:
        try:
            ours = _ours(case, backend, q, k, v, sinks, kwargs, dout, dlse)
        except NotImplementedError as err:
            if backend == "auto":
                failures.append(f"auto raised NotImplementedError: {err}")
            continue
        for name, got in ours.items():
            want = ref.get(name)
            if want is None:
                continue
            same_math = [p[name].float() if name == "lse" else p[name] for p in peers
                         if p.get(name) is not None]
            if got.shape != want.shape:
                failures.append(f"{backend} {name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
                continue
            if not bool(torch.isfinite(got).all()) and name != "lse":
                failures.append(f"{backend} {name}: not finite")
                continue
            ok, account = fa_close(got, want, same_math, case.dtype,
                                   magnitude=ref.get("magnitudes", {}).get(name, 0.0))
            if not ok:
                failures.append(f"{backend} {name}: {account}")
    if failures and os.environ.get("ATTNKIT_FUZZ_DUMP"):  # everything needed to replay it
        torch.save(dict(case=case.describe(), q=q, k=k, v=v, sinks=sinks, dout=dout, dlse=dlse,
                        kwargs=kwargs, allowed=allowed, dense_bias=dense_bias),
                   os.environ["ATTNKIT_FUZZ_DUMP"])
    assert not failures, case.describe() + "\n  " + "\n  ".join(failures)


def _run(case: Case):
    start = time.perf_counter()
    try:
        check_case(case)
    finally:
        RECORD.append((time.perf_counter() - start, case.describe()))


_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@settings(max_examples=FAST_EXAMPLES, derandomize=True, **_SETTINGS)
@given(cases())
def test_backends_agree_with_the_oracle(case):
    """The fast slice: a fixed set of cases every run."""
    _run(case)


@pytest.mark.fuzz
@settings(max_examples=LONG_EXAMPLES, **_SETTINGS)
@given(cases())
def test_campaign(case):
    """The long run (``-m fuzz``): LONG_EXAMPLES cases from --hypothesis-seed."""
    _run(case)
