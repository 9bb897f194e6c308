"""The pieces of blockwise attention that ring attention is built from.

A rank holds query rows at some global positions and receives key/value blocks at other
positions. Each (query rows, key block) pair is one call of the core engine,
``attnkit.scaled_dot_product_attention(..., return_lse=True, backend="chunked")``, which
returns the block's output ``O_i`` and log-sum-exp ``lse_i``; results over disjoint key
sets merge exactly (:func:`merge_into`):

    lse = log(exp(lse_a) + exp(lse_b)),   O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b

:func:`causal_calls` says which calls a causal mask needs for two position intervals, so
blocks entirely in the future are never computed and the diagonal uses the engine's own
(bottom-right aligned) ``is_causal``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import scaled_dot_product_attention
from ..masks import KeyPaddingMask
from .sharding import Interval

__all__ = ["Call", "causal_calls", "block_attention", "merge_into"]

NEG_INF = float("-inf")


class Call(NamedTuple):
    """Query rows ``[q0, q1)`` (local) against keys ``[k0, k1)`` of a block, causal or not."""
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def causal_calls(q: Interval, k: Interval, is_causal: bool) -> list[Call]:
    """The engine calls that cover query interval ``q`` against key interval ``k``.

    Without a causal mask: one full call. With one (query at position p sees keys <= p),
    for q = [a, a+n) and k = [c, c+m):

    * rows at positions < c see nothing: no call;
    * rows at positions [max(a, c), e), e = min(a+n, c+m), see keys c .. p: one call on
      keys [c, e) with ``is_causal=True``. The engine puts query row i at position
      i + (S - L), i.e. the last row level with the last key, which is exactly where these
      rows sit relative to c;
    * rows at positions >= c+m see the whole block: one call without a mask.

    Query indices are local to the shard (``q.local``), key indices local to ``k.local``.
    """
    a, n, c, m = q.start, q.length, k.start, k.length
    if not is_causal:
        return [Call(q.local, q.local + n, k.local, k.local + m, False)]
    calls = []
    lo, e = max(a, c), min(a + n, c + m)
    if lo < e:
        calls.append(Call(q.local + lo - a, q.local + e - a, k.local, k.local + e - c, True))
    full_from = max(a, c + m)
    if full_from < a + n:
        calls.append(Call(q.local + full_from - a, q.local + n, k.local, k.local + m, False))
    return calls


def block_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, is_causal: bool,
                    scale: float | None):
    """``(O, lse)`` of q (B, Hq, L, D) over one key block (B, Hkv, S, D) through the core
    engine; ``keep`` (B, S) bool or None. Rows that see nothing give O = 0, lse = -inf."""
    mask = None if keep is None else KeyPaddingMask(keep)
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                        scale=scale, return_lse=True, backend="chunked")


def merge_into(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold a partial result ``(o, l)`` over new keys into ``(out, lse)`` in place
    (out (B, H, L, Dv), lse (B, H, L)). Rows with lse = -inf on both sides stay 0."""
    new = torch.logaddexp(lse, l)
    dead = new == NEG_INF
    a = torch.exp(lse - new).masked_fill_(dead, 0.0).unsqueeze(-1)
    b = torch.exp(l - new).masked_fill_(dead, 0.0).unsqueeze(-1)
    out.mul_(a.to(out.dtype)).addcmul_(o.to(out.dtype), b.to(out.dtype))
    lse.copy_(new)
