"""The kernels that compute one segment, and the per-call record they read.

* ``fused``: torch's fused CPU flash kernel (:mod:`.fused`, the one switch
  ``fused.enabled``), when the segment needs nothing it cannot do;
* ``eager``: a few matmuls, the general case: softcap, dropout, learned biases, value
  head dim != query head dim, and any device.

Grouped-query heads are folded into extra rows of their key/value head (:func:`fold`),
so K and V are never copied per query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...bias import Bias
from ...dtypes import HALF, compute_dtype
from ...masks import Grid, Mask
from . import fused
from .additive import CAUSAL, NEG_INF, PLAIN, REVERSED, AdditiveTiles

#: the largest softcap whose scores the eager kernel exponentiates on a fixed scale
#: (see :attr:`Call.fixed_scale`)
FIXED_SCALE_SOFTCAP = 60.0

__all__ = ["Call", "Workspace", "KeyValues", "Part", "fold", "unfold", "scores",
           "dropout_keep", "use_fused", "fused_add_dtype", "bounded_scores",
           "FIXED_SCALE_SOFTCAP", "like_query", "segment_forward", "probabilities",
           "fused_backward"]


class Workspace:
    """Buffers the eager kernel reuses from segment to segment, one per (name, dtype),
    grown to the largest tile: a call's hundreds of (B, H, rows, keys) score tiles then
    allocate, and fault in, their tens of MiB once instead of once per segment (bf16
    softcap at 8192, causal: 860 -> 460 ms in one measurement; glibc hands such blocks
    back to the system on every free)."""

    def __init__(self):
        self._buffers = {}

    def take(self, name: str, shape, dtype: torch.dtype, device) -> Tensor:
        """A contiguous (shape) tensor of ``dtype`` over the buffer ``name``: valid until
        the next ``take`` of that name."""
        n = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = torch.empty(n, dtype=dtype, device=device)
            self._buffers[(name, dtype)] = buf
        return buf[:n].view(shape)

    def release(self) -> None:
        self._buffers.clear()


@dataclass
class Call:
    """What one attention call's tiles are computed with."""
    grid: Grid
    tiles: list
    mask: Mask | None
    bias: Bias | None
    scale: float
    softcap: float | None
    dropout_p: float
    seed: int
    additive: AdditiveTiles
    #: per tile, the kernel the forward used (FUSED, EAGER, EXACT); the backward follows
    modes: list | None = None
    #: the eager kernel's products in the half input dtype (float32 accumulation inside,
    #: the scores rounded once to it, as torch's own half-precision math rounds them):
    #: only for a forward no backward follows, where this CPU multiplies half fast. With
    #: a backward, forward, backward and the fused tiles' statistics must all see the
    #: same exact (float32) products.
    half_products: bool = False
    #: the sinks' gradient is wanted (see :func:`.forward.forward`)
    sink_grad: bool = False

    #: every score lies in (-softcap, softcap) (see :func:`bounded_scores`): the eager
    #: kernel forms P = exp(s) on the fixed scale 0, without a row maximum
    fixed_scale: bool = False
    #: tiles with a row that sees a single key run EXACT (see :mod:`.forward`): needed
    #: where a backward, the log-sum-exp or the weights follow. Otherwise the fused
    #: kernel's output for such a row is exact (its one weight is 1), and so is the
    #: merge (the row's other parts are empty), and only its log-sum-exp is off
    exact_single_keys: bool = True
    #: the eager kernel's reused score buffers (:class:`Workspace`)
    work: Workspace = field(default_factory=Workspace)


class KeyValues:
    """K and V as segments read them: slices for contiguous keys, gathers (and the
    matching scatter-add of gradients) for gathered ones."""

    def __init__(self, k: Tensor, v: Tensor, q_heads: int):
        self.k, self.v, self.q_heads = k, v, q_heads
        self._flat = None

    def _flat_kv(self):
        if self._flat is None:
            B, H, S, _ = self.k.shape
            self._flat = (self.k.contiguous().view(B, H * S, -1),
                          self.v.contiguous().view(B, H * S, -1))
        return self._flat

    def _flat_index(self, index: Tensor) -> Tensor:
        """Per query head h: index into the (B, Hkv * S) rows of kv head h // groups."""
        Hkv, S = self.k.shape[1], self.k.shape[2]
        kv_head = torch.arange(self.q_heads, device=index.device) // (self.q_heads // Hkv)
        return (kv_head.view(-1, 1) * S + index.clamp(min=0)).flatten()

    def slice(self, k0: int, k1: int):
        return self.k[:, :, k0:k1], self.v[:, :, k0:k1]

    def gather(self, index: Tensor):
        n = index.shape[-1]
        if index.shape[0] == 1:  # the same keys for every head: grouped heads still shared
            idx = index[0].clamp(min=0)
            return self.k.index_select(2, idx), self.v.index_select(2, idx)
        kf, vf = self._flat_kv()
        flat = self._flat_index(index)
        B = kf.shape[0]
        return (kf.index_select(1, flat).view(B, self.q_heads, n, -1),
                vf.index_select(1, flat).view(B, self.q_heads, n, -1))

    def add_to_slice(self, k0, k1, dk, dv, gk, gv) -> None:
        """Add a segment's key and value gradients (``gv`` None: keys only)."""
        dk[:, :, k0:k1] += gk
        if gv is not None:
            dv[:, :, k0:k1] += gv

    def add_to_gathered(self, index, dk, dv, gk, gv) -> None:
        pairs = [(dk, gk)] + ([] if gv is None else [(dv, gv)])
        if index.shape[0] == 1:
            idx = index[0].clamp(min=0)
            for acc, g in pairs:
                acc.index_add_(2, idx, g.to(acc.dtype))
            return
        B, Hkv, S, _ = dk.shape
        flat = self._flat_index(index)
        for acc, g in pairs:
            acc.view(B, Hkv * S, -1).index_add_(1, flat,
                                                g.reshape(B, flat.numel(), -1).to(acc.dtype))


def fold(x: Tensor, kv_heads: int) -> Tensor:
    """(B, Hq, n, d) -> (B, Hkv, G*n, d): a query group's heads become extra rows."""
    B, H, n, d = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads) * n, d)


def unfold(x: Tensor, q_heads: int) -> Tensor:
    """(B, Hkv, G*n, d) -> (B, Hq, n, d)."""
    B, _, gn, d = x.shape
    return x.reshape(B, q_heads, gn * x.shape[1] // q_heads, d)


def scores(qt: Tensor, ks: Tensor, cfg: Call, keep_x: bool = True,
           work: Workspace | None = None):
    """Scaled (and soft-capped) scores (B, Hq, nq, nk) in the compute dtype, plus
    x = scale * q k^T / softcap, from which the backward forms softcap's derivative
    (``keep_x=False``: not kept). The products are exact for half inputs (float32, as
    torch's fused kernel forms them: forward, backward and the fused tiles' statistics
    agree; ``cfg.half_products``: see :class:`Call`, the products rounded once to the
    half dtype, and a scale that is a power of two folded into the queries, exactly),
    and the elementwise steps run in place on them; with ``work``, in its buffers (the
    result is valid until the next call with it)."""
    cdt = compute_dtype(qt.dtype)
    mdt = qt.dtype if cfg.half_products else cdt
    c = cfg.softcap
    # half precision inputs with the row maximum: c tanh(x) = 2c sigmoid(2x) - c, with
    # sigmoid cheaper than tanh on some CPUs; its cancellation near x = 0 costs ~1 ulp
    # of c in float32, far below the inputs' own rounding
    sig = c is not None and qt.dtype in HALF and not cfg.fixed_scale
    a = cfg.scale if c is None else cfg.scale / c * (2 if sig else 1)
    qm = qt.to(mdt)
    if cfg.half_products and a > 0 and math.frexp(a)[0] == 0.5:
        # exact in any float dtype; another scale would round every query element, an
        # error that does not cancel where the products do (it stays a float32 pass)
        qm, a = qm * a, 1.0
    km = ks.to(mdt)
    if mdt in HALF:  # a half GEMM copies a strided batch of keys itself, ~2x slower
        km = km.contiguous()
    qm, km = fold(qm, ks.shape[1]), km.transpose(-1, -2)
    differentiable = torch.is_grad_enabled() and (qt.requires_grad or ks.requires_grad)
    if work is None or differentiable:
        s = unfold(torch.matmul(qm, km).to(cdt), qt.shape[1])
    else:
        shape = (*qm.shape[:-1], km.shape[-1])
        s = torch.matmul(qm, km, out=work.take("products", shape, mdt, qm.device))
        if mdt != cdt:
            s = work.take("scores", shape, cdt, qm.device).copy_(s)
        s = unfold(s, qt.shape[1])
    if differentiable:
        return _differentiable_scores(s, qt.dtype, cfg)
    if a != 1.0:
        s.mul_(a)
    if c is None:
        return s, None
    x = None
    if keep_x:
        x = s * 0.5 if sig else s.clone()
    if sig:
        return s.sigmoid_().mul_(2 * c).sub_(c), x
    return s.tanh_().mul_(c), x


def _differentiable_scores(s: Tensor, dtype: torch.dtype, cfg: Call):
    """:func:`scores`' elementwise steps out of place, for autograd (the weights pass).
    Never on half products (they are for a forward no backward follows), so the scale
    is still to apply."""
    assert not cfg.half_products
    if cfg.softcap is None:
        return s * cfg.scale, None
    c = cfg.softcap
    x = s * (cfg.scale / c)
    if dtype in HALF and not cfg.fixed_scale:
        return torch.sigmoid(2 * x) * (2 * c) - c, x
    return torch.tanh(x) * c, x


def bounded_scores(softcap: float | None, bias, p_dtype: torch.dtype) -> bool:
    """Whether the eager kernel may exponentiate on the fixed scale 0: a softcap of at
    most FIXED_SCALE_SOFTCAP and no bias (a mask adds only 0 or -inf) keep every score
    in (-softcap, softcap), so exp(s) lies in [e^-60, e^60], normal in float32 and
    bfloat16, and no pass finds or subtracts a row maximum. ``p_dtype``: the dtype P is
    multiplied with V in (float16, whose range ends at 65504, keeps the row maximum)."""
    return (softcap is not None and 0 < softcap <= FIXED_SCALE_SOFTCAP and bias is None
            and p_dtype != torch.float16)


def dropout_keep(cfg: Call, ti: int, si: int, shape, device) -> Tensor:
    """The dropout keep-mask of segment ``si`` of tile ``ti``: regenerated identically in
    forward, backward and the weights pass from one seed drawn per call."""
    g = torch.Generator(device=device)
    g.manual_seed((cfg.seed * 1_000_003 + ti * 65_537 + si) % (2 ** 63))
    return torch.rand(shape, generator=g, device=device) >= cfg.dropout_p


def use_fused(cfg: Call, q, k, v, need_bias_grad: bool = False) -> bool:
    if cfg.softcap is not None or cfg.dropout_p > 0 or need_bias_grad:
        return False
    if cfg.bias is not None and q.dtype in HALF and not fused.takes_float32_masks(q.dtype):
        return False  # a bias rounded to half precision would change the softmax
    return fused.usable(q, k, v)


def fused_add_dtype(cfg: Call, q: Tensor) -> torch.dtype:
    """The dtype the fused kernel gets a segment's additive tile in: float32 for half
    precision queries where the kernel takes it (see :func:`.fused.takes_float32_masks`:
    a bias is not rounded, and the kernel adds a float32 tile about twice as fast as a
    half one, which it converts first), else the query's own (0/-inf masks are exact in
    any float dtype)."""
    if q.dtype in HALF and fused.takes_float32_masks(q.dtype):
        return torch.float32
    return q.dtype


def like_query(q: Tensor, dv: int) -> Tensor:
    """An empty (B, H, L, dv) output in the query's memory layout: when q is a (B, L, H, D)
    buffer seen as (B, H, L, D), as a layer's projection gives it, so is the output, and
    the layer's transpose back to (B, L, H * dv) is a view rather than a copy."""
    B, H, L, _ = q.shape
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(B, L, H, dv).transpose(1, 2)
    return q.new_empty(B, H, L, dv)


@dataclass
class Part:
    """One segment's contribution to a tile's rows. Fused kernel: ``out`` normalised over
    the segment and its log-sum-exp ``rel`` (``shift`` None). Eager kernel: ``out`` the
    unnormalised sum P V with P = exp(s - shift), ``shift`` each row's largest score and
    ``denom`` the sum of P, so that the merge normalises once, as the textbook does. A
    sink is a part with a logit (``shift``), ``denom`` 1 and no value."""
    out: Tensor | None
    shift: Tensor | None
    rel: Tensor
    denom: Tensor | None = None


def segment_forward(cfg, ti, si, qt, ks, vs, add, alive, with_fused: bool,
                    how: str = PLAIN, row_shift: Tensor | None = None) -> Part:
    """One segment's :class:`Part`; rows that see no key: rel = -inf (denom 0).
    ``how``, ``row_shift``: how the fused kernel takes ``add`` (see
    :class:`.additive.FusedAdd`: REVERSED, a Hankel view over the query rows in reverse
    order; CAUSAL, its own flag) and the per-row part of the term left out of it."""
    if with_fused:
        if how == REVERSED:
            out, lse = fused.forward(qt.flip(-2), ks, vs, add, cfg.scale)
            out, lse = out.flip(-2), lse.flip(-1)
        else:
            out, lse = fused.forward(qt, ks, vs, add, cfg.scale, how == CAUSAL)
        if row_shift is not None:
            lse = lse + row_shift
        if alive is not None:  # the fused kernel reports lse = 0 for rows with no key
            lse = lse.masked_fill(~alive, NEG_INF)
        return Part(out, None, lse)
    s, _ = scores(qt, ks, cfg, keep_x=False, work=cfg.work)
    if add is not None:
        s.add_(add)
    if cfg.fixed_scale:  # scores bounded by the softcap: P on the scale 0
        m = s.new_zeros(s.shape[:-1] + (1,))
        p = s.exp_()
    else:
        m = s.amax(-1, keepdim=True)
        m = torch.where(m == NEG_INF, 0.0, m)
        p = s.sub_(m).exp_()
    denom = p.sum(-1)
    if cfg.dropout_p > 0:
        p = p * dropout_keep(cfg, ti, si, p.shape, p.device) / (1 - cfg.dropout_p)
    if cfg.half_products:
        ph = cfg.work.take("weights", p.shape, vs.dtype, p.device).copy_(p)
        pv = unfold(torch.matmul(fold(ph, vs.shape[1]), vs).to(p.dtype), qt.shape[1])
    else:
        pv = unfold(torch.matmul(fold(p, vs.shape[1]), vs.to(p.dtype)), qt.shape[1])
    return Part(pv, m.squeeze(-1), torch.log(denom), denom)


def probabilities(cfg, qt, ks, add, shift_t, rel_t, acc):
    """P = exp(s + add - shift) / exp(rel) for one segment, with the scores computed as the
    forward's eager kernel computed them, and tanh(s / softcap) for softcap's derivative."""
    s, t = scores(qt, ks, cfg)
    if add is not None:
        s.add_(add)
    if shift_t is None:  # the fused kernel's statistics: lse alone
        return s.sub_(rel_t.unsqueeze(-1).to(acc)).exp_(), t
    # exp(s - shift) / denom as the forward formed it (1/denom = exp(-rel) rounded once,
    # from float64), not exp(s - shift - rel), whose argument rounds with |rel|
    inv = torch.exp(-rel_t.unsqueeze(-1)).to(acc)
    return s.sub_(shift_t.unsqueeze(-1).to(acc)).exp_().mul_(inv), t


def fused_backward(dot, qt, ks, vs, out_t, lse_t, add, scale, how: str = PLAIN):
    """The fused kernel's (dq, dk, dv) of one segment (``how`` as in
    :func:`segment_forward`). In half precision with grouped key/value heads, the kernel
    would sum a group's gradients in the half dtype; it gets the key/value heads
    repeated as views instead, and the group sums run in float32."""
    if how == REVERSED:
        gq, gk, gv = fused_backward(dot.flip(-2), qt.flip(-2), ks, vs, out_t.flip(-2),
                                    lse_t.flip(-1), add, scale)
        return gq.flip(-2), gk, gv
    causal = how == CAUSAL
    Hq, Hkv = qt.shape[1], ks.shape[1]
    if Hq == Hkv or qt.dtype not in HALF:
        return fused.backward(dot, qt, ks, vs, out_t, lse_t, add, scale, causal)
    G = Hq // Hkv
    expand = lambda x: x.unsqueeze(2).expand(x.shape[0], Hkv, G, *x.shape[2:]).reshape(
        x.shape[0], Hq, *x.shape[2:])
    gq, gk, gv = fused.backward(dot, qt, expand(ks), expand(vs), out_t, lse_t, add, scale,
                                causal)
    fold = lambda g: g.float().view(g.shape[0], Hkv, G, *g.shape[2:]).sum(2)
    return gq, fold(gk), fold(gv)
