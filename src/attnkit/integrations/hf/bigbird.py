"""BigBird: attnkit modules in place of ``BigBirdBlockSparseAttention`` and its
full-attention fallback ``BigBirdSelfAttention``.

BigBird computes attention in its own modules (``set_attn_implementation`` does nothing
for it), and switches between full and block-sparse attention by itself:
``BigBirdModel`` calls ``set_attention_type("original_full")`` on the first input too
short to be sparse (``L <= (5 + 2 r) * block_size``) and stays there until told
otherwise, each time building new transformers modules. The wrappers that hold them
(transformers' ``BigBirdAttention``) become :class:`BigBirdAttentionSwitch`, whose
``set_attention_type`` installs the attnkit module of the new type instead, sharing the
same projections: the patched model follows the same sequence of attention types as the
original, and stays on attnkit throughout.

:func:`layer_from_hf` gives a plain :class:`attnkit.layers.BigBirdAttention`
(``pattern="hf"``) holding a copy of a ``BigBirdBlockSparseAttention``'s weights instead.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ...layers.bigbird import BigBirdAttention
from .attention import attention_forward
from .common import no_probabilities, the_cache

__all__ = ["AttnkitBigBirdBlockSparseAttention", "AttnkitBigBirdSelfAttention",
           "BigBirdAttentionSwitch", "bigbird_module", "replace_wrapper", "layer_from_hf",
           "hf_classes", "replace", "MODULES", "USES_MASK_INTERFACE"]

USES_MASK_INTERFACE = False


def _layer_args(module: nn.Module) -> dict:
    """:class:`BigBirdAttention`'s arguments (but ``pattern="hf"``) for a transformers
    ``BigBirdBlockSparseAttention``."""
    if not all(hasattr(module, n) for n in ("block_size", "num_random_blocks", "query")):
        raise TypeError(f"expected a transformers BigBirdBlockSparseAttention, got "
                        f"{type(module).__name__}")
    return dict(embed_dim=module.query.in_features, num_heads=module.num_attention_heads,
                block_size=module.block_size, num_random_blocks=module.num_random_blocks,
                seed=module.seed, bias=module.query.bias is not None,
                max_seqlen=module.max_seqlen)


def layer_from_hf(module: nn.Module) -> BigBirdAttention:
    """A ``pattern="hf"`` :class:`BigBirdAttention` holding a copy of a transformers
    ``BigBirdBlockSparseAttention``'s weights, block size, random blocks, seed and
    training mode."""
    args, ref = _layer_args(module), module.query.weight
    layer = BigBirdAttention(**args, pattern="hf", device=ref.device, dtype=ref.dtype)
    layer.load_state_dict(module.state_dict())
    return layer.train(module.training)


class AttnkitBigBirdBlockSparseAttention(BigBirdAttention):
    """:class:`attnkit.layers.BigBirdAttention` (``pattern="hf"``: transformers' block
    layout, its numpy random plan in training and block 0 in every random slot in eval)
    with the call signature of transformers' ``BigBirdBlockSparseAttention``; padding is
    read from ``to_mask`` (B, 1, 1, L). Returns ``(out (B, L, E), None)``."""

    @classmethod
    def from_config(cls, config, seed, query, key, value) -> "AttnkitBigBirdBlockSparseAttention":
        """The layer BigBird builds for ``attention_type="block_sparse"``, on the given
        projections."""
        args = dict(embed_dim=config.hidden_size, num_heads=config.num_attention_heads,
                    block_size=config.block_size, num_random_blocks=config.num_random_blocks,
                    seed=seed, bias=config.use_bias, max_seqlen=config.max_position_embeddings)
        layer = cls._on(args, query, key, value)
        layer.config = config
        return layer

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitBigBirdBlockSparseAttention":
        """The attnkit module taking over a transformers ``BigBirdBlockSparseAttention``'s
        projections (the same parameters, not copies), block size, random blocks, seed
        and training mode."""
        layer = cls._on(_layer_args(module), module.query, module.key, module.value)
        return layer.train(module.training)

    @classmethod
    def _on(cls, args: dict, query, key, value):
        layer = cls(**args, pattern="hf", device="meta", dtype=query.weight.dtype)
        layer.query, layer.key, layer.value = query, key, value
        return layer

    def forward(self, hidden_states, band_mask=None, from_mask=None, to_mask=None,
                from_blocked_mask=None, to_blocked_mask=None, **kwargs):
        no_probabilities(self, kwargs)
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
        no_probabilities(self, kwargs)
        cache = the_cache(cache, past_key_values)
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


def bigbird_module(kind: str, wrapper: nn.Module, current: nn.Module, layer_idx=None):
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
            self.self = bigbird_module(value, self, self.self, layer_idx)

    BigBirdAttentionSwitch.__module__ = __name__
    BigBirdAttentionSwitch.__qualname__ = "BigBirdAttentionSwitch"
    return BigBirdAttentionSwitch


try:
    BigBirdAttentionSwitch = _bigbird_switch_class()
except ImportError:  # pragma: no cover - a transformers build without BigBird
    BigBirdAttentionSwitch = None


def replace_wrapper(wrapper: nn.Module) -> None:
    """Turn a transformers ``BigBirdAttention`` into a :class:`BigBirdAttentionSwitch`
    holding the attnkit module of its current attention type."""
    wrapper.__class__ = BigBirdAttentionSwitch
    wrapper.self = bigbird_module(wrapper.attention_type, wrapper, wrapper.self)


#: the attnkit modules of this family
MODULES = (AttnkitBigBirdBlockSparseAttention, AttnkitBigBirdSelfAttention)


def hf_classes() -> tuple:
    """The transformers classes :func:`replace` takes: the wrapper ``BigBirdAttention``,
    which holds the attention module of its current type."""
    from transformers.models.big_bird import modeling_big_bird as big_bird
    return (big_bird.BigBirdAttention,)


def replace(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name>`` (transformers' ``BigBirdAttention``) becomes, in place, a
    :class:`BigBirdAttentionSwitch`."""
    replace_wrapper(child)
