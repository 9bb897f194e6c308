"""The textbook formula, step by step. It materialises the (L, S) score matrix: it is the
oracle every fast path is tested against, and the code the tour shows.

    scores  = scale * Q K^T                      (B, Hq, L, S)
    scores  = softcap * tanh(scores / softcap)   (optional)
    scores += bias                               (ALiBi, T5, a float mask, ...)
    scores[not allowed] = -inf                   (padding, causal, windows, ...)
    weights = softmax(scores)                    (a row that sees nothing: all zeros)
    out     = dropout(weights) V                 (B, Hq, L, Dv)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bias import Bias
from ..masks import Grid, Mask

__all__ = ["reference_attention"]


def reference_attention(query: Tensor, key: Tensor, value: Tensor, *, mask: Mask | None = None,
                        bias: Bias | None = None, scale: float, softcap: float | None = None,
                        sinks: Tensor | None = None, dropout_p: float = 0.0,
                        grid: Grid | None = None):
    """Returns ``(out, weights, lse)`` for (B, Hq, L, D) query, (B, Hkv, S, D) key/value.
    ``grid`` carries the query positions and the bias dtype (default: bottom-right)."""
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    groups = Hq // key.shape[1]  # grouped-query attention: head h reads kv head h // groups
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    scores = scale * (q @ k.transpose(-2, -1))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if grid is None:
        grid = Grid(L, S, query.device, dtype=work)
    if bias is not None:
        scores = scores + bias.tile(grid, 0, L, 0, S).to(work)
    if mask is not None:
        scores = scores.masked_fill(~mask.tile(grid, 0, L, 0, S), float("-inf"))
    if sinks is not None:  # a per-head logit that joins the denominator, with no value
        scores = torch.cat([scores, sinks.to(work).view(1, Hq, 1, 1).expand(B, Hq, L, 1)], -1)

    sees_nothing = (scores == float("-inf")).all(-1, keepdim=True)
    scores = scores.masked_fill(sees_nothing, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(sees_nothing, 0.0)
    # lse = max + log sum exp(s - max), differentiated as written (torch.logsumexp's own
    # backward, exp(s - lse), breaks where lse lost its digits: finfo.min-masked rows)
    top = scores.amax(-1, keepdim=True).detach()
    lse = (top + torch.log(torch.exp(scores - top).sum(-1, keepdim=True))).squeeze(-1)
    lse = lse.masked_fill(sees_nothing.squeeze(-1), float("-inf"))
    if sinks is not None:
        weights = weights[..., :S]
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    out = weights @ v
    return out.to(query.dtype), weights.to(query.dtype), lse


def not_supported_reasons(problem) -> list[str]:
    """The reference computes every call the contract describes."""
    return []
