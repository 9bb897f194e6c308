"""Rotary position embedding (RoPE; Su et al. 2021, RoFormer).

Queries and keys are rotated, pair of dims by pair of dims, by an angle proportional to
their position. For pair ``k`` (of ``r / 2``, ``r = rotary_dim``) at position ``m``:

    theta_k = base^(-2k / r)
    (x1, x2) -> (x1 cos(m theta_k) - x2 sin(m theta_k),  x2 cos(m theta_k) + x1 sin(m theta_k))

so ``<R_m q, R_n k> = <q, R_(n-m) k>``: scores depend only on the offset ``n - m``, and a
token keeps its rotation in a KV cache. Two layouts pick the pairs:

* rotate-half (GPT-NeoX, Llama; ``interleaved=False``): pair k = dims (k, k + r/2);
* interleaved (GPT-J, RoFormer; ``interleaved=True``): pair k = dims (2k, 2k + 1).

With ``rotary_dim < head_dim`` only the first ``rotary_dim`` dims rotate (GPT-NeoX's
``rotary_pct``, GPT-J's ``rotary_dim``); the rest pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .rope_scaling import check_scaling, scaled_frequencies

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary embedding for heads of size ``head_dim``; plugs into
    ``attnkit.MultiHeadAttention(positional=RotaryEmbedding(...))``.

    Pair k of a head (k = 0 .. rotary_dim/2 - 1) at position p is rotated by the angle
    ``p * theta_k``, ``theta_k = base^(-2k / rotary_dim)``::

        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)

    Args:
        head_dim: the size of each head's query and key vectors.
        base: the wavelength base (10000 in RoFormer and Llama 2; larger for long
            context, 500000 in Llama 3).
        interleaved: how a head's coordinates pair up. False (GPT-NeoX, Llama in
            transformers): coordinate i pairs with i + rotary_dim/2 (the two halves).
            True (the RoFormer paper, GPT-J, Meta's original Llama code): coordinates
            2k and 2k + 1 pair up.
        rotary_dim: how many leading coordinates of each head rotate (even, at most
            head_dim; default: all). The rest pass through unchanged (GPT-NeoX's and
            Phi's partial rotary).
        scaling: None, or a dict in transformers' ``rope_parameters`` form that
            stretches the frequencies past the trained context (``{"rope_type":
            "linear", "factor": 4.0}``; also "dynamic", "yarn", "llama3", "longrope":
            see :mod:`attnkit.positional.rope_scaling`). Frequencies and the attention
            factor (``attention_scaling``, multiplied into cos and sin) equal
            transformers'; "dynamic" reads its context length from the dict's
            ``max_position_embeddings``.

    ``cos``/``sin`` tables are computed once per device (angles in float64, stored as
    float32, or float64 for float64 inputs), grown by doubling as larger positions come,
    and applied in float32 (float64 for float64 inputs); outputs keep the input dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False,
                 rotary_dim: int | None = None, scaling: dict | None = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
            raise TypeError(f"rotary_dim must be an int or None, got {rotary_dim!r}")
        if not 2 <= rotary_dim <= head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in [2, head_dim={head_dim}], "
                             f"got {rotary_dim}")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.base, self.interleaved = float(base), bool(interleaved)
        self.scaling = check_scaling(scaling)
        if self.scaling is not None:  # transformers' rope_parameters carry these too
            theta = self.scaling.get("rope_theta")
            if theta is not None and float(theta) != self.base:
                raise ValueError(f"scaling['rope_theta'] = {theta} but base = {self.base}: "
                                 f"pass base={theta}")
            part = self.scaling.get("partial_rotary_factor")
            if part is not None and int(head_dim * part) != rotary_dim:
                raise ValueError(f"scaling['partial_rotary_factor'] = {part} means rotary_dim "
                                 f"{int(head_dim * part)}, but rotary_dim = {rotary_dim}")
        # dynamic NTK, as transformers keeps it: the longest call seen past the context,
        # until a call shorter than the context resets it
        self._dynamic_len = 0
        #: the factor transformers multiplies cos and sin by (YaRN, LongRoPE; else 1)
        self.attention_scaling = scaled_frequencies(self.base, rotary_dim, self.scaling)[1]
        self._tables: dict = {}  # (device, dtype, set) -> (cos, sin), each (n, rotary_dim / 2)

    def extra_repr(self) -> str:
        extra = "" if self.scaling is None else f", scaling={self.scaling}"
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"interleaved={self.interleaved}{extra}")

    def inv_freq(self, device=None, seq_len: int | None = None) -> Tensor:
        """theta_k = base^(-2k / rotary_dim), k = 0 .. rotary_dim/2 - 1, float64, rescaled
        by ``scaling`` (see :func:`scaled_frequencies`) for a call whose largest
        position is ``seq_len - 1`` (dynamic NTK and LongRoPE depend on it)."""
        return scaled_frequencies(self.base, self.rotary_dim, self.scaling, seq_len)[0].to(device)

    def _frequency_set(self, seq_len: int):
        """A key for the frequencies of a call whose largest position is ``seq_len - 1``:
        one set, except past the original context for LongRoPE (the long factors) and for
        dynamic NTK. Dynamic NTK follows transformers' state: it grows to the longest
        call seen past the context N and keeps that, until a call shorter than N resets
        it (the frequencies of length ``_dynamic_len``)."""
        kind = None if self.scaling is None else self.scaling["rope_type"]
        if kind == "dynamic":
            N = self.scaling["max_position_embeddings"]
            if seq_len > max(self._dynamic_len, N):
                self._dynamic_len = seq_len
            elif seq_len < N:
                self._dynamic_len = 0
            return self._dynamic_len if self._dynamic_len > N else "base"
        if kind == "longrope" and seq_len > self.scaling["original_max_position_embeddings"]:
            return "long"
        return "base"

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32):
        """(cos, sin) of ``positions * theta`` times ``attention_scaling``: each
        (*positions.shape, rotary_dim / 2)."""
        positions = self._check_positions(positions)
        need = int(positions.max()) + 1 if positions.numel() else 0
        which = self._frequency_set(need)
        key = (positions.device, dtype, which)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < need:
            n = max(need, 2 * (0 if cos is None else cos.shape[0]), 256)
            length = need
            if isinstance(which, int):  # dynamic NTK past the context: one grown length
                n = length = which
                self._tables = {k: t for k, t in self._tables.items() if not isinstance(k[2], int)}
            angle = torch.outer(torch.arange(n, dtype=torch.float64, device=positions.device),
                                self.inv_freq(positions.device, length))
            a = self.attention_scaling
            cos, sin = (angle.cos() * a).to(dtype), (angle.sin() * a).to(dtype)
            self._tables[key] = (cos, sin)
        return cos[positions], sin[positions]

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x (..., L, head_dim) at ``positions`` (L,) or (B, L), where x is
        (..., B, H, L, head_dim) for per-batch positions."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (..., length, head_dim={self.head_dim}), got "
                             f"{tuple(x.shape)}")
        positions = self._check_positions(positions)
        if positions.shape[-1] != x.shape[-2]:
            raise ValueError(f"positions {tuple(positions.shape)} must have the length of x "
                             f"{tuple(x.shape)} (dim -2)")
        if positions.dim() == 2 and (x.dim() < 4 or x.shape[-4] not in (1, positions.shape[0])):
            raise ValueError(f"per-batch positions {tuple(positions.shape)} need x as "
                             f"(B, H, L, head_dim) with B = {positions.shape[0]}, got "
                             f"{tuple(x.shape)}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(positions.to(x.device), work)
        if positions.dim() == 2:  # (B, L, r/2) -> (B, 1, L, r/2), broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        r = self.rotary_dim
        xr = x[..., :r].to(work)
        if self.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
        else:
            x1, x2 = xr[..., :r // 2], xr[..., r // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
        out = out.to(x.dtype)
        if r < self.head_dim:
            out = torch.cat((out, x[..., r:]), -1)
        return out

    def rope(self, query: Tensor, key: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated ``(query, key)``: inputs (..., H, L, head_dim) (head counts may differ,
        lengths match), ``positions`` an integer tensor (L,) or (B, L)."""
        for name, t in (("query", query), ("key", key)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() < 3 or t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must be (..., heads, length, head_dim="
                                 f"{self.head_dim}), got {tuple(t.shape)}")
        if query.shape[-2] != key.shape[-2]:
            raise ValueError(f"query and key must have the same length, got query "
                             f"{tuple(query.shape)} and key {tuple(key.shape)}")
        return self.rotate(query, positions), self.rotate(key, positions)

    forward = rope

    @staticmethod
    def _check_positions(positions) -> Tensor:
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be an integer tensor (L,) or (B, L), got "
                            f"{type(positions).__name__}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.dim() not in (1, 2):
            raise ValueError(f"positions must be (L,) or (B, L), got {tuple(positions.shape)}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got min {int(positions.min())}")
        return positions.long()
