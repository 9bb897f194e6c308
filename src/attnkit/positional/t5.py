"""T5's relative position bias (Raffel et al. 2020, section 2.1; Shaw et al. 2018).

Each head adds a learned scalar to the score of query position ``i`` and key ``j``,
looked up by the *bucket* of the offset ``j - i``:

    score[h, i, j] = q_i . k_j + embedding[bucket(j - i), h]        (T5 uses scale = 1)

Buckets: offsets below ``max_exact = num_buckets / 2`` (halved again when bidirectional,
one half per direction) get a bucket each; larger ones share logarithmically wider
buckets up to ``max_distance``, beyond which all offsets share the last bucket. Causal
(decoder) buckets see only ``j <= i``; later keys land in bucket 0.

The bias is one small table: T5 computes it in the first layer and shares it with every
later layer. :meth:`T5RelativeBias.bias` returns an attnkit bias object that the chunked
engine evaluates tile by tile (never an L x S tensor) and differentiates into the table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..bias import Bias
from ..masks import Grid

__all__ = ["relative_position_bucket", "T5RelativeBias", "T5Bias"]


def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucket (long, in [0, num_buckets)) of each ``key - query`` offset.

    Identical to ``transformers``' ``T5Attention._relative_position_bucket``.
    """
    if not isinstance(relative_position, Tensor) or relative_position.is_floating_point():
        raise TypeError(f"relative_position must be an integer tensor, got "
                        f"{getattr(relative_position, 'dtype', type(relative_position).__name__)}")
    _check_buckets(num_buckets, max_distance, bidirectional)
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32, exactly as T5 computes it, so that bucket edges agree with T5's
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    if_large = if_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


def _check_buckets(num_buckets, max_distance, bidirectional):
    for name, x in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if num_buckets < (4 if bidirectional else 2):
        raise ValueError(f"num_buckets must be >= {4 if bidirectional else 2} "
                         f"({'bidirectional' if bidirectional else 'causal'}), got {num_buckets}")


class T5Bias(Bias):
    """The bias object of one attention call: ``embedding[bucket(j - i), h]`` with query
    row ``r`` at position ``i = offset + r``, or, with ``offset=None``, at the position the
    attention grid gives row r (bottom-right: ``r + k_len - q_len``; per sequence in a
    ragged batch).

    ``params = (embedding.weight,)``: gradients reach the table tile by tile.
    """
    translation_invariant = True  # a function of k - p within one call: equal tiles are built once

    def __init__(self, module: "T5RelativeBias", q_len: int, k_len: int, offset: int | None):
        self.module = module
        self.q_len, self.k_len = q_len, k_len
        self.offset = offset
        self.num_heads = module.num_heads

    @property
    def params(self):
        return (self.module.embedding.weight,)

    def validate(self, grid: Grid) -> None:
        if (grid.q_len, grid.k_len) != (self.q_len, self.k_len):
            raise ValueError(f"this T5 bias was made for q_len={self.q_len}, k_len="
                             f"{self.k_len}, but attention has q_len={grid.q_len}, "
                             f"k_len={grid.k_len}")

    def _bucket(self, rel: Tensor) -> Tensor:
        m = self.module
        return relative_position_bucket(rel, m.bidirectional, m.num_buckets, m.max_distance)

    def at(self, grid, b, h, i, k, weight):
        """``weight[bucket(k - position(i)), h]`` for query rows i."""
        pos = grid.position(b, i) if self.offset is None else i + self.offset
        return weight[self._bucket(k - pos), h].to(grid.dtype)

    def score_mod(self, grid, b, h, q, k, weight):
        """The elementwise rule at query positions q (the grid's)."""
        if self.offset is not None:
            return self.at(grid, b, h, q - grid.q_offset, k, weight)
        return weight[self._bucket(k - q), h].to(grid.dtype)

    def tile(self, grid, r0, r1, k0, k1, params=None):
        """(1, H, r1-r0, k1-k0). The offsets of a tile form a Toeplitz band, so the
        buckets are computed for its ``nq + nk - 1`` distinct offsets only, looked up
        once, and spread over the tile by a strided view."""
        (weight,) = self.params if params is None else params
        if self.offset is None and not grid.affine:
            return super().tile(grid, r0, r1, k0, k1, (weight,))
        nq, nk = r1 - r0, k1 - k0
        first = r0 + (grid.q_offset if self.offset is None else self.offset)
        # offsets k - i, smallest first: c = 0 .. nq+nk-2 <-> rel = k0 - (last query) + c
        rel = torch.arange(k0 - (first + nq - 1), k1 - first, device=weight.device)
        values = weight[self._bucket(rel)].t().contiguous()  # (H, nq + nk - 1)
        # row a (from the bottom, a' = nq-1-a) and column t read values[a' + t]; made
        # contiguous before the flip so the tile comes out row-major, as kernels want it
        band = values.as_strided((values.shape[0], nq, nk), (values.stride(0), 1, 1))
        return band.contiguous().flip(1).unsqueeze(0).to(grid.dtype)

    def __repr__(self):
        return (f"T5Bias(heads={self.num_heads}, q_len={self.q_len}, k_len={self.k_len}, "
                f"offset={self.offset})")


class T5RelativeBias(nn.Module):
    """T5's learned relative position bias, computed once and shared by every layer.

    Args:
        num_heads: H.
        num_buckets: size of the bucket table (T5: 32).
        max_distance: offsets at least this far share the last bucket (T5: 128).
        bidirectional: encoder (True) or causal decoder (False) buckets.

    ``embedding`` is ``nn.Embedding(num_buckets, num_heads)``: T5's
    ``relative_attention_bias`` weights copy straight in.
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        _check_buckets(num_buckets, max_distance, bool(bidirectional))
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bool(bidirectional)
        self.embedding = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")

    @staticmethod
    def _lengths(q_len, k_len, offset):
        for name, x in (("q_len", q_len), ("k_len", k_len)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{name} must be an int >= 0, got {x!r}")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
            raise TypeError(f"offset must be an int or None, got {offset!r}")

    def bias(self, q_len: int, k_len: int, offset: int | None = None) -> T5Bias:
        """A bias object for ``scaled_dot_product_attention(..., bias=...)`` with queries
        at positions ``offset .. offset + q_len - 1`` (None: ``k_len - q_len``, the
        bottom-right rule, as in KV-cache decoding). Pass the same object to every layer."""
        self._lengths(q_len, k_len, offset)
        return T5Bias(self, q_len, k_len, offset)

    def materialize(self, q_len: int, k_len: int, offset: int | None = None) -> Tensor:
        """The dense bias (num_heads, q_len, k_len), differentiable into ``embedding``."""
        self._lengths(q_len, k_len, offset)
        offset = k_len - q_len if offset is None else offset
        device = self.embedding.weight.device
        query = torch.arange(q_len, device=device).view(-1, 1) + offset
        key = torch.arange(k_len, device=device).view(1, -1)
        bucket = relative_position_bucket(key - query, self.bidirectional, self.num_buckets,
                                          self.max_distance)
        return self.embedding(bucket).permute(2, 0, 1)

    def forward(self, q_len: int, k_len: int, offset: int | None = None) -> T5Bias:
        return self.bias(q_len, k_len, offset)
