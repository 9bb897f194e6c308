"""Where attention came from: the score functions of RNN encoder-decoders.

A decoder state q (the query) scores every encoder state k_j (the keys), the scores go
through a softmax over j, and the context is the weighted average of the values
(the encoder states themselves, unless given)::

    e_j = score(q, k_j)        a = softmax_j(e)        context = sum_j a_j v_j

* additive (Bahdanau, Cho and Bengio 2015): ``score(q, k) = v^T tanh(W_q q + W_k k)``;
* Luong, Pham and Manning 2015, "multiplicative": ``dot`` ``q^T k``, ``general``
  ``q^T W k``, and ``concat`` ``v^T tanh(W [q; k])`` (additive with one matrix).

Cost. ``dot`` and ``general`` are dot products (general moves W onto the keys once,
``W k``): the scores are one matrix multiply, and without the weights a fused
scaled-dot-product kernel computes the whole attention (``scale=1``). Additive and concat
put a tanh between the query and key terms: every (query, key) pair needs its own
``hidden_dim``-wide vector ``tanh(W_q q_i + W_k k_j)``, L * S * hidden_dim numbers that no
matrix multiply produces, so they cannot use a fused dot-product kernel. Here they are
computed for 256 queries at a time, so without autograd memory stays at
256 * S * hidden_dim numbers (training keeps every block's tanh for the backward).
These modules return the weights, so all of them form the (B, L, S) scores. Measured
(benchmarks/additive_bench.py, one sentence of 2048 tokens, width 64, AMD EPYC 2 cores):
additive 2102 ms, Luong general 17.9 ms, torch's fused SDPA 12.3 ms.

Padding: ``key_padding_mask`` (B, S) marks padded source tokens with True (as
``nn.MultiheadAttention``); their scores become -inf before the softmax, so they get
weight exactly 0. A query whose keys are all padding gets weights 0 and context 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_int

__all__ = ["AdditiveAttention", "LuongAttention", "additive_attention_reference",
           "luong_attention_reference", "tanh_scores", "LUONG_SCORES"]

LUONG_SCORES = ("dot", "general", "concat")

#: queries per step of the additive score, whose tanh vectors are (rows, S, hidden_dim)
ADDITIVE_ROWS = 256


def _inputs(query, keys, values, key_padding_mask, query_dim: int, key_dim: int):
    """(query (B, L, query_dim), keys, values (B, S, *), mask (B, S) or None, squeeze)."""
    for name, t in (("query", query), ("keys", keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    squeeze = query.dim() == 2
    if squeeze:
        query = query.unsqueeze(1)
    if query.dim() != 3 or query.shape[-1] != query_dim:
        raise ValueError(f"query must be (batch, length, {query_dim}) or (batch, {query_dim}), "
                         f"got {tuple(query.shape) if not squeeze else tuple(query.shape[::2])}")
    if keys.dim() != 3 or keys.shape[-1] != key_dim or keys.shape[0] != query.shape[0]:
        raise ValueError(f"keys must be (batch={query.shape[0]}, source length, {key_dim}), "
                         f"got {tuple(keys.shape)}")
    if values is None:
        values = keys
    elif not isinstance(values, Tensor) or values.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"values must be (batch, source length, value_dim) = "
                         f"({keys.shape[0]}, {keys.shape[1]}, ...), got "
                         f"{tuple(values.shape) if isinstance(values, Tensor) else values!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != keys.shape[:2]:
            raise ValueError(f"key_padding_mask must be (batch, source length) = "
                             f"{tuple(keys.shape[:2])}, got {tuple(key_padding_mask.shape)}")
    return query, keys, values, key_padding_mask, squeeze


def _softmax_context(scores: Tensor, values: Tensor, key_padding_mask) -> tuple[Tensor, Tensor]:
    """weights = softmax over the keys of scores (B, L, S), padding at -inf (rows with no
    real key: 0); context = weights @ values."""
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    weights = torch.softmax(scores, -1)
    if key_padding_mask is not None:  # a sentence of padding only: weights 0, not NaN
        empty = key_padding_mask.all(-1)
        if empty.any():
            weights = weights.masked_fill(empty[:, None, None], 0.0)
    return weights @ values, weights


def tanh_scores(wq: Tensor, wk: Tensor, v: Tensor) -> Tensor:
    """e_ij = v . tanh(wq_i + wk_j): (B, L, S) from wq (B, L, h) and wk (B, S, h), in
    blocks of ``ADDITIVE_ROWS`` queries (each block's tanh vectors: rows * S * h numbers)."""
    parts = [torch.tanh(wq[:, i:i + ADDITIVE_ROWS, None, :] + wk[:, None]) @ v
             for i in range(0, wq.shape[1], ADDITIVE_ROWS)]
    if not parts:  # no queries
        return wq.new_zeros(wq.shape[0], 0, wk.shape[1])
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _out(context: Tensor, weights: Tensor, squeeze: bool):
    return (context.squeeze(1), weights.squeeze(1)) if squeeze else (context, weights)


class AdditiveAttention(nn.Module):
    """Bahdanau's additive attention: ``e_ij = v^T tanh(W_q q_i + W_k k_j)``.

    Args:
        query_dim: width of the query (the decoder state).
        key_dim: width of the keys (the encoder states).
        hidden_dim: width of the tanh layer.

    Parameters: ``query_proj`` (W_q, no bias), ``key_proj`` (W_k, with the layer's bias)
    and ``v`` (hidden_dim,).

    ``forward(query, keys, values=None, *, key_padding_mask=None)``: query (B, L,
    query_dim) or (B, query_dim), keys (B, S, key_dim), values (B, S, Dv) (default: the
    keys). Returns ``(context (B, L, Dv), weights (B, L, S))``, without the L dim for a
    (B, query_dim) query.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, *, device=None,
                 dtype=None):
        super().__init__()
        self.query_dim = positive_int("query_dim", query_dim)
        self.key_dim = positive_int("key_dim", key_dim)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        f = dict(device=device, dtype=dtype)
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False, **f)
        self.key_proj = nn.Linear(key_dim, hidden_dim, **f)
        self.v = nn.Parameter(torch.empty(hidden_dim, **f).uniform_(
            -hidden_dim ** -0.5, hidden_dim ** -0.5))

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"

    def project_keys(self, keys: Tensor) -> Tensor:
        """W_k k_j (+ bias) for every key, (B, S, hidden_dim): computed once per source
        sentence; a decoder that attends at every step can pass it as ``projected_keys``."""
        return self.key_proj(keys)

    def scores(self, query: Tensor, projected_keys: Tensor) -> Tensor:
        """e (B, L, S) from query (B, L, query_dim) and W_k k (B, S, hidden_dim), in
        blocks of ``ADDITIVE_ROWS`` queries."""
        return tanh_scores(self.query_proj(query), projected_keys, self.v)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None,
                projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        query, keys, values, mask, squeeze = _inputs(query, keys, values, key_padding_mask,
                                                     self.query_dim, self.key_dim)
        if projected_keys is None:
            projected_keys = self.project_keys(keys)
        elif projected_keys.shape != (*keys.shape[:2], self.hidden_dim):
            raise ValueError(f"projected_keys must be (batch, source length, hidden_dim) = "
                             f"{(*keys.shape[:2], self.hidden_dim)}, got "
                             f"{tuple(projected_keys.shape)}")
        return _out(*_softmax_context(self.scores(query, projected_keys), values, mask), squeeze)


class LuongAttention(nn.Module):
    """Luong's attention: ``score="dot"`` ``q^T k`` (query_dim == key_dim), ``"general"``
    ``q^T W k``, ``"concat"`` ``v^T tanh(W [q; k])``. Scores are not scaled (Luong's
    formulas; scaled dot-product attention came with the Transformer).

    Parameters: ``general``: ``weight`` (W, (query_dim, key_dim)); ``concat``: ``proj``
    (W, (hidden_dim, query_dim + key_dim), with bias) and ``v`` (hidden_dim,).

    ``forward`` as :class:`AdditiveAttention`'s.
    """

    def __init__(self, query_dim: int, key_dim: int, score: str = "general", *,
                 hidden_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        self.query_dim = positive_int("query_dim", query_dim)
        self.key_dim = positive_int("key_dim", key_dim)
        if score not in LUONG_SCORES:
            raise ValueError(f"score must be one of {', '.join(LUONG_SCORES)}, got {score!r}")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(f"score='dot' needs query_dim == key_dim, got {query_dim} and "
                             f"{key_dim}; use 'general' (q^T W k) for different widths")
        self.score = score
        f = dict(device=device, dtype=dtype)
        if score == "general":
            self.weight = nn.Parameter(torch.empty(query_dim, key_dim, **f))
            nn.init.xavier_uniform_(self.weight)
        elif score == "concat":
            self.hidden_dim = positive_int("hidden_dim", hidden_dim or query_dim)
            self.proj = nn.Linear(query_dim + key_dim, self.hidden_dim, **f)
            self.v = nn.Parameter(torch.empty(self.hidden_dim, **f).uniform_(
                -self.hidden_dim ** -0.5, self.hidden_dim ** -0.5))

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}"

    def forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        query, keys, values, mask, squeeze = _inputs(query, keys, values, key_padding_mask,
                                                     self.query_dim, self.key_dim)
        if self.score == "concat":  # W [q; k] = W_q q + W_k k: the additive form
            w_q, w_k = self.proj.weight.split([self.query_dim, self.key_dim], 1)
            scores = tanh_scores(query @ w_q.T, keys @ w_k.T + self.proj.bias, self.v)
            return _out(*_softmax_context(scores, values, mask), squeeze)
        k = keys if self.score == "dot" else keys @ self.weight.T  # W k_j, once per key
        return _out(*_softmax_context(query @ k.transpose(1, 2), values, mask), squeeze)


def additive_attention_reference(query: Tensor, keys: Tensor, values: Tensor, w_q: Tensor,
                                 w_k: Tensor, b_k: Tensor, v: Tensor,
                                 key_padding_mask: Tensor | None = None):
    """Bahdanau's formulas, one query and one key at a time (slow; for tests)::

        e_ij = v . tanh(W_q q_i + W_k k_j + b)     a_ij = exp(e_ij) / sum_j' exp(e_ij')
        c_i  = sum_j a_ij v_j

    query (B, L, Dq), keys (B, S, Dk), values (B, S, Dv); returns (c (B, L, Dv), a (B, L, S)).
    """
    return _pairwise(query, keys, values, key_padding_mask,
                     lambda q, k: v @ torch.tanh(w_q @ q + w_k @ k + b_k))


def luong_attention_reference(query: Tensor, keys: Tensor, values: Tensor, score: str,
                              weight: Tensor | None = None, v: Tensor | None = None,
                              bias: Tensor | None = None,
                              key_padding_mask: Tensor | None = None):
    """Luong's formulas, one pair at a time: ``dot`` q . k, ``general`` q . (W k),
    ``concat`` v . tanh(W [q; k] + b) (``weight`` is W, (hidden, Dq + Dk))."""
    formulas = {"dot": lambda q, k: q @ k, "general": lambda q, k: q @ (weight @ k),
                "concat": lambda q, k: v @ torch.tanh(weight @ torch.cat([q, k]) + bias)}
    return _pairwise(query, keys, values, key_padding_mask, formulas[score])


def _pairwise(query, keys, values, key_padding_mask, score):
    """e_ij = score(q_i, k_j) for every real key, then a softmax over j and a @ values."""
    B, L, _ = query.shape
    S = keys.shape[1]
    e = query.new_full((B, L, S), float("-inf"))
    for b in range(B):
        for i in range(L):
            for j in range(S):
                if key_padding_mask is None or not key_padding_mask[b, j]:
                    e[b, i, j] = score(query[b, i], keys[b, j])
    a = torch.zeros_like(e)
    for b in range(B):
        for i in range(L):
            real = e[b, i] > float("-inf")
            if real.any():
                x = torch.exp(e[b, i, real] - e[b, i, real].max())
                a[b, i, real] = x / x.sum()
    return a @ values, a
