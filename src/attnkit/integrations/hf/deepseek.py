"""DeepSeek-V3 (and V2's layout): :class:`AttnkitDeepseekV3Attention` in place of
``DeepseekV3Attention``, so that decoding runs MLA's absorbed form on the compressed cache.

``register()`` alone already routes DeepSeek-V3's attention through attnkit, but
transformers' module rebuilds every cached token's keys and values (``kv_b_proj`` over
all S latents, (B, H, S, dn + dr) keys) at each step before calling it. The module here
is an :class:`attnkit.layers.MultiHeadLatentAttention` holding the very submodules of the
one it replaces (same ``state_dict`` keys): it keeps transformers' cache contents, the
latents ``c`` (B, 1, S, kv_lora_rank) and ``k_rope`` (B, 1, S, qk_rope_head_dim) of each
layer, in transformers' layout (rotary pairs de-interleaved, as its
``apply_rotary_pos_emb_interleave`` returns them), and attends from them in whichever
form costs less: decompressed for a prompt, absorbed for decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...layers import MultiHeadLatentAttention
from .attention import attention_mask_for
from .common import no_probabilities, the_cache

__all__ = ["AttnkitDeepseekV3Attention", "hf_classes", "replace", "MODULES",
           "USES_MASK_INTERFACE"]

#: patch() switches the model to the "attnkit" attention implementation, so that padding
#: and causal masks reach the layers as attnkit mask objects
USES_MASK_INTERFACE = True

#: the submodules taken over from transformers' module
_TAKEN = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
          "kv_a_layernorm", "kv_b_proj", "o_proj")


def rope_scaling_of(config) -> dict | None:
    """The config's ``rope_parameters`` for :class:`~attnkit.positional.RotaryEmbedding`
    (None for plain RoPE), with the context length transformers reads from the config
    when the dict lacks it."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") == "default":
        return None
    params.setdefault("max_position_embeddings", config.max_position_embeddings)
    params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


def half_layout(x: Tensor) -> Tensor:
    """Interleaved rotary pairs (2k, 2k + 1) -> transformers' cached layout [evens | odds]."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], -1)


class AttnkitDeepseekV3Attention(MultiHeadLatentAttention):
    """transformers' ``DeepseekV3Attention`` call, computed by attnkit's MLA.

    ``forward(hidden_states, position_embeddings, attention_mask, cache=None,
    position_ids=None, **kwargs)`` returns ``(attn_output (B, L, hidden), None)``. RoPE is
    computed from ``position_ids`` by the layer's own rotary embedding (the config's
    ``rope_parameters``: YaRN and the rest), not read from ``position_embeddings``.
    """

    @classmethod
    def from_hf(cls, module: nn.Module) -> "AttnkitDeepseekV3Attention":
        """The attnkit module taking over a ``DeepseekV3Attention``'s submodules."""
        config = module.config
        layer = cls(config.hidden_size, config.num_attention_heads, config.q_lora_rank,
                    config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                    config.v_head_dim, rope_theta=config.rope_parameters["rope_theta"],
                    rope_scaling=rope_scaling_of(config),
                    rope_interleave=bool(getattr(config, "rope_interleave", True)),
                    attention_bias=config.attention_bias, dropout=config.attention_dropout,
                    device="meta")
        for name in _TAKEN:
            if getattr(module, name, None) is not None:
                setattr(layer, name, getattr(module, name))
        layer.config, layer.layer_idx = config, module.layer_idx
        layer.is_causal = True
        layer.scaling = module.scaling  # transformers' own (YaRN's mscale included)
        return layer.train(module.training)

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, position_ids: Tensor | None = None,
                **kwargs):
        no_probabilities(self, kwargs)
        cache = the_cache(cache, past_key_values)
        B, L, _ = hidden_states.shape
        past = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
        if position_ids is None:
            positions = torch.arange(past, past + L, device=hidden_states.device)
        else:
            positions = position_ids
            if positions.dim() == 2 and positions.shape[0] == 1:
                positions = positions[0]
        q_nope, q_rope = self.queries(hidden_states, positions)
        z = self.latents(hidden_states, positions)
        if self.rotary.interleaved:  # the scores only need q and k paired alike
            r = self.kv_lora_rank
            q_rope = half_layout(q_rope)
            z = torch.cat([z[..., :r], half_layout(z[..., r:])], -1)
        if cache is not None:
            c, k_rope = cache.update(*z.split([self.kv_lora_rank, self.qk_rope_head_dim], -1),
                                     self.layer_idx)
            z = torch.cat([c, k_rope], -1)
        S = z.shape[2]
        mask, causal = attention_mask_for(self, attention_mask, None, L, S)
        absorbed = cache is not None and self.can_absorb and self.prefers_absorbed(L, S)
        attend = self.absorbed if absorbed else self.decompressed
        out = attend(q_nope, q_rope, z, mask, causal, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), None


#: the attnkit modules of this family
MODULES = (AttnkitDeepseekV3Attention,)


def hf_classes() -> tuple:
    """The transformers classes :func:`replace` takes."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    return (ds.DeepseekV3Attention,)


def replace(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name>`` (a ``DeepseekV3Attention``) becomes an
    :class:`AttnkitDeepseekV3Attention` on the same submodules."""
    setattr(parent, name, AttnkitDeepseekV3Attention.from_hf(child))
