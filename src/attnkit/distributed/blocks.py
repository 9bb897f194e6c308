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
from ..masks import EMPTY, FULL, PARTIAL, Mask
from .sharding import Interval

__all__ = ["Call", "causal_calls", "KeyPaddingMask", "block_attention", "merge_into"]

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


class KeyPaddingMask(Mask):
    """Keys whose ``keep[b, j]`` is False are never seen (a padding mask given per key,
    as ``nn.MultiheadAttention``'s ``key_padding_mask`` but with True = may attend).

    Unlike :func:`attnkit.masks.padding` the padded keys need not form a suffix, which a
    shard of a padded sequence needs (a zigzag shard holds an early and a late chunk).
    ``block_states`` counts kept keys per block with a prefix sum, so fully padded blocks
    are skipped and unpadded ones run without a mask.
    """

    def __init__(self, keep: Tensor):
        if keep.dtype != torch.bool or keep.dim() != 2:
            raise TypeError(f"keep must be a (B, S) bool tensor, got {keep.dtype} of shape "
                            f"{tuple(keep.shape)}")
        self.keep = keep
        self.batch_size = keep.shape[0] if keep.shape[0] > 1 else None
        self._csum = torch.nn.functional.pad(keep.long().cumsum(-1), (1, 0))

    def validate(self, grid):
        if self.keep.shape[-1] != grid.k_len:
            raise ValueError(f"key padding mask covers {self.keep.shape[-1]} keys but the "
                             f"key length is {grid.k_len}")

    def mask_mod(self, grid, b, h, q, k):
        bi = b if self.keep.shape[0] > 1 else torch.zeros_like(b)
        return self.keep[bi, k]

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        lo, hi = k_lo.view(-1), k_hi.view(-1)
        kept = self._csum[:, hi] - self._csum[:, lo]                     # (B, nk)
        width = (hi - lo).view(1, -1)
        st = torch.full(kept.shape, PARTIAL, dtype=torch.int8, device=kept.device)
        st = st.masked_fill(kept == width, FULL).masked_fill(kept == 0, EMPTY)
        st = st.view(st.shape[0], 1, 1, -1)
        return st.expand(st.shape[0], 1, q_lo.shape[0], st.shape[-1])

    def __repr__(self):
        return f"KeyPaddingMask({tuple(self.keep.shape)})"


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
