"""T5 and mT5: :class:`AttnkitT5Attention` in place of ``T5Attention`` / ``MT5Attention``.

T5 routes through transformers' attention interface, but hands it a dense ``(1, H, L, S)``
relative position bias that the first layer of each stack computes and every later layer
reuses. Here that bias is an attnkit :class:`~attnkit.positional.t5.T5Bias` built from the
same ``relative_attention_bias`` table: the tiled engine evaluates it tile by tile, the
first layer hands the *object* on as ``position_bias``, and no (L, S) tensor is ever made.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...positional.t5 import T5RelativeBias
from .attention import attention_forward
from .common import the_cache

__all__ = ["AttnkitT5Attention", "hf_classes", "replace", "MODULES", "USES_MASK_INTERFACE"]

#: patch() switches a model holding these to the "attnkit" attention implementation, so
#: that padding and causal masks reach the layers as attnkit mask objects
USES_MASK_INTERFACE = True


class AttnkitT5Attention(nn.Module):
    """T5's attention (self or cross, encoder or decoder) computed by attnkit.

    Scores are ``q . k`` (T5 does not scale) plus, in self-attention, the relative
    position bias ``table[bucket(j - i), h]`` with query row ``r`` at position
    ``i = past + r`` (``past`` = tokens already in the cache), bidirectional buckets in
    the encoder, causal ones in the decoder; cross-attention adds no position bias.
    The layer holding ``relative_attention_bias`` (the first of each stack) returns the
    bias as an attnkit :class:`~attnkit.positional.t5.T5Bias`; T5's stack hands it to
    every later layer as ``position_bias``, as it does T5's dense tensor.

    Same attributes and submodules as transformers' ``T5Attention`` (``q, k, v, o``,
    ``relative_attention_bias``), same ``forward`` arguments and return value
    ``(attn_output (B, L, d_model), position_bias, attn_weights or None)``, where
    ``position_bias`` is the bias object (None when there is none: T5 returns zeros).
    The masks may be what any attention implementation builds (attnkit mask objects, bool
    or additive float tensors, or None: then the decoder's self-attention is causal).
    """

    def __init__(self, config, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                 relative_attention_bias: nn.Embedding | None = None, *,
                 is_decoder: bool = False, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.is_decoder, self.is_causal = bool(is_decoder), bool(is_causal)
        self.has_relative_attention_bias = relative_attention_bias is not None
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.d_model = config.d_model
        self.key_value_proj_dim = config.d_kv
        self.n_heads = config.num_heads
        self.dropout = config.dropout_rate
        self.inner_dim = self.n_heads * self.key_value_proj_dim
        self.scaling = 1.0  # T5 does not scale q . k
        self.layer_idx = layer_idx
        self.gradient_checkpointing = False
        self.q, self.k, self.v, self.o = q, k, v, o
        if relative_attention_bias is not None:
            self.relative_attention_bias = relative_attention_bias
            table = T5RelativeBias(self.n_heads, self.relative_attention_num_buckets,
                                   self.relative_attention_max_distance,
                                   bidirectional=not self.is_decoder, device="meta")
            table.embedding = relative_attention_bias  # the same table, not a copy
            # kept out of _modules: its one parameter is registered above, once
            self.__dict__["position"] = table

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitT5Attention":
        """The attnkit module taking over a transformers ``T5Attention``'s submodules."""
        layer = cls(module.config, module.q, module.k, module.v, module.o,
                    getattr(module, "relative_attention_bias", None)
                    if module.has_relative_attention_bias else None,
                    is_decoder=module.is_decoder, is_causal=module.is_causal,
                    layer_idx=module.layer_idx)
        layer.gradient_checkpointing = module.gradient_checkpointing
        return layer.train(module.training)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, head_dim={self.key_value_proj_dim}, "
                f"decoder={self.is_decoder}, relative_bias={self.has_relative_attention_bias}")

    def _split(self, x: Tensor) -> Tensor:
        """(B, n, inner_dim) -> (B, H, n, d_kv)"""
        return x.view(*x.shape[:-1], -1, self.key_value_proj_dim).transpose(1, 2)

    def _key_value(self, current_states, is_cross, cache):
        """K, V (B, H, S, d_kv): projected now, or read from / appended to the cache, exactly
        as ``T5Attention`` does (an ``EncoderDecoderCache`` keeps the cross-attention K/V
        once computed; self-attention K/V grow with every call)."""
        from transformers.cache_utils import EncoderDecoderCache
        layer_cache, is_updated = cache, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if is_cross and cache is not None and is_updated:
            layer = layer_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        key, value = self._split(self.k(current_states)), self._split(self.v(current_states))
        if cache is not None:
            key, value = layer_cache.update(key, value, self.layer_idx)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return key, value

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                cache=None, past_key_values=None, **kwargs):
        """``T5Attention.forward``: hidden_states (B, L, d_model); key_value_states
        (B, S, d_model) for cross-attention; mask as the model built it; position_bias
        from the stack's first layer (a T5Bias, a tensor, or None); the KV cache as
        ``cache`` or by its pre-5.24 name ``past_key_values``."""
        cache = the_cache(cache, past_key_values)
        B, L = hidden_states.shape[:2]
        past = 0
        if cache is not None:
            past = int(cache.get_seq_length(self.layer_idx))  # before the update
        is_cross = key_value_states is not None
        query = self._split(self.q(hidden_states))
        key, value = self._key_value(key_value_states if is_cross else hidden_states,
                                     is_cross, cache)
        if position_bias is None and self.has_relative_attention_bias:
            # query row r is the token at position past + r, key j at position j
            position_bias = self.position.bias(L, key.shape[-2], offset=past)
        out, weights = attention_forward(
            self, query, key, value, mask, dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling, position_bias=position_bias, **kwargs)
        return self.o(out.reshape(B, L, self.inner_dim)), position_bias, weights


#: the attnkit modules of this family
MODULES = (AttnkitT5Attention,)


def hf_classes() -> tuple:
    """The transformers classes :func:`replace` takes (mT5's where the build has it)."""
    from transformers.models.t5 import modeling_t5 as t5
    classes = (t5.T5Attention,)
    try:
        from transformers.models.mt5 import modeling_mt5 as mt5
        classes += (mt5.MT5Attention,)  # "Copied from T5Attention": the same code
    except ImportError:  # pragma: no cover - depends on the transformers build
        pass
    return classes


def replace(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name>`` (a ``T5Attention``) becomes an :class:`AttnkitT5Attention` on the
    same submodules."""
    setattr(parent, name, AttnkitT5Attention.from_hf(child))
