"""Longformer: :class:`AttnkitLongformerSelfAttention` in place of ``LongformerSelfAttention``.

Longformer computes attention in its own module (``set_attn_implementation`` does nothing
for it). The replacement is :class:`attnkit.layers.LongformerAttention` (window and
global tokens as one mask object) with the call signature and return value of
transformers' module, on the very projections of the one it replaces.
:func:`layer_from_hf` gives a plain :class:`~attnkit.layers.LongformerAttention` holding a
copy of such a module's weights instead.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...layers.longformer import LongformerAttention
from .common import no_probabilities

__all__ = ["AttnkitLongformerSelfAttention", "layer_from_hf", "token_flags", "hf_classes",
           "replace", "MODULES", "USES_MASK_INTERFACE"]

USES_MASK_INTERFACE = False

#: the projections of ``LongformerSelfAttention``, by the names both modules use
_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")


def _layer_args(module: nn.Module) -> dict:
    """:class:`LongformerAttention`'s arguments for a transformers ``LongformerSelfAttention``."""
    if not all(hasattr(module, n) for n in ("query_global", "one_sided_attn_window_size")):
        raise TypeError(f"expected a transformers LongformerSelfAttention, got "
                        f"{type(module).__name__}")
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads,
                attention_window=2 * module.one_sided_attn_window_size,
                bias=module.query.bias is not None, dropout=float(module.dropout))


def layer_from_hf(module: nn.Module) -> LongformerAttention:
    """A :class:`LongformerAttention` holding a copy of a transformers
    ``LongformerSelfAttention``'s weights (and its training mode)."""
    args, ref = _layer_args(module), module.query.weight
    layer = LongformerAttention(**args, device=ref.device, dtype=ref.dtype)
    layer.load_state_dict(module.state_dict())
    return layer.train(module.training)


def token_flags(attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None) -> tuple[Tensor | None, Tensor | None]:
    """``(key_padding_mask, global_attention_mask)`` for :class:`LongformerAttention` from
    what ``LongformerSelfAttention`` is called with: the layer-level ``attention_mask``
    (B, L) (< 0 padding, 0 local, > 0 global) or the precomputed ``is_index_masked`` /
    ``is_index_global_attn`` (which win); ``is_global_attn=False`` means no global tokens,
    as transformers then ignores them altogether."""
    pad, glob = is_index_masked, is_index_global_attn
    if attention_mask is not None:
        pad = attention_mask < 0 if pad is None else pad
        glob = attention_mask > 0 if glob is None else glob
    if is_global_attn is False:
        glob = None
    return pad, glob


class AttnkitLongformerSelfAttention(LongformerAttention):
    """:class:`attnkit.layers.LongformerAttention` with the call signature and return value
    of transformers' ``LongformerSelfAttention`` (what ``LongformerAttention`` calls):
    ``attention_mask`` (B, L) holds -10000 for padding, 0 local, +10000 global (or the
    precomputed ``is_index_masked`` / ``is_index_global_attn``); returns ``(out,)`` with
    out (B, L, E), padding rows zero."""

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitLongformerSelfAttention":
        """The attnkit module taking over a transformers ``LongformerSelfAttention``'s
        projections (the same parameters, not copies)."""
        layer = cls(**_layer_args(module), device="meta", dtype=module.query.weight.dtype)
        for name in _PROJECTIONS:
            setattr(layer, name, getattr(module, name))
        layer.layer_id, layer.config = module.layer_id, module.config
        return layer.train(module.training)

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None,
                is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        no_probabilities(self, {}, output_attentions)
        pad, glob = token_flags(attention_mask, is_index_masked, is_index_global_attn,
                                is_global_attn)
        out = LongformerAttention.forward(self, hidden_states, key_padding_mask=pad,
                                          global_attention_mask=glob)
        return (out,)


#: the attnkit modules of this family
MODULES = (AttnkitLongformerSelfAttention,)


def hf_classes() -> tuple:
    """The transformers classes :func:`replace` takes."""
    from transformers.models.longformer import modeling_longformer as longformer
    return (longformer.LongformerSelfAttention,)


def replace(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name>`` (a ``LongformerSelfAttention``) becomes an
    :class:`AttnkitLongformerSelfAttention` on the same projections."""
    setattr(parent, name, AttnkitLongformerSelfAttention.from_hf(child))
