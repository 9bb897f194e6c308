"""Argument checks the sparse self-attention layers (Longformer, BigBird) share.

Each raises a TypeError or ValueError that names the argument and what it got; the
generic ones (positive ints, q/k/v shapes) are in :mod:`attnkit.checks`.
"""

from __future__ import annotations

from torch import Tensor

from ..checks import positive_int, shape_of

__all__ = ["check_heads", "check_dropout", "check_hidden", "bool_mask"]


def check_heads(embed_dim, num_heads) -> int:
    """The head width ``embed_dim // num_heads`` of positive ints, E divisible by H."""
    positive_int("embed_dim", embed_dim)
    positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                         f"({num_heads})")
    return embed_dim // num_heads


def check_dropout(dropout) -> float:
    """A dropout probability in [0, 1), as a float."""
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def check_hidden(x, embed_dim: int) -> tuple[int, int, int]:
    """(B, L, E) of a layer's ``hidden_states``, or a TypeError/ValueError naming it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"hidden_states must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"hidden_states must be (batch, length, {embed_dim}), got "
                         f"{shape_of(x)}")
    return tuple(x.shape)


def bool_mask(name: str, m, B: int, L: int) -> Tensor | None:
    """A (B, L) per-token flag tensor (bool or integer 0/1) as bool; None stays None."""
    if m is None:
        return None
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(m).__name__}")
    if m.shape != (B, L):
        raise ValueError(f"{name} must be (batch, length) = ({B}, {L}), got {shape_of(m)}")
    if m.is_floating_point():
        raise TypeError(f"{name} must be bool or integer (0/1), got {m.dtype}")
    return m.bool()
