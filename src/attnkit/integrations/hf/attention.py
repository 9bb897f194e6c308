"""transformers' attention interface, computed by ``attnkit.scaled_dot_product_attention``.

Every attention layer that routes through ``ALL_ATTENTION_FUNCTIONS`` calls

    attn_output, attn_weights = attention_interface(module, query, key, value,
                                                    attention_mask, dropout=..., scaling=...,
                                                    **model_specific_kwargs)

with query (B, Hq, L, D) and key/value (B, Hkv, S, D) already projected, rotated and
taken from the cache, and expects attn_output as (B, L, Hq, D). What the models pass, and
where it goes in attnkit's one formula ``softmax(softcap(scale * Q K^T) + bias, masked) V``:

=========================  ===============================================================
transformers               attnkit
=========================  ===============================================================
``attention_mask``         ``attn_mask``: the :class:`PreparedMask` our mask interface built,
                           or a tensor the caller built (bool: True = attend; float: added)
``scaling``                ``scale`` (T5 passes 1.0)
``dropout``                ``dropout_p`` (models pass 0 outside training)
fewer K/V heads (GQA)      passed as they are: attnkit reads head h // (Hq / Hkv)
``softcap`` (Gemma 2)      ``softcap``
``position_bias`` (T5)     ``bias`` (added unscaled, as T5 does)
``s_aux`` (GPT-OSS)        ``sinks``
``output_attentions``      ``return_weights``
``sliding_window``         already in the mask transformers asked our mask interface for
=========================  ===============================================================
"""

from __future__ import annotations

from torch import Tensor

from ...functional import scaled_dot_product_attention
from .mask_interface import PreparedMask

__all__ = ["attention_forward", "attention_mask_for"]


def _wants_weights(module, kwargs) -> bool:
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def attention_mask_for(module, attention_mask, is_causal, L: int, S: int):
    """(attn_mask, is_causal) for attnkit from what the layer received."""
    if isinstance(attention_mask, PreparedMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (L, S):
            raise ValueError(
                f"attention_mask was built for (q_length, kv_length) = "
                f"({attention_mask.q_length}, {attention_mask.kv_length}) but query has "
                f"length {L} and key {S}")
        return attention_mask.mask, False
    if attention_mask is None:
        # no mask was built for this layer (a module called on its own): like "sdpa",
        # follow the layer's own is_causal (bottom-right aligned, right for a KV cache)
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        return None, bool(is_causal)
    if isinstance(attention_mask, Tensor):
        return attention_mask, False
    raise TypeError(f"attention_mask must be a tensor, None or a mask built by attnkit's mask "
                    f"interface, got {type(attention_mask).__name__}")


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: Tensor | None = None,
                      softcap: float | None = None, s_aux: Tensor | None = None, **kwargs):
    """``AttentionInterface`` entry: attention of one layer through attnkit.

    Args:
        module: the calling attention layer (read for ``is_causal`` and ``config``).
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D), Hq % Hkv == 0.
        attention_mask: a :class:`PreparedMask`, a bool/float tensor broadcastable to
            (B, Hq, L, S), or None.
        dropout, scaling, softcap: as the layer passes them.
        position_bias: T5's (1|B, Hq, L, S) relative bias, added to the scores.
        s_aux: GPT-OSS's (Hq,) learnable sink logits.
        **kwargs: ``output_attentions`` is honoured; ``sliding_window`` is already part of
            the mask; per-token ``sinks`` raise NotImplementedError; the rest (cache and
            packing bookkeeping for other kernels) is not needed.

    Returns:
        (out (B, L, Hq, D), weights (B, Hq, L, S) or None).
    """
    if kwargs.get("sinks") is not None:
        raise NotImplementedError(
            f"this model passes `sinks` of shape {tuple(kwargs['sinks'].shape)} (per token); "
            f"attnkit's sinks are one logit per head (s_aux, as GPT-OSS passes them)")
    L, S = query.shape[-2], key.shape[-2]
    attn_mask, causal = attention_mask_for(module, attention_mask, is_causal, L, S)
    want_weights = _wants_weights(module, kwargs)
    result = scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal,
        scale=scaling, bias=position_bias, softcap=softcap, sinks=s_aux,
        return_weights=want_weights)
    out, weights = result if want_weights else (result, None)
    return out.transpose(1, 2).contiguous(), weights
