"""``attnkit.scaled_dot_product_attention``: validate, normalise, pick a backend, run it.

Everything a caller can pass is reduced to four things before any backend runs:
query/key/value as (B, H, L, D), one :class:`~attnkit.masks.Mask` (or None), one
:class:`~attnkit.bias.Bias` (or None), and plain numbers. Backends never see the
caller's shapes, tensors-or-objects choices or ``is_causal``.
"""

from __future__ import annotations

import math
import numbers
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import BACKENDS, chunked_attention, reference_attention, torch_attention
from .backends.chunked.selected import selected_attention
from .backends.decode import decode_attention
from .backends.dispatch import Choice, Problem, allowed_fraction, choose
from .bias import Bias, TensorBias
from .checks import check_qkv, shape_of
from .dtypes import matmul_dtype
from .masks import (AndMask, CausalMask, Grid, Mask, PaddingMask, SelectedMask, TensorMask,
                    causal as causal_mask)

__all__ = ["scaled_dot_product_attention", "explain", "allowed_fraction"]

def _to_4d(t: Tensor, name: str, batch: torch.Size, heads: int, L: int, S: int) -> Tensor:
    """Broadcast a mask/bias tensor right-aligned against (*batch, heads, L, S) and fold
    its batch dims into one: (B|1, H|1, L|1, S|1). Refuses anything that does not
    broadcast rather than reinterpreting it."""
    target = (*batch, heads, L, S)
    bad = t.dim() > len(target) or t.dim() == 0 or any(
        s != 1 and s != want for s, want in zip(reversed(t.shape), reversed(target)))
    if bad:
        raise ValueError(f"{name} of shape {shape_of(t)} does not broadcast to "
                         f"(..., heads, L, S) = {target}; give per-batch masks as (B, 1, L, S)")
    while t.dim() < 3:
        t = t.unsqueeze(0)
    lead = t.shape[:-3]
    if all(s == 1 for s in lead):
        return t.reshape(1, *t.shape[-3:])
    t = t.reshape((1,) * (len(batch) - len(lead)) + tuple(t.shape))
    return t.expand(*batch, *t.shape[-3:]).reshape(-1, *t.shape[-3:])


def _check_dims(obj, what: str, B: int, Hq: int):
    bs, nh = getattr(obj, "batch_size", None), getattr(obj, "num_heads", None)
    if bs not in (None, 1, B):
        raise ValueError(f"{what} {obj!r} is for batch size {bs} but the batch is {B}")
    if nh not in (None, 1, Hq):
        raise ValueError(f"{what} {obj!r} is for {nh} heads but the query has {Hq} heads")


def _number(name, x, *, positive=False):
    if isinstance(x, Tensor) and x.dim() == 0:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {x}")
    return x


def _check_enable_gqa(enable_gqa) -> None:
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, bias, softcap,
             sinks, return_weights, return_lse, backend) -> SimpleNamespace:
    """Validate a call and reduce it to one Mask, one Bias, plain numbers and the
    :class:`~attnkit.backends.dispatch.Problem` the backends are chosen for."""
    check_qkv(query, key, value)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {backend!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    batch = query.shape[:-3]
    Hq, L, D = query.shape[-3:]
    Hkv, S = key.shape[-3], key.shape[-2]
    Dv = value.shape[-1]
    B = math.prod(batch)

    dropout_p = _number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(D) if scale is None else _number("scale", scale)
    if softcap is not None:
        softcap = _number("softcap", softcap, positive=True)

    # ---- one Mask and one Bias, whatever the caller gave
    mask: Mask | None = None
    add: Bias | None = None
    if isinstance(attn_mask, Mask):
        mask = attn_mask
    elif isinstance(attn_mask, Tensor):
        if attn_mask.dtype == torch.bool:
            mask = TensorMask(_to_4d(attn_mask, "attn_mask", batch, Hq, L, S))
        elif attn_mask.is_floating_point():
            add = TensorBias(_to_4d(attn_mask, "attn_mask", batch, Hq, L, S), may_mask=True)
        else:
            raise TypeError(f"attn_mask must be bool (True = may attend) or float (added to "
                            f"the scores), got {attn_mask.dtype} of shape {shape_of(attn_mask)}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    elif attn_mask is not None:
        raise TypeError(f"attn_mask must be a tensor or an attnkit mask, got "
                        f"{type(attn_mask).__name__}")
    if is_causal:
        mask = causal_mask() if mask is None else causal_mask() & mask
    if isinstance(bias, Tensor):
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
        bias = TensorBias(_to_4d(bias, "bias", batch, Hq, L, S))
    elif bias is not None and not isinstance(bias, Bias):
        hint = (f" (a bias module: pass {type(bias).__name__}(...).bias(L, S))"
                if callable(getattr(bias, "bias", None)) else "")
        raise TypeError(f"bias must be a tensor or an attnkit bias, got "
                        f"{type(bias).__name__}{hint}")
    if bias is not None:
        add = bias if add is None else add + bias
    # where the query rows sit (a ragged or packed mask may put them per row), and the
    # dtype bias arithmetic runs in: the input's accumulation type
    positions = None if mask is None else mask.query_positions(L, S)
    if positions is not None:
        positions = positions.to(query.device)
    grid = Grid(L, S, query.device, query_positions=positions,
                dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    for obj, what in ((mask, "attn_mask"), (add, "bias")):
        if obj is not None:
            _check_dims(obj, what, B, Hq)
            obj.validate(grid)
    if sinks is not None:
        if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be a float tensor of shape ({Hq},), got "
                            f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
        if sinks.shape != (Hq,):
            raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), got {shape_of(sinks)}")

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    problem = Problem(B, Hq, Hkv, L, S, D, Dv, query.dtype, query.device, mask, add, grid,
                      dropout_p, softcap, sinks is not None, return_weights, return_lse,
                      needs_grad)
    return SimpleNamespace(batch=batch, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, Dv=Dv,
                           dropout_p=dropout_p, scale=scale, softcap=softcap, mask=mask,
                           add=add, grid=grid, problem=problem)


def explain(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
            enable_gqa: bool = False, *, bias=None, softcap: float | None = None,
            sinks: Tensor | None = None, return_weights: bool = False, return_lse: bool = False,
            backend: str = "auto") -> Choice:
    """Which backend :func:`scaled_dot_product_attention` would run this call on, and why,
    without running it: ``print(attnkit.explain(q, k, v, mask))``. The returned
    :class:`~attnkit.backends.dispatch.Choice` has ``backend``, ``reason`` and, per
    backend that cannot run the call, ``rejected[name]`` (its reasons)."""
    _check_enable_gqa(enable_gqa)
    c = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, bias, softcap,
                 sinks, return_weights, return_lse, backend)
    if _selected_plan(c, backend) is not None:
        return Choice("chunked", "a token-level selection (masks.selected): the engine "
                      "gathers each row's chosen keys, O(L x k) work and memory", asked=backend)
    if _decode_plan(c, backend) is not None:
        return Choice("decode", f"a decoding step ({c.L} query rows <= {DECODE_ROWS} over "
                      f"{c.S} keys >= {DECODE_KEYS}, at most causal and key-length masks, no "
                      f"bias, dropout or gradient): the "
                      f"split-KV decode kernel reads the cache once, in its own dtype")
    return choose(c.problem, backend)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False, *,
                                 bias=None,
                                 softcap: float | None = None, sinks: Tensor | None = None,
                                 return_weights: bool = False, return_lse: bool = False,
                                 backend: str = "auto"):
    r"""Attention ``softmax(scale * Q K^T + bias, masked) V``.

    A drop-in for ``torch.nn.functional.scaled_dot_product_attention``: its arguments,
    positional and keyword, with torch's meaning, and one intended difference: with
    ``is_causal`` and L != S the last query sees every key (bottom-right alignment, as
    in decoding with a cache), where torch's causal mask is top-left.

    Args:
        query: (..., Hq, L, D).
        key: (..., Hkv, S, D), Hq % Hkv == 0; query head h reads kv head h // (Hq/Hkv)
            (grouped-query attention; Hkv == 1 is multi-query) without copying K/V.
        value: (..., Hkv, S, Dv).
        attn_mask: a bool tensor (True = may attend), a float tensor (added to the
            scores) broadcastable to (..., Hq, L, S), or an :mod:`attnkit.masks` object.
        dropout_p: dropout on the weights.
        is_causal: query row i at position p = i + (S - L) sees keys 0..p (bottom-right,
            unlike torch's top-left when L != S); combines with ``attn_mask``.
        scale: score scale, default 1/sqrt(D).
        enable_gqa: torch's flag, accepted so that torch's calls run unchanged. attnkit
            computes grouped-query attention whenever Hkv divides Hq, so True and False
            give the same result (torch raises for unequal heads without it).
        bias: a float tensor broadcastable to (..., Hq, L, S) or an :mod:`attnkit.bias`
            object, added to the scores unscaled.
        softcap: scores become ``softcap * tanh(s / softcap)`` before bias and mask.
        sinks: (Hq,) per-head logits that join each row's softmax denominator.
        return_weights: also return the weights (..., Hq, L, S) after dropout.
        return_lse: also return the log-sum-exp of each row's scores (..., Hq, L),
            -inf for rows that see nothing (with sinks: the full denominator's).
        backend: "auto", "reference", "chunked", "torch" or "flex".

    Returns:
        out (..., Hq, L, Dv), followed by the weights and lse when asked, as a tuple.
        A query row that may attend to nothing gets zeros.
    """
    _check_enable_gqa(enable_gqa)
    c = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, bias, softcap,
                 sinks, return_weights, return_lse, backend)
    done = _decode_call(c, backend, query, key, value)
    if done is None:
        done = _selected_call(c, backend, query, key, value)
    if done is not None:
        return done
    backend = choose(c.problem, backend).backend
    batch, B, Hq, Hkv, L, S, D, Dv = c.batch, c.B, c.Hq, c.Hkv, c.L, c.S, c.D, c.Dv
    mask, add, grid, scale, softcap, dropout_p = (c.mask, c.add, c.grid, c.scale, c.softcap,
                                                  c.dropout_p)

    # ---- run on (B, H, L, D)
    q = query.reshape(B, Hq, L, D)
    k = key.reshape(B, Hkv, S, D)
    v = value.reshape(B, Hkv, S, Dv)
    weights = lse = None
    dtype = q.dtype
    if backend in ("chunked", "torch") and matmul_dtype(dtype, q.device) != dtype:
        # this CPU multiplies this half dtype slowly (no native kernels): the fast
        # backends run on float32 copies, more accurate and several times faster there
        q, k, v = q.float(), k.float(), v.float()
    if (backend in ("chunked", "torch") and D != Dv and L >= 16 and q.device.type == "cpu"
            and dropout_p == 0 and softcap is None and not return_weights):  # fused-kernel calls
        q, k, v = _equal_head_dims(q, k, v)
    if L == 0 or S == 0 or B == 0:
        out, weights, lse = _empty(q, v, S, sinks)
    elif backend == "reference":
        out, weights, lse = reference_attention(q, k, v, mask=mask, bias=add, scale=scale,
                                                softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                                                grid=grid)
    elif backend == "chunked":
        out, weights, lse = chunked_attention(q, k, v, mask=mask, bias=add, scale=scale,
                                              softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                                              return_weights=return_weights, grid=grid,
                                              need_lse=return_lse)
    elif backend == "torch":
        out = torch_attention(q, k, v, mask=mask, bias=add, scale=scale, dropout_p=dropout_p,
                              grid=grid)
    else:
        from .backends.flex import flex_attention_backend
        out, lse = flex_attention_backend(q, k, v, mask=mask, bias=add, scale=scale,
                                          softcap=softcap, sinks=sinks, return_lse=return_lse,
                                          grid=grid)

    out = out.to(dtype)[..., :Dv].reshape(*batch, Hq, L, Dv)
    if weights is not None:
        weights = weights.to(dtype)
    if not (return_weights or return_lse):
        return out
    result = [out]
    if return_weights:
        result.append(weights.reshape(*batch, Hq, L, S))
    if return_lse:
        result.append(lse.reshape(*batch, Hq, L))
    return tuple(result)


#: a call is "decoding" with up to this many query rows (one token, or a few speculative
#: drafts) over at least DECODE_KEYS keys; shorter calls cost little on any path
DECODE_ROWS, DECODE_KEYS = 16, 256


def _decode_call(c, backend: str, query: Tensor, key: Tensor, value: Tensor):
    """Decoding steps (a few query rows over a long cache, no bias, no dropout, at most a
    causal and a key-length mask, no gradient) on the split-KV decode kernel, which reads
    the cache once in its own dtype; None for every other call."""
    split = _decode_plan(c, backend)
    if split is None:
        return None
    is_causal, lengths = split
    p = c.problem
    q = query.reshape(c.B, c.Hq, c.L, c.D)
    k, v = key.reshape(c.B, c.Hkv, c.S, c.D), value.reshape(c.B, c.Hkv, c.S, c.Dv)
    out = decode_attention(q, k, v, scale=c.scale, key_lengths=lengths, is_causal=is_causal,
                           need_lse=p.return_lse)
    if not p.return_lse:
        return out.reshape(*c.batch, c.Hq, c.L, c.Dv)
    out, lse = out
    return out.reshape(*c.batch, c.Hq, c.L, c.Dv), lse.reshape(*c.batch, c.Hq, c.L)


def _decode_plan(c, backend: str):
    """``(is_causal, key_lengths)`` when the call is a decoding step for the decode kernel."""
    p = c.problem
    if (backend != "auto" or c.L > DECODE_ROWS or c.L == 0 or c.S < DECODE_KEYS or c.B == 0
            or p.device.type != "cpu" or c.add is not None or c.softcap is not None
            or p.sinks or c.dropout_p or p.return_weights or p.needs_grad):
        return None
    return _causal_and_lengths(c.mask, c.L)


def _causal_and_lengths(mask, L: int):
    """``(is_causal, key_lengths or None)`` when ``mask`` is no mask, the causal mask, a
    key-length padding mask whose queries end each sequence (``query_lengths`` all L), or
    causal & such a padding mask; None otherwise."""
    parts = [] if mask is None else (
        [mask.a, mask.b] if isinstance(mask, AndMask) else [mask])
    is_causal, lengths = False, None
    for m in parts:
        if isinstance(m, CausalMask) and not is_causal:
            is_causal = True
        elif (isinstance(m, PaddingMask) and lengths is None
              and (m.query_lengths is None or bool((m.query_lengths == L).all()))):
            lengths = m.lengths
        else:
            return None
    return is_causal, lengths


def _and_parts(mask) -> list:
    if isinstance(mask, AndMask):
        return _and_parts(mask.a) + _and_parts(mask.b)
    return [mask]


def _selected_plan(c, backend: str):
    """``(indices, other mask or None)`` when the call's mask is a token-level selection
    (alone or ``&`` other masks) the gathering kernel runs: no bias, softcap, sinks,
    dropout or weights; None otherwise."""
    p = c.problem
    if (backend not in ("auto", "chunked") or c.mask is None or c.add is not None
            or c.softcap is not None or p.sinks or c.dropout_p or p.return_weights
            or c.L == 0 or c.S == 0 or c.B == 0):
        return None
    parts = _and_parts(c.mask)
    chosen = [m for m in parts if isinstance(m, SelectedMask) and m.per_token]
    if len(chosen) != 1 or chosen[0].indices.shape[1] not in (1, c.Hq):
        return None
    rest = [m for m in parts if m is not chosen[0]]
    other = None
    for m in rest:
        other = m if other is None else other & m
    return chosen[0].indices, other


def _selected_call(c, backend: str, query: Tensor, key: Tensor, value: Tensor):
    """Token-level selections (DSA's top-k) on the kernel that gathers each row's keys."""
    plan = _selected_plan(c, backend)
    if plan is None:
        return None
    indices, other = plan
    q = query.reshape(c.B, c.Hq, c.L, c.D)
    k, v = key.reshape(c.B, c.Hkv, c.S, c.D), value.reshape(c.B, c.Hkv, c.S, c.Dv)
    out, lse = selected_attention(q, k, v, indices, scale=c.scale, other=other, grid=c.grid)
    out = out.reshape(*c.batch, c.Hq, c.L, c.Dv)
    if not c.problem.return_lse:
        return out
    return out, lse.reshape(*c.batch, c.Hq, c.L)


def _equal_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with zero columns appended to the narrower head dim (values, or queries and
    keys), so that D == Dv. torch's fused CPU kernel needs one head dim; without it torch
    runs its math kernel and the tiled engine its eager one. Zero columns change no score
    and add output columns that are cut off after. Measured (16 heads, DeepSeek's D = 192,
    Dv = 128, 2 cores): a causal 2048-token call 1033 -> 267 ms; for fewer than 16 query
    rows the copy of the values costs what the math kernel loses (1 row at 4096 keys: 40
    vs 46 ms), so the caller pads only from 16 rows on."""
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        return q, k, F.pad(v, (0, D - Dv))
    return F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D)), v


def _empty(q: Tensor, v: Tensor, S: int, sinks):
    """No queries or no keys: zeros out, empty weights, lse -inf (or the sink)."""
    B, Hq, L, _ = q.shape
    out = q.new_zeros(B, Hq, L, v.shape[-1])
    weights = q.new_zeros(B, Hq, L, S)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((B, Hq, L), float("-inf"), dtype=stat, device=q.device)
    if sinks is not None:
        lse = sinks.to(stat).view(1, Hq, 1).expand(B, Hq, L).clone()
    return out, weights, lse
