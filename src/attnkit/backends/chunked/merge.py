"""Merging the parts of one tile's rows computed over disjoint key sets.

Eager parts are unnormalised sums ``P V`` with their row maximum and denominator, merged
as the textbook normalises, once:

    out = sum_i e_i pv_i / sum_i e_i denom_i,   e_i = exp(shift_i - max_j shift_j)

Fused parts are normalised, with their log-sum-exp, merged by the log-sum-exp rule:

    lse = log sum_i exp(lse_i),   out = sum_i exp(lse_i - lse) out_i
"""

from __future__ import annotations

import torch
from torch import Tensor

from .additive import NEG_INF
from .kernels import Part

__all__ = ["merge_into", "merge_sums", "weighted_sum", "MERGE_CHUNK"]

#: outputs larger than this (elements) are merged one head at a time
MERGE_CHUNK = 1 << 20


def merge_into(out: Tensor, shift: Tensor, rel: Tensor, parts: list, acc_dtype,
                sink: Tensor | None = None) -> None:
    """Merge the :class:`~.kernels.Part` s of one tile over disjoint key sets (and a sink logit,
    a key with no value) straight into the tile's rows of ``out`` (B, H, n, Dv) and its
    statistics ``shift``, ``rel`` (B, H, n), so that ``shift + rel`` is the log-sum-exp of
    all the scores and each row is rounded to the output dtype once. Rows that see no
    key anywhere get zeros and rel = -inf.

    Eager parts merge as sums, ``out = sum_i e_i pv_i / sum_i e_i denom_i`` with
    ``e_i = exp(shift_i - max shift)``; fused parts as log-sum-exps,
    ``out = sum_i exp(lse_i - lse) out_i``."""
    if all(p.denom is not None for p in parts):
        if sink is not None:
            parts = parts + [Part(None, sink, torch.zeros((), dtype=rel.dtype, device=rel.device),
                                   torch.ones((), dtype=rel.dtype, device=rel.device))]
        merge_sums(out, shift, rel, parts, acc_dtype)
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
    weighted_sum(out, valued, acc_dtype)


def merge_sums(out, shift, rel, parts, acc_dtype):
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


def weighted_sum(out, valued, acc_dtype):
    """out = sum of o * w over (o, w) pairs, accumulated in the compute dtype."""
    if not valued:
        out.zero_()
        return
    if out.dtype == acc_dtype and valued[0][0].shape == out.shape:
        torch.mul(valued[0][0], valued[0][1], out=out)
        for o, w in valued[1:]:
            out.addcmul_(o, w)
        return
    if out.dim() == 4 and out.shape[1] > 1 and out.numel() > MERGE_CHUNK:
        # a tall tile's rows, one head at a time: the float32 temporaries stay a head's
        # share of the tile (peak memory follows the tile, not the tile times heads)
        for h in range(out.shape[1]):
            weighted_sum(out[:, h:h + 1], [(_head(o, h), _head(w, h)) for o, w in valued],
                         acc_dtype)
        return
    acc = valued[0][0].to(acc_dtype) * valued[0][1].to(acc_dtype)
    for o, w in valued[1:]:
        acc.addcmul_(o.to(acc_dtype), w.to(acc_dtype))
    out.copy_(acc)


def _head(t: Tensor, h: int) -> Tensor:
    return t if t.dim() < 4 or t.shape[1] == 1 else t[:, h:h + 1]
