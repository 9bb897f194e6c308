"""``patch(model)``: attnkit modules in place of T5's, Longformer's and BigBird's attention.

:func:`register` reaches every layer that calls transformers' ``AttentionInterface``. Three
families need more than that:

* **T5 / mT5** route through the interface, but hand it a dense ``(1, H, L, S)`` relative
  position bias that the first layer computes and every later layer reuses. Here that
  bias is an attnkit :class:`~attnkit.positional.t5.T5Bias` built from the same
  ``relative_attention_bias`` table: the tiled engine evaluates it tile by tile, the first
  layer hands the *object* on as ``position_bias``, and no (L, S) tensor is ever made.
* **Longformer** and **BigBird** compute attention in their own modules
  (``set_attn_implementation`` does nothing for them).

=====================================  ==============================================
transformers module                    replaced by (same parameter names)
=====================================  ==============================================
``T5Attention``, ``MT5Attention``      :class:`AttnkitT5Attention`
``LongformerSelfAttention``            :class:`AttnkitLongformerSelfAttention`
                                       (:class:`attnkit.layers.LongformerAttention`)
``BigBirdBlockSparseAttention``        :class:`AttnkitBigBirdBlockSparseAttention`
                                       (:class:`attnkit.layers.BigBirdAttention`,
                                       ``pattern="hf"``: HF's layout and eval plan)
``BigBirdSelfAttention`` (full)        :class:`AttnkitBigBirdSelfAttention`
=====================================  ==============================================

The replacements take over the very ``nn.Linear`` / ``nn.Embedding`` modules of the ones
they replace (no copy), so ``state_dict`` keys and values are unchanged and checkpoints
load either way.

BigBird switches between full and block-sparse attention by itself: ``BigBirdModel``
calls ``set_attention_type("original_full")`` on the first input too short to be sparse
(``L <= (5 + 2 r) * block_size``) and stays there until told otherwise, each time building
new transformers modules. The wrappers that hold them (``BigBirdAttention``) become
:class:`BigBirdAttentionSwitch`, whose ``set_attention_type`` installs the attnkit module of
the new type instead, sharing the same projections: the patched model follows the same
sequence of attention types as the original, and stays on attnkit throughout.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ...layers.bigbird import BigBirdAttention
from ...layers.longformer import LongformerAttention
from ...positional.t5 import T5RelativeBias
from .attention import attention_forward

__all__ = ["patch", "SUPPORTED", "AttnkitT5Attention", "AttnkitLongformerSelfAttention",
           "AttnkitBigBirdBlockSparseAttention", "AttnkitBigBirdSelfAttention",
           "BigBirdAttentionSwitch"]

#: what :func:`patch` replaces, for error messages and the docs
SUPPORTED = ("T5 and mT5 (T5Attention / MT5Attention: encoder and decoder self-attention "
             "with the shared relative position bias, cross-attention, KV caches)",
             "Longformer (LongformerSelfAttention: sliding window + global tokens)",
             "BigBird (BigBirdAttention: block-sparse, and the full-attention fallback)")


def _hf_classes() -> dict:
    """The transformers classes patch() recognises, by family (missing ones left out)."""
    from transformers.models.big_bird import modeling_big_bird as big_bird
    from transformers.models.longformer import modeling_longformer as longformer
    from transformers.models.t5 import modeling_t5 as t5
    classes = {t5.T5Attention: "t5", longformer.LongformerSelfAttention: "longformer",
               big_bird.BigBirdAttention: "bigbird"}
    try:
        from transformers.models.mt5 import modeling_mt5 as mt5
        classes[mt5.MT5Attention] = "t5"  # "Copied from T5Attention": the same code
    except ImportError:  # pragma: no cover - depends on the transformers build
        pass
    return classes


def _the_cache(cache, past_key_values):
    """The layer's KV cache, under either of the names transformers has passed it by:
    ``cache`` (from 5.24) or ``past_key_values`` (before; deprecated until 5.40)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got two different caches, `cache` and `past_key_values`; "
                         "pass one (transformers 5.24 renamed `past_key_values` to `cache`)")
    return past_key_values if cache is None else cache


def _wants_probabilities(module, kwargs, flag=False) -> bool:
    if flag:
        return True
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def _no_probabilities(module, kwargs, flag=False):
    if _wants_probabilities(module, kwargs, flag):
        raise NotImplementedError(
            f"{type(module).__name__} (attnkit) does not return attention probabilities "
            f"(output_attentions=True); transformers records them from its own module "
            f"classes. Run the unpatched model to inspect them.")


# ------------------------------------------------------------------ T5

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
        cache = _the_cache(cache, past_key_values)
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


# ------------------------------------------------------------------ Longformer

class AttnkitLongformerSelfAttention(LongformerAttention):
    """:class:`attnkit.layers.LongformerAttention` with the call signature and return value
    of transformers' ``LongformerSelfAttention`` (what ``LongformerAttention`` calls):
    ``attention_mask`` (B, L) holds -10000 for padding, 0 local, +10000 global (or the
    precomputed ``is_index_masked`` / ``is_index_global_attn``); returns ``(out,)`` with
    out (B, L, E), padding rows zero."""

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitLongformerSelfAttention":
        ref = module.query.weight
        layer = cls(module.embed_dim, module.num_heads, 2 * module.one_sided_attn_window_size,
                    bias=module.query.bias is not None, dropout=float(module.dropout),
                    device="meta", dtype=ref.dtype)
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(layer, name, getattr(module, name))  # the same parameters, not copies
        layer.layer_id, layer.config = module.layer_id, module.config
        return layer.train(module.training)

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None,
                is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        _no_probabilities(self, {}, output_attentions)
        pad, glob = is_index_masked, is_index_global_attn
        if attention_mask is not None:
            pad = attention_mask < 0 if pad is None else pad
            glob = attention_mask > 0 if glob is None else glob
        if is_global_attn is False:  # transformers then ignores global tokens altogether
            glob = None
        out = LongformerAttention.forward(self, hidden_states, key_padding_mask=pad,
                                          global_attention_mask=glob)
        return (out,)


# ------------------------------------------------------------------ BigBird

class AttnkitBigBirdBlockSparseAttention(BigBirdAttention):
    """:class:`attnkit.layers.BigBirdAttention` (``pattern="hf"``: transformers' block
    layout, its numpy random plan in training and block 0 in every random slot in eval)
    with the call signature of transformers' ``BigBirdBlockSparseAttention``; padding is
    read from ``to_mask`` (B, 1, 1, L). Returns ``(out (B, L, E), None)``."""

    @classmethod
    def from_config(cls, config, seed, query, key, value) -> "AttnkitBigBirdBlockSparseAttention":
        """The layer BigBird builds for ``attention_type="block_sparse"``, on the given
        projections."""
        layer = cls(config.hidden_size, config.num_attention_heads, config.block_size,
                    config.num_random_blocks, seed=seed, pattern="hf", bias=config.use_bias,
                    max_seqlen=config.max_position_embeddings, device="meta",
                    dtype=query.weight.dtype)
        layer.query, layer.key, layer.value = query, key, value
        layer.config = config
        return layer

    def forward(self, hidden_states, band_mask=None, from_mask=None, to_mask=None,
                from_blocked_mask=None, to_blocked_mask=None, **kwargs):
        _no_probabilities(self, kwargs)
        pad = None
        if to_mask is not None:
            pad = to_mask.reshape(hidden_states.shape[0], -1) == 0
        return BigBirdAttention.forward(self, hidden_states, key_padding_mask=pad), None


class AttnkitBigBirdSelfAttention(nn.Module):
    """BigBird's full attention (``attention_type="original_full"``: short inputs, decoders)
    computed by attnkit: ``softmax(q . k / sqrt(d) + attention_mask) v`` with transformers'
    ``BigBirdSelfAttention`` arguments, cache handling and return ``(out (B, L, E), None)``.
    Like that module, it applies no causal rule of its own: the mask carries it."""

    is_causal = False  # a missing mask means "every key", as in BigBirdSelfAttention

    def __init__(self, config, query: nn.Linear, key: nn.Linear, value: nn.Linear,
                 layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query, self.key, self.value = query, key, value
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_decoder = config.is_decoder
        self.layer_idx = layer_idx

    def _split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], -1, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None, past_key_values=None, **kwargs):
        _no_probabilities(self, kwargs)
        cache = _the_cache(cache, past_key_values)
        B, L = hidden_states.shape[:2]
        query = self._split(self.query(hidden_states))
        is_cross = encoder_hidden_states is not None
        current = encoder_hidden_states if is_cross else hidden_states
        mask = encoder_attention_mask if is_cross else attention_mask
        if is_cross and cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            key = cache.layers[self.layer_idx].keys
            value = cache.layers[self.layer_idx].values
        else:
            key, value = self._split(self.key(current)), self._split(self.value(current))
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
        out, _ = attention_forward(self, query, key, value, mask,
                                   dropout=self.dropout_p if self.training else 0.0,
                                   scaling=1.0 / math.sqrt(self.attention_head_size))
        return out.reshape(B, L, self.all_head_size), None


def _bigbird_module(kind: str, wrapper: nn.Module, current: nn.Module, layer_idx=None):
    """The attnkit module for ``kind`` ("block_sparse" / "original_full") inside the
    transformers ``BigBirdAttention`` ``wrapper``, on ``current``'s projections."""
    q, k, v = current.query, current.key, current.value
    if kind == "block_sparse":
        layer = AttnkitBigBirdBlockSparseAttention.from_config(wrapper.config, wrapper.seed,
                                                               q, k, v)
    else:
        if layer_idx is None:  # as transformers builds it: BigBirdSelfAttention(layer_idx=seed)
            layer_idx = getattr(current, "layer_idx", wrapper.seed)
        layer = AttnkitBigBirdSelfAttention(wrapper.config, q, k, v, layer_idx=layer_idx)
    return layer.train(wrapper.training)


def _bigbird_switch_class():
    from transformers.models.big_bird.modeling_big_bird import BigBirdAttention as HFWrapper

    class BigBirdAttentionSwitch(HFWrapper):
        """transformers' ``BigBirdAttention`` wrapper (output projection, dispatch on
        ``attention_type``) whose ``set_attention_type`` installs attnkit's module of the
        new type, on the same projections, instead of a transformers one."""

        def set_attention_type(self, value: str, layer_idx=None):
            if value not in ("original_full", "block_sparse"):
                raise ValueError(f"attention_type can only be set to either 'original_full' "
                                 f"or 'block_sparse', but is {value!r}")
            if value == self.attention_type:
                return
            self.attention_type = value
            self.self = _bigbird_module(value, self, self.self, layer_idx)

    BigBirdAttentionSwitch.__module__ = __name__
    BigBirdAttentionSwitch.__qualname__ = "BigBirdAttentionSwitch"
    return BigBirdAttentionSwitch


try:
    BigBirdAttentionSwitch = _bigbird_switch_class()
except ImportError:  # pragma: no cover - a transformers build without BigBird
    BigBirdAttentionSwitch = None


def _patch_bigbird(wrapper: nn.Module) -> None:
    """Turn a transformers ``BigBirdAttention`` into a :class:`BigBirdAttentionSwitch`
    holding the attnkit module of its current attention type."""
    wrapper.__class__ = BigBirdAttentionSwitch
    wrapper.self = _bigbird_module(wrapper.attention_type, wrapper, wrapper.self)


# ------------------------------------------------------------------ patch

ATTNKIT_MODULES = (AttnkitT5Attention, AttnkitLongformerSelfAttention,
                   AttnkitBigBirdBlockSparseAttention, AttnkitBigBirdSelfAttention)


def _unsupported(model: nn.Module) -> ValueError:
    lines = "\n".join(f"  - {s}" for s in SUPPORTED)
    return ValueError(
        f"patch() found no attention module it can replace in {type(model).__name__}. "
        f"It supports:\n{lines}\n"
        f"Models whose attention goes through transformers' AttentionInterface (Llama, "
        f"Mistral, Qwen2, Gemma 2, GPT-OSS, ...) need no patch: call "
        f"attnkit.integrations.hf.register() and then model.set_attn_implementation('attnkit').")


def patch(model: nn.Module) -> nn.Module:
    """Replace, in place, the attention modules of T5 / mT5, Longformer and BigBird models by
    attnkit modules holding the same parameters under the same ``state_dict`` keys; returns
    ``model``.

    T5: every ``T5Attention`` becomes :class:`AttnkitT5Attention` (relative position bias
    evaluated tile by tile, shared across layers as an attnkit bias object), and the model
    is switched to the "attnkit" attention implementation (:func:`register`) so that its
    padding and causal masks reach the layers as attnkit mask objects, not (B, 1, L, S)
    tensors. Longformer: every ``LongformerSelfAttention`` becomes
    :class:`AttnkitLongformerSelfAttention`. BigBird: see the module docstring.

    Calling it again is harmless. Raises TypeError if ``model`` is not an ``nn.Module``,
    ValueError (listing what is supported) if it holds none of these modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    classes = _hf_classes()
    if type(model) in classes:
        raise ValueError(f"patch() replaces modules inside a model; got a bare "
                         f"{type(model).__name__}. Pass the model that holds it, or build "
                         f"the attnkit module with its from_hf classmethod.")
    found = [(parent, name, child, classes[type(child)])
             for parent in model.modules() for name, child in parent.named_children()
             if type(child) in classes]
    if not found and not any(isinstance(m, ATTNKIT_MODULES) for m in model.modules()):
        raise _unsupported(model)
    for parent, name, child, family in found:
        if family == "t5":
            setattr(parent, name, AttnkitT5Attention.from_hf(child))
        elif family == "longformer":
            setattr(parent, name, AttnkitLongformerSelfAttention.from_hf(child))
        else:
            _patch_bigbird(child)
    if any(family == "t5" for *_, family in found) and hasattr(model, "set_attn_implementation"):
        _use_attnkit_masks(model)
    return model


def _use_attnkit_masks(model: nn.Module) -> None:
    """Switch ``model`` to the "attnkit" implementation, so that its masks arrive as attnkit
    mask objects. T5's encoder and decoder stacks hold configs of their own, which some
    transformers releases (5.15, 5.16) do not switch along with the model's: switch each."""
    from . import NAME, register
    register()
    model.set_attn_implementation(NAME)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", NAME) != NAME and hasattr(
                module, "set_attn_implementation"):
            module.set_attn_implementation(NAME)
