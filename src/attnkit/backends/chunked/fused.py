"""The one place that touches torch's private fused CPU attention kernels.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p,
is_causal, attn_mask=, scale=)`` returns ``(out, logsumexp)`` and its ``_backward``
recomputes gradients from a saved output and log-sum-exp. Partial results over disjoint
key sets merge exactly with the log-sum-exp rule, which is what the chunked engine needs.
Known traits, all handled by the caller:

* float masks only (bool raises), 2-D or 4-D, in the query's dtype or, for half
  precision queries, in float32 (added to the float32 scores as they are: a bias need
  not be rounded to half precision; :func:`takes_float32_masks` checks it);
* a row whose keys are all masked gets ``out = 0`` and ``lse = 0`` (not -inf);
* no dropout, equal head dims for q/k/v, CPU tensors only; key/value may have fewer
  heads than the query (grouped-query attention, head h reads kv head h // groups).

Private ops can change between torch versions, so :func:`available` checks the op once
against a three-line eager computation and the engine falls back to its eager kernel
when the op is missing or disagrees.
"""

from __future__ import annotations

import functools

import torch

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

#: set to False to force the eager kernel everywhere (tests use this)
enabled = True

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _self_test() -> bool:
    if _FWD is None or _BWD is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
        k = torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64)
        v = torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64)
        add = torch.zeros(3, 5, dtype=torch.float64)
        add[1, 3:] = float("-inf")
        out, lse = _FWD(q, k, v, 0.0, False, attn_mask=add.view(1, 1, 3, 5), scale=0.5)
        s = 0.5 * q @ k.transpose(-1, -2) + add
        ref_lse = s.logsumexp(-1)
        ref = s.softmax(-1) @ v
        return bool(torch.allclose(out, ref) and torch.allclose(lse, ref_lse))
    except Exception:  # pragma: no cover - depends on the torch build
        return False


@functools.lru_cache(maxsize=None)
def takes_float32_masks(dtype: torch.dtype) -> bool:
    """Whether the kernels add a float32 mask to ``dtype`` (half precision) queries'
    float32 scores without rounding it: a bias of 1000.25 must survive, which bfloat16
    (8 bits) or float16 (11) would round away."""
    if not _self_test():
        return False
    try:
        q = torch.zeros(1, 1, 1, 8, dtype=dtype)
        k = torch.zeros(1, 1, 2, 8, dtype=dtype)
        v = torch.tensor([0.0, 1.0], dtype=dtype).view(1, 1, 2, 1).expand(1, 1, 2, 8)
        v = v.contiguous()
        add = torch.tensor([[1000.0, 1000.25]]).view(1, 1, 1, 2)  # weights 0.438, 0.562
        out, lse = _FWD(q, k, v, 0.0, False, attn_mask=add, scale=1.0)
        want = torch.softmax(add.double(), -1)[..., 1].item()
        dq, dk, dv = _BWD(torch.ones_like(out), q, k, v, out, lse, 0.0, False,
                          attn_mask=add, scale=1.0)
        return (abs(float(out[0, 0, 0, 0]) - want) < 0.01 and abs(float(lse) - float(
            add.double().logsumexp(-1))) < 1e-3 and abs(float(dv[0, 0, 1, 0]) - want) < 0.01)
    except Exception:  # pragma: no cover - depends on the torch build
        return False


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can the fused kernel compute this (q, k, v) segment?"""
    return (enabled and q.device.type == "cpu" and q.dtype in _DTYPES
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and _self_test())


def forward(q, k, v, add, scale: float, causal: bool = False):
    """(out, lse) of softmax(scale * q k^T + add) v; ``add`` is None or (B|1, H|1, Lq, Sk);
    ``causal``: query row i sees keys 0..i (top-left), blocks above skipped."""
    return _FWD(q, k, v, 0.0, causal, attn_mask=add, scale=scale)


def backward(dout, q, k, v, out, lse, add, scale: float, causal: bool = False):
    """(dq, dk, dv) of one key segment given the *global* output and log-sum-exp."""
    return _BWD(dout, q, k, v, out, lse, 0.0, causal, attn_mask=add, scale=scale)
