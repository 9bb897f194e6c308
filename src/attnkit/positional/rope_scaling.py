"""RoPE scaling: the frequencies that stretch a rotary embedding past the context it was
trained on, as transformers' ``modeling_rope_utils`` computes them.

With ``theta_k = base^(-2k / d)`` (d = rotary_dim, k = 0 .. d/2 - 1) and ``s`` the
``factor``:

* ``linear`` (position interpolation): ``theta_k / s``;
* ``dynamic`` (NTK-aware, growing with the call's length n past the context N):
  ``base' = base * (s n / N - (s - 1))^(d / (d - 2))``, unchanged for n <= N;
* ``yarn``: each frequency a blend of ``theta_k`` (fast pairs, which rotate often within
  the original context) and ``theta_k / s`` (slow pairs), ramped linearly between the
  pairs that make ``beta_fast`` and ``beta_slow`` turns over it, and an attention factor
  ``0.1 ln s + 1`` (or from ``mscale``, ``mscale_all_dim``) on cos and sin;
* ``llama3``: ``theta_k / s`` for wavelengths past ``N / low_freq_factor``, ``theta_k``
  below ``N / high_freq_factor``, a smooth blend between;
* ``longrope`` (Phi-3): ``theta_k / f_k`` with per-pair factors, ``short_factor`` up
  to the original context and ``long_factor`` past it, and an attention factor
  ``sqrt(1 + ln s / ln N)``.

``scaling`` is a dict in transformers' ``rope_parameters`` form. transformers reads the
context length of ``dynamic`` from the model config: here it is the dict's
``max_position_embeddings``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ROPE_TYPES", "check_scaling", "scaled_frequencies", "yarn_mscale"]

#: the key each RoPE type needs in ``scaling`` (beyond ``rope_type``)
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(_REQUIRED)


def check_scaling(scaling: dict | None) -> dict | None:
    """``scaling`` validated (a copy), or None for plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict in transformers' rope_parameters form or None, "
                        f"got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _REQUIRED:
        raise ValueError(f"scaling['rope_type'] must be one of {', '.join(ROPE_TYPES)}, "
                         f"got {kind!r}")
    missing = [k for k in _REQUIRED[kind] if scaling.get(k) is None]
    if kind in ("yarn", "longrope") and scaling.get("factor") is None and \
            scaling.get("max_position_embeddings") is None:
        missing.append("factor (or max_position_embeddings)")
    if missing:
        raise ValueError(f"scaling of rope_type {kind!r} needs {', '.join(missing)}")
    factor = scaling.get("factor")
    if factor is not None and (isinstance(factor, bool) or not factor > 0):
        raise ValueError(f"scaling['factor'] must be > 0, got {factor!r}")
    return {**scaling, "rope_type": kind}


def scaled_frequencies(base: float, dim: int, scaling: dict | None,
                       seq_len: int | None = None) -> tuple[Tensor, float]:
    """(inverse frequencies (dim / 2,) float64, attention factor) for a call whose
    largest position is ``seq_len - 1`` (None: the original context)."""
    k = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    theta = base ** -k
    kind = "default" if scaling is None else scaling["rope_type"]
    if kind == "default":
        return theta, 1.0
    factor = scaling.get("factor")
    if kind == "linear":
        return theta / factor, 1.0
    if kind == "dynamic":
        n, N = seq_len or 0, scaling["max_position_embeddings"]
        if n <= N:
            return theta, 1.0
        stretched = base * (factor * n / N - (factor - 1)) ** (dim / (dim - 2))
        return stretched ** -k, 1.0
    N = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = scaling["max_position_embeddings"] / N
    if kind == "yarn":
        return _yarn(theta, base, dim, factor, N, scaling)
    if kind == "llama3":
        return _llama3(theta, factor, N, scaling), 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(N))
    long = seq_len is not None and seq_len > N
    ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
    if ext.shape != theta.shape:
        raise ValueError(f"longrope factors must have rotary_dim / 2 = {theta.numel()} entries, "
                         f"got {ext.numel()}")
    return theta / ext, float(attention)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor for a context stretched ``scale`` times (its Eq. 21):
    ``0.1 * mscale * ln(scale) + 1``, and 1 for ``scale <= 1``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(theta, base, dim, factor, N, scaling):
    attention = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None:
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else yarn_mscale(factor))
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def pair_of(turns):  # the pair that makes ``turns`` rotations over the context N
        return dim * math.log(N / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_of(beta_fast), pair_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the pair keeps theta_k (extrapolation), 0: theta_k / factor
    return theta / factor * (1 - keep) + theta * keep, float(attention)


def _llama3(theta, factor, N, scaling):
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / theta
    scaled = torch.where(wavelen > N / low, theta / factor, theta)
    smooth = (N / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= N / high) & (wavelen <= N / low)
    return torch.where(medium, blended, scaled)
