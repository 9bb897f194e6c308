"""Bias objects: additive score terms evaluated tile by tile, never as a dense (L, S).

A bias adds ``bias(b, h, p, j)`` to the score of the query at position ``p`` and key
``j`` (positions as in :mod:`attnkit.masks`), after the ``scale * Q K^T`` product and
the optional softcap, before the softmax. Biases are never scaled.

Protocol, mirroring masks:

* ``score_mod(grid, b, h, q, k, *params)``: the elementwise rule on broadcasting index
  tensors (FlexAttention's ``score_mod`` minus the score);
* ``tile(grid, q0, q1, k0, k1, params)``: the float block ``(B|1, H|1, q1-q0, k1-k0)``;
* ``params``: the tensors the bias is a function of. The chunked engine passes them
  through its autograd function, so a learned bias (T5's embedding, learnable ALiBi
  slopes) gets its gradient without a dense (L, S) tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import Grid, _as_4d

__all__ = ["Bias", "ALiBi", "TensorBias", "SumBias", "alibi", "alibi_slopes"]


class Bias:
    """Base class: subclasses implement ``score_mod`` and set ``params``."""

    batch_size: int | None = None
    num_heads: int | None = None
    #: True when the bias may hold -inf entries (a float attention mask)
    may_mask: bool = False
    #: True when the bias depends only on the offset k - p (and the head): equal tiles
    #: for equal geometry, which the engine builds once
    relative: bool = False

    @property
    def params(self) -> tuple[Tensor, ...]:
        return ()

    def score_mod(self, grid: Grid, b, h, q, k, *params) -> Tensor:
        raise NotImplementedError

    def tile(self, grid: Grid, q0: int, q1: int, k0: int, k1: int, params=None) -> Tensor:
        params = self.params if params is None else params
        b = torch.arange(self.batch_size or 1, device=grid.device).view(-1, 1, 1, 1)
        h = torch.arange(self.num_heads or 1, device=grid.device).view(1, -1, 1, 1)
        q = grid.positions(q0, q1).view(1, 1, -1, 1)
        k = grid.keys(k0, k1).view(1, 1, 1, -1)
        return _as_4d(self.score_mod(grid, b, h, q, k, *params))

    def validate(self, grid: Grid) -> None:
        """Raise ValueError when the bias cannot describe this grid."""

    def materialize(self, q_len: int, k_len: int | None = None, device=None) -> Tensor:
        """Dense float bias (B|1, H|1, L, S), for pictures and tests."""
        k_len = q_len if k_len is None else k_len
        grid = Grid(int(q_len), int(k_len), torch.device(device or "cpu"))
        self.validate(grid)
        off = grid.q_offset
        t = self.tile(grid, off, off + q_len, 0, k_len)
        return t.expand(*t.shape[:2], q_len, k_len).clone()

    def __add__(self, other: "Bias") -> "Bias":
        if not isinstance(other, Bias):
            raise TypeError(f"a bias adds only to another bias, got {type(other).__name__}")
        return SumBias(self, other)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes (num_heads,), float32, exactly as the paper and BLOOM.

    For n a power of two the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...,
    2^(-8). Otherwise take the slopes of the closest smaller power of two ``c`` and append
    every other slope of ``2c`` heads until there are ``num_heads``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        n_extra = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class ALiBi(Bias):
    """Attention with Linear Biases: adds ``-slope[h] * |p - j|``."""
    relative = True

    def __init__(self, slopes: Tensor):
        if not isinstance(slopes, Tensor) or slopes.dim() != 1 or not slopes.is_floating_point():
            raise TypeError(f"slopes must be a 1-D float tensor, got {slopes!r}")
        self.slopes = slopes
        self.num_heads = slopes.numel()

    @property
    def params(self):
        return (self.slopes,)

    def tile(self, grid, q0, q1, k0, k1, params=None):
        """-slope[h] * |p - j| is constant along diagonals: scale the nq + nk - 1 distinct
        offsets once per head and spread them over the (1, H, nq, nk) tile, row-major."""
        (slopes,) = self.params if params is None else params
        nq, nk = q1 - q0, k1 - k0
        offsets = torch.arange(k0 - (q1 - 1), k1 - q0, device=grid.device).to(slopes.dtype)
        values = (-slopes.to(grid.device).view(-1, 1) * offsets.abs()).contiguous()
        band = values.as_strided((values.shape[0], nq, nk), (values.shape[1], 1, 1))
        return band.flip(1).contiguous().unsqueeze(0)

    def score_mod(self, grid, b, h, q, k, slopes):
        s = slopes.to(grid.device)
        s = s[h] if s.numel() > 1 else s[torch.zeros_like(h)]
        return -s * (q - k).abs()

    def __repr__(self):
        return f"alibi({self.num_heads})"


def alibi(num_heads: int, slopes: Tensor | None = None) -> ALiBi:
    """ALiBi bias object for ``num_heads`` heads (slopes from :func:`alibi_slopes`)."""
    return ALiBi(alibi_slopes(num_heads) if slopes is None else slopes)


class TensorBias(Bias):
    """A dense float tensor (B|1, H|1, L|1, S|1) added to the scores. Internal: the
    functional API wraps float ``attn_mask`` and ``bias`` tensors in it."""

    def __init__(self, bias: Tensor, may_mask: bool = False):
        if bias.dim() != 4 or not bias.is_floating_point():
            raise TypeError("TensorBias takes a 4-D float tensor")
        self.bias = bias
        self.may_mask = may_mask
        self.batch_size = bias.shape[0] if bias.shape[0] > 1 else None
        self.num_heads = bias.shape[1] if bias.shape[1] > 1 else None

    @property
    def params(self):
        return (self.bias,)

    def tile(self, grid, q0, q1, k0, k1, params=None):
        t = self.bias if params is None else params[0]
        off = grid.q_offset
        if t.shape[2] > 1:
            t = t[:, :, q0 - off:q1 - off]
        if t.shape[3] > 1:
            t = t[:, :, :, k0:k1]
        return t

    def score_mod(self, grid, b, h, q, k, t):
        bi = b if t.shape[0] > 1 else torch.zeros_like(b)
        hi = h if t.shape[1] > 1 else torch.zeros_like(h)
        qi = q - grid.q_offset if t.shape[2] > 1 else torch.zeros_like(q)
        ki = k if t.shape[3] > 1 else torch.zeros_like(k)
        return t[bi, hi, qi, ki]

    def __repr__(self):
        return f"TensorBias({tuple(self.bias.shape)})"


class SumBias(Bias):
    """The sum of two biases."""

    def __init__(self, a: Bias, b: Bias):
        self.a, self.b = a, b
        self.may_mask = a.may_mask or b.may_mask
        self.relative = a.relative and b.relative
        for name in ("batch_size", "num_heads"):
            x, y = getattr(a, name), getattr(b, name)
            if x is not None and y is not None and x != y:
                raise ValueError(f"cannot add biases with {name} {x} and {y}")
            setattr(self, name, x if x is not None else y)

    @property
    def params(self):
        return self.a.params + self.b.params

    def _split(self, params):
        n = len(self.a.params)
        return params[:n], params[n:]

    def tile(self, grid, q0, q1, k0, k1, params=None):
        pa, pb = self._split(self.params if params is None else params)
        return self.a.tile(grid, q0, q1, k0, k1, pa) + self.b.tile(grid, q0, q1, k0, k1, pb)

    def score_mod(self, grid, b, h, q, k, *params):
        pa, pb = self._split(params)
        return self.a.score_mod(grid, b, h, q, k, *pa) + self.b.score_mod(grid, b, h, q, k, *pb)

    def validate(self, grid):
        self.a.validate(grid)
        self.b.validate(grid)

    def __repr__(self):
        return f"({self.a!r} + {self.b!r})"
