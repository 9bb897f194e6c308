"""Bias objects: additive score terms evaluated tile by tile, never as a dense (L, S).

A bias adds ``bias(b, h, p, j)`` to the score of the query at position ``p`` and key
``j`` (positions as in :mod:`attnkit.masks`), after the ``scale * Q K^T`` product and
the optional softcap, before the softmax. Biases are never scaled.

Protocol, mirroring masks:

* ``score_mod(grid, b, h, q, k, *params)``: the elementwise rule on broadcasting index
  tensors of query positions and keys (FlexAttention's ``score_mod`` minus the score);
* ``at(grid, b, h, i, k, *params)``: the rule at query *rows* i (the grid turns rows into
  positions); ``tile(grid, r0, r1, k0, k1, params)``: the float block
  ``(B|1, H|1, r1-r0, k1-k0)`` for query rows r0..r1-1. Biases defined on rows (a dense
  tensor) override these two instead of ``score_mod``;
* ``params``: the tensors the bias is a function of. The chunked engine passes them
  through its autograd function, so a learned bias (T5's embedding, learnable ALiBi
  slopes) gets its gradient without a dense (L, S) tensor.

Bias arithmetic runs in ``grid.dtype``, the input's accumulation type (float64 for
float64 inputs, float32 for float32 and half precision): a float32 slope times a float64
distance is formed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks.grid import Grid, as_4d

__all__ = ["Bias", "ALiBi", "TensorBias", "SumBias", "alibi", "alibi_slopes"]


class Bias:
    """Base class: subclasses implement ``score_mod`` and set ``params``."""

    batch_size: int | None = None
    num_heads: int | None = None
    #: True when the bias may hold -inf entries (a float attention mask)
    may_mask: bool = False
    #: True when the bias depends only on the offset k - p (and the head): equal tiles
    #: for equal geometry, which the engine builds once
    translation_invariant: bool = False
    #: True when, at and below the diagonal (k <= p), the bias is affine in k - p (ALiBi):
    #: a causal diagonal's square then runs on a fused kernel's own causal flag, the bias
    #: split into a per-key and a per-row part
    affine_below_diagonal: bool = False

    @property
    def params(self) -> tuple[Tensor, ...]:
        return ()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the bias's own numbers (what :meth:`materialize` returns)."""
        floats = [p.dtype for p in self.params if p.is_floating_point()]
        return floats[0] if floats else torch.float32

    def score_mod(self, grid: Grid, b, h, q, k, *params) -> Tensor:
        raise NotImplementedError

    def at(self, grid: Grid, b, h, i, k, *params) -> Tensor:
        """The bias at query rows ``i`` (broadcasting index tensors)."""
        return self.score_mod(grid, b, h, grid.position(b, i), k, *params)

    def tile(self, grid: Grid, r0: int, r1: int, k0: int, k1: int, params=None) -> Tensor:
        """Float block (B|1, H|1, r1-r0, k1-k0) in ``grid.dtype`` for query rows r0..r1-1."""
        params = self.params if params is None else params
        b = torch.arange(self.batch_size or grid.batch_size or 1,
                         device=grid.device).view(-1, 1, 1, 1)
        h = torch.arange(self.num_heads or 1, device=grid.device).view(1, -1, 1, 1)
        i = torch.arange(r0, r1, device=grid.device).view(1, 1, -1, 1)
        k = grid.keys(k0, k1).view(1, 1, 1, -1)
        return as_4d(self.at(grid, b, h, i, k, *params)).to(grid.dtype)

    def validate(self, grid: Grid) -> None:
        """Raise ValueError when the bias cannot describe this grid."""

    def materialize(self, q_len: int, k_len: int | None = None, device=None) -> Tensor:
        """Dense float bias (B|1, H|1, L, S), for pictures and tests."""
        k_len = q_len if k_len is None else k_len
        grid = Grid(int(q_len), int(k_len), torch.device(device or "cpu"),
                    dtype=torch.promote_types(self.dtype, torch.float32))
        self.validate(grid)
        t = self.tile(grid, 0, q_len, 0, k_len)
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
    """Attention with Linear Biases: adds ``-slope[h] * |p - j|``; ``slopes`` is
    (num_heads,), or (B, num_heads) for one set of slopes per batch element."""
    translation_invariant = True
    affine_below_diagonal = True

    def __init__(self, slopes: Tensor):
        if not isinstance(slopes, Tensor) or slopes.dim() not in (1, 2) or \
                not slopes.is_floating_point():
            raise TypeError(f"slopes must be a float tensor (num_heads,) or (batch, num_heads), "
                            f"got {getattr(slopes, 'dtype', type(slopes).__name__)} of shape "
                            f"{tuple(getattr(slopes, 'shape', ()))}")
        self.slopes = slopes
        self.num_heads = slopes.shape[-1]
        if slopes.dim() == 2 and slopes.shape[0] > 1:
            self.batch_size = slopes.shape[0]

    @property
    def params(self):
        return (self.slopes,)

    def _slopes(self, grid, slopes) -> Tensor:
        """(B|1, H, 1, 1) slopes in the grid's dtype."""
        return slopes.to(grid.device, grid.dtype).reshape(-1, slopes.shape[-1], 1, 1)

    def tile(self, grid, r0, r1, k0, k1, params=None):
        """-slope[h] * |p - j| is constant along diagonals: scale the nq + nk - 1 distinct
        offsets once per head and spread them over the (B|1, H, nq, nk) tile, row-major."""
        (slopes,) = self.params if params is None else params
        if not grid.affine:
            return super().tile(grid, r0, r1, k0, k1, (slopes,))
        q0, q1 = r0 + grid.q_offset, r1 + grid.q_offset
        nq, nk = q1 - q0, k1 - k0
        offsets = torch.arange(k0 - (q1 - 1), k1 - q0, device=grid.device).to(grid.dtype)
        sl = self._slopes(grid, slopes)
        values = (-sl[:, :, 0] * offsets.abs()).contiguous()          # (B|1, H, nq + nk - 1)
        band = values.as_strided((*values.shape[:2], nq, nk),
                                 (values.stride(0), values.stride(1), 1, 1))
        return band.flip(2).contiguous()

    def score_mod(self, grid, b, h, q, k, slopes):
        sl = self._slopes(grid, slopes)[:, :, 0, 0]                     # (B|1, H)
        s = sl[b if sl.shape[0] > 1 else torch.zeros_like(b), h if sl.shape[1] > 1 else
               torch.zeros_like(h)]
        return -s * (q - k).abs().to(grid.dtype)

    def __repr__(self):
        if self.slopes.dim() == 2:
            return f"alibi({self.num_heads}, slopes per batch {tuple(self.slopes.shape)})"
        return f"alibi({self.num_heads})"


def alibi(num_heads: int, slopes: Tensor | None = None) -> ALiBi:
    """ALiBi bias object for ``num_heads`` heads (slopes from :func:`alibi_slopes`);
    ``slopes`` may be given as (num_heads,) or (batch, num_heads)."""
    if slopes is not None and isinstance(slopes, Tensor) and slopes.shape[-1:] != (num_heads,):
        raise ValueError(f"slopes must have num_heads = {num_heads} entries in the last "
                         f"dimension, got shape {tuple(slopes.shape)}")
    return ALiBi(alibi_slopes(num_heads) if slopes is None else slopes)


class TensorBias(Bias):
    """A dense float tensor (B|1, H|1, L|1, S|1) added to the scores, indexed by query row.
    Internal: the functional API wraps float ``attn_mask`` and ``bias`` tensors in it."""

    def __init__(self, bias: Tensor, may_mask: bool = False):
        if bias.dim() != 4 or not bias.is_floating_point():
            raise TypeError("TensorBias takes a 4-D float tensor")
        self.bias = bias
        # a -inf anywhere masks that entry, whether the tensor came as attn_mask or bias
        self.may_mask = may_mask or bool(torch.isneginf(bias).any())
        self.batch_size = bias.shape[0] if bias.shape[0] > 1 else None
        self.num_heads = bias.shape[1] if bias.shape[1] > 1 else None

    @property
    def params(self):
        return (self.bias,)

    def tile(self, grid, r0, r1, k0, k1, params=None):
        t = self.bias if params is None else params[0]
        if t.shape[2] > 1:
            t = t[:, :, r0:r1]
        if t.shape[3] > 1:
            t = t[:, :, :, k0:k1]
        return t.to(grid.dtype)

    def at(self, grid, b, h, i, k, t):
        bi = b if t.shape[0] > 1 else torch.zeros_like(b)
        hi = h if t.shape[1] > 1 else torch.zeros_like(h)
        qi = i if t.shape[2] > 1 else torch.zeros_like(i)
        ki = k if t.shape[3] > 1 else torch.zeros_like(k)
        return t[bi, hi, qi, ki].to(grid.dtype)

    def score_mod(self, grid, b, h, q, k, t):
        if not grid.affine:
            raise NotImplementedError("a tensor bias is indexed by query rows; with per-row "
                                      "positions evaluate it with at() or tile()")
        return self.at(grid, b, h, q - grid.q_offset, k, t)

    def __repr__(self):
        return f"TensorBias({tuple(self.bias.shape)})"


class SumBias(Bias):
    """The sum of two biases."""

    def __init__(self, a: Bias, b: Bias):
        self.a, self.b = a, b
        self.may_mask = a.may_mask or b.may_mask
        self.translation_invariant = a.translation_invariant and b.translation_invariant
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

    def tile(self, grid, r0, r1, k0, k1, params=None):
        pa, pb = self._split(self.params if params is None else params)
        return (self.a.tile(grid, r0, r1, k0, k1, pa).to(grid.dtype)
                + self.b.tile(grid, r0, r1, k0, k1, pb).to(grid.dtype))

    def at(self, grid, b, h, i, k, *params):
        pa, pb = self._split(params)
        return (self.a.at(grid, b, h, i, k, *pa).to(grid.dtype)
                + self.b.at(grid, b, h, i, k, *pb).to(grid.dtype))

    def score_mod(self, grid, b, h, q, k, *params):
        pa, pb = self._split(params)
        return (self.a.score_mod(grid, b, h, q, k, *pa).to(grid.dtype)
                + self.b.score_mod(grid, b, h, q, k, *pb).to(grid.dtype))

    def validate(self, grid):
        self.a.validate(grid)
        self.b.validate(grid)

    def __repr__(self):
        return f"({self.a!r} + {self.b!r})"
