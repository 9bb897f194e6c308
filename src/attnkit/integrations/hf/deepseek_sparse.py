"""DeepSeek-V3.2: :class:`AttnkitDeepseekV32Attention` in place of ``DeepseekV32Attention``.

transformers' eager and SDPA paths turn the indexer's top-k into a dense (B, 1, S, S)
mask (memory quadratic in the length) and attend densely. The module here is an
:class:`attnkit.layers.DeepSeekSparseAttention` holding the very submodules of the one
it replaces (same ``state_dict`` keys, the indexer's included): it picks the same keys and
attends over them only (``masks.selected``: the engine gathers each row's chosen keys),
reading and writing transformers' own cache, latents and index keys alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...layers import DeepSeekSparseAttention
from ...masks import causal as causal_mask
from .attention import attention_mask_for
from .common import no_probabilities, the_cache
from .deepseek import half_layout, rope_scaling_of

__all__ = ["AttnkitDeepseekV32Attention", "hf_classes", "replace", "MODULES",
           "USES_MASK_INTERFACE"]

USES_MASK_INTERFACE = True

_TAKEN = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
          "kv_b_proj", "o_proj")
_INDEXER = ("wq_b", "wk", "k_norm", "weights_proj")


class AttnkitDeepseekV32Attention(DeepSeekSparseAttention):
    """transformers' ``DeepseekV32Attention`` call, computed by attnkit's DSA.

    ``forward(hidden_states, position_embeddings, attention_mask, cache=None,
    position_ids=None, **kwargs)`` returns ``(attn_output (B, L, hidden), None)``; RoPE
    from ``position_ids`` by the layer's own rotary embeddings."""

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitDeepseekV32Attention":
        config = module.config
        layer = cls(config.hidden_size, config.num_attention_heads, config.q_lora_rank,
                    config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                    config.v_head_dim, index_n_heads=config.index_n_heads,
                    index_head_dim=config.index_head_dim, index_topk=config.index_topk,
                    rope_theta=config.rope_parameters["rope_theta"],
                    rope_scaling=rope_scaling_of(config), rope_interleave=True,
                    attention_bias=config.attention_bias, dropout=config.attention_dropout,
                    device="meta")
        for name in _TAKEN:
            setattr(layer, name, getattr(module, name))
        for name in _INDEXER:
            setattr(layer.indexer, name, getattr(module.indexer, name))
        layer.config, layer.layer_idx = config, module.layer_idx
        layer.is_causal = True
        layer.scaling = module.scaling
        return layer.train(module.training)

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, position_ids: Tensor | None = None,
                **kwargs):
        no_probabilities(self, kwargs)
        cache = the_cache(cache, past_key_values)
        x = hidden_states
        B, L, _ = x.shape
        past = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
        positions = torch.arange(past, past + L, device=x.device) if position_ids is None \
            else (position_ids[0] if position_ids.dim() == 2 and position_ids.shape[0] == 1
                  else position_ids)
        q_latent, q_nope, q_rope = self.query_parts(x, positions)
        z, ik = self.latents(x, positions), self.indexer.keys(x, positions)
        r = self.kv_lora_rank
        q_rope = half_layout(q_rope)  # transformers caches the rotary pairs de-interleaved
        z = torch.cat([z[..., :r], half_layout(z[..., r:])], -1)
        if cache is not None:
            c, k_rope = cache.update(*z.split([r, self.qk_rope_head_dim], -1), self.layer_idx)
            z = torch.cat([c, k_rope], -1)
            ik = cache.update_indexer(ik[:, 0], self.layer_idx).unsqueeze(1)
        mask, causal = attention_mask_for(self, attention_mask, None, L, z.shape[2])
        if isinstance(mask, Tensor):
            mask = _bool_mask(mask)
        allowed = causal_mask() & mask if causal and mask is not None else (
            causal_mask() if causal else mask)
        out, _ = self.attend_selected(x, q_latent, positions, q_nope, q_rope, z, ik, allowed)
        return out, None


def _bool_mask(mask: Tensor):
    from ...masks import TensorMask
    if mask.dtype != torch.bool:  # transformers' additive float mask: 0 where allowed
        mask = mask == 0
    return TensorMask(mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)))


MODULES = (AttnkitDeepseekV32Attention,)


def hf_classes() -> tuple:
    try:
        from transformers.models.deepseek_v32 import modeling_deepseek_v32 as ds
    except ImportError:  # a transformers without DeepSeek-V3.2
        return ()
    return (ds.DeepseekV32Attention,)


def replace(parent: nn.Module, name: str, child: nn.Module) -> None:
    setattr(parent, name, AttnkitDeepseekV32Attention.from_hf(child))
