"""torch's own fused ``scaled_dot_product_attention``: the fastest path for dense
attention and for masks simple enough to hand over as one tensor.

Differences it has to be shielded from: torch's ``is_causal`` is top-left aligned (we
pass it only when L == S and build a bottom-right mask otherwise) and masks before it
scales (we pass it only for a positive scale), and torch leaves the output of a row that
sees nothing to the kernel (we zero it, as the contract says).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..bias import Bias
from ..masks import CausalMask, Grid, Mask

__all__ = ["torch_attention", "saturated_rows"]

#: a finite additive mask this negative on a whole row (transformers' finfo.min, the
#: -1e9 of older code) leaves that row's log-sum-exp too large to recompute P = exp(s -
#: lse) from in float32 (finfo.min + log n rounds back to finfo.min)
SATURATED = -2.0 ** 11


def saturated_rows(bias: Bias | Tensor | None) -> bool:
    """Whether a dense float mask (a TensorBias, or the float attn_mask handed to torch,
    with -inf where a mask object masks) masks some row entirely with finite numbers so
    large that a kernel recomputing probabilities from the log-sum-exp gets them wrong:
    the row's largest entry among those not -inf is below SATURATED."""
    t = bias if isinstance(bias, Tensor) else getattr(bias, "bias", None)
    if t is None or not t.is_floating_point():
        return False
    top = t.amax(-1)
    return bool(((top < SATURATED) & torch.isfinite(top)).any())


def _selects(attn_mask: Tensor | None, S: int) -> bool:
    """Whether every row of a dense mask lets through at most one key (the attention is
    then a selection of value rows, its exact gradients for q and k are zero)."""
    if S == 1:
        return True
    if attn_mask is None:
        return False
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    return bool((allowed.sum(-1) <= 1).all())


def dense_additive(mask: Mask | None, bias: Bias | None, grid: Grid, dtype):
    """(attn_mask for torch, rows-alive or None) for the whole grid; masks stay bool when
    there is no bias so torch can pick its bool fast paths."""
    allow = None if mask is None else mask.tile(grid, 0, grid.q_len, 0, grid.k_len)
    if bias is None:
        return allow, (None if allow is None else allow.any(-1))
    add = bias.tile(grid, 0, grid.q_len, 0, grid.k_len).to(dtype)
    if allow is not None:
        add = add.masked_fill(~allow, float("-inf"))
    alive = (add > float("-inf")).any(-1) if (allow is not None or bias.may_mask) else None
    return add, alive


def torch_attention(query: Tensor, key: Tensor, value: Tensor, *, mask: Mask | None = None,
                    bias: Bias | None = None, scale: float, dropout_p: float = 0.0,
                    grid: Grid | None = None) -> Tensor:
    """(B, Hq, L, D) x (B, Hkv, S, D) -> (B, Hq, L, Dv) through torch SDPA."""
    L, S = query.shape[2], key.shape[2]
    grid = Grid(L, S, query.device) if grid is None else grid
    gqa = query.shape[1] != key.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    # torch's own causal path masks with -inf before scaling: a zero or negative scale
    # would turn masked entries into NaN or +inf, so those get the mask as a tensor
    if (isinstance(mask, CausalMask) and bias is None and L == S and grid.affine
            and scale > 0 and not (needs_grad and S == 1)):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p,
                                              is_causal=True, scale=scale, enable_gqa=gqa)
    attn_mask, alive = dense_additive(mask, bias, grid, query.dtype)
    kernel = None
    if needs_grad and (saturated_rows(attn_mask) or _selects(attn_mask, S)):
        # torch's fused backward recomputes P = exp(s - lse) with s from another product:
        # wrong on saturated rows (lse lost its digits), and on a row's single key not
        # exactly 1, which is the whole gradient when every row selects one key (dq, dk
        # must then be exactly 0). Its math kernel differentiates the softmax itself.
        kernel = SDPBackend.MATH
    with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                             dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if alive is not None and not bool(alive.all()):
        out = out.masked_fill(~alive.unsqueeze(-1), 0.0)
    return out


def not_supported_reasons(p) -> list[str]:
    """torch SDPA has no softcap, no sinks, and returns neither weights nor lse."""
    asked = (("softcap", p.softcap is not None), ("sinks", p.sinks),
             ("return_weights", p.return_weights), ("return_lse", p.return_lse))
    return [name for name, given in asked if given]
