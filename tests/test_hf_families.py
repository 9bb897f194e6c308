"""The attention of 2026's open models through ``register()``: Qwen3 (QK-norm), Gemma 3
(local/global interleave), Llama 4 (chunked attention, NoPE layers with attention
temperature tuning), DeepSeek-V3 (MLA: query/key head dim != value head dim) and
Qwen3-Next (gated attention beside linear-attention layers). Each tiny random model
switched to "attnkit" computes what "eager" computes at every real position, with left
and right padding, and every attention layer runs the attnkit function."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import attnkit.integrations.hf as ak_hf  # noqa: E402
from attnkit.integrations.hf import attention as ak_attention  # noqa: E402
from conftest import assert_equal_where_real, padded_ids  # noqa: E402

ak_hf.register()

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _families():
    c = COMMON
    return {
        "qwen3": ("Qwen3ForCausalLM", lambda: transformers.Qwen3Config(**c, head_dim=16), 2),
        # layer 0 a 5-token sliding window, layer 1 global
        "gemma3": ("Gemma3ForCausalLM", lambda: transformers.Gemma3TextConfig(
            **c, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"]), 2),
        # chunks of 6 tokens in the RoPE layer; the NoPE layer scales its queries by
        # log(floor((p + 1) / 4) + 1) * 0.5 + 1 past position 4
        "llama4": ("Llama4ForCausalLM", lambda: transformers.Llama4TextConfig(
            **c, head_dim=16, attention_chunk_size=6, num_local_experts=2,
            num_experts_per_tok=1, intermediate_size_mlp=128, no_rope_layers=[1, 0],
            attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5,
            interleave_moe_layer_step=1), 2),
        # MLA: queries and keys of 16 + 8 numbers per head, values of 16
        "deepseek_v3": ("DeepseekV3ForCausalLM", lambda: transformers.DeepseekV3Config(
            **{**c, "num_key_value_heads": 4}, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            moe_intermediate_size=32), 2),
        # one linear-attention layer (not attention: transformers' own code), one gated
        # full-attention layer
        "qwen3_next": ("Qwen3NextForCausalLM", lambda: transformers.Qwen3NextConfig(
            **c, head_dim=16, layer_types=["linear_attention", "full_attention"],
            num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=2,
            linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16), 1),
    }


FAMILIES = _families()


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = ak_attention.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.shape, key.shape, value.shape))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(ak_attention, "scaled_dot_product_attention", spy)
    return seen


def _pair(class_name, make):
    cls = getattr(transformers, class_name)
    config = make()
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="attnkit").eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_outputs_equal_eager_and_attention_runs_on_attnkit(name, side, calls):
    class_name, make, attention_layers = FAMILIES[name]
    eager, ours = _pair(class_name, make)
    ids, keep = padded_ids(3, 16, side, 128, real=(11, 3), last_row_full=False)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep).logits
        got = ours(input_ids=ids, attention_mask=keep).logits
    assert len(calls) == attention_layers
    assert_equal_where_real(want, got, keep)
    if name == "deepseek_v3":  # MLA reaches attnkit with Dv != D, no padding to D
        (q, k, v), _ = calls
        assert q[-1] == k[-1] == 24 and v[-1] == 16


def test_llama4_greedy_generation_equals_eager(calls):
    """Decoding past a chunk boundary (chunks of 6, 10 prompt tokens + 8 new)."""
    eager, ours = _pair(*FAMILIES["llama4"][:2])
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))
    assert len(calls) >= 2 * 8
