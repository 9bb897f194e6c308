"""Absolute position encodings, added to the token embeddings before the first layer.

Sinusoidal (Vaswani et al. 2017, section 3.5), for position ``pos`` and ``i < dim / 2``:

    PE[pos, 2i]     = sin(pos / base^(2i / dim))
    PE[pos, 2i + 1] = cos(pos / base^(2i / dim))

``interleaved=False`` puts the same numbers as ``[sin | cos]`` halves instead, the layout
of Transformer-XL's relative encodings and of fairseq/Marian's sinusoidal embeddings.
Learned positions (GPT-2, BERT) are one trained vector per position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_int

__all__ = ["sinusoidal_encoding", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding"]



def _positions(positions, name: str = "positions") -> Tensor:
    """An int -> arange(n); an integer or float tensor passes through."""
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"{name} as a length must be >= 0, got {positions}")
        return torch.arange(positions)
    if not isinstance(positions, Tensor):
        raise TypeError(f"{name} must be a tensor of positions or an int length, got "
                        f"{type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"{name} must hold integer or float positions, got {positions.dtype}")
    return positions


def sinusoidal_encoding(positions, dim: int, *, base: float = 10000.0, interleaved: bool = True,
                        dtype: torch.dtype | None = None) -> Tensor:
    """The sinusoidal encoding of ``positions`` (any shape, or an int length n for
    0..n-1): a tensor ``(*positions.shape, dim)``.

    The angle ``pos * base^(-2i/dim)`` is computed in float64 and the result cast to
    ``dtype`` (default: float32, or the positions' dtype when they are float).
    """
    positive_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim must be even (sin and cos pairs), got {dim}")
    pos = _positions(positions)
    if dtype is None:
        dtype = pos.dtype if pos.is_floating_point() else torch.float32
    inv_freq = float(base) ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device)
                                / dim)
    angle = pos.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., dim/2)
    if interleaved:
        pe = torch.stack((angle.sin(), angle.cos()), -1).flatten(-2)
    else:
        pe = torch.cat((angle.sin(), angle.cos()), -1)
    return pe.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (no parameters): ``forward(positions)`` returns
    ``(*positions.shape, dim)``; ``positions`` may be an int length. Add the result to
    the token embeddings, e.g. ``x + pe(torch.arange(offset, offset + L))``."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = True):
        super().__init__()
        positive_int("dim", dim)
        if dim % 2:
            raise ValueError(f"dim must be even (sin and cos pairs), got {dim}")
        self.dim, self.base, self.interleaved = dim, float(base), bool(interleaved)

    def forward(self, positions, dtype: torch.dtype | None = None) -> Tensor:
        return sinusoidal_encoding(positions, self.dim, base=self.base,
                                   interleaved=self.interleaved, dtype=dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position (GPT-2's ``wpe``, BERT's position embeddings):
    ``forward(positions)`` returns ``(*positions.shape, dim)``; ``positions`` may be an
    int length. Positions must lie in ``[0, num_positions)``."""

    def __init__(self, num_positions: int, dim: int, device=None, dtype=None):
        super().__init__()
        positive_int("num_positions", num_positions)
        positive_int("dim", dim)
        self.num_positions, self.dim = num_positions, dim
        self.embedding = nn.Embedding(num_positions, dim, device=device, dtype=dtype)

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, positions) -> Tensor:
        pos = _positions(positions).to(self.weight.device)
        if pos.is_floating_point():
            raise TypeError(f"positions must be integers, got {pos.dtype}")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.num_positions):
            raise ValueError(f"positions must lie in [0, {self.num_positions}), got "
                             f"{int(pos.min())}..{int(pos.max())} (shape {tuple(pos.shape)})")
        return self.embedding(pos)

    def extra_repr(self) -> str:
        return f"num_positions={self.num_positions}, dim={self.dim}"
