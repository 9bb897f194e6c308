"""attnkit's DeepSeek Sparse Attention against transformers' DeepSeek-V3.2 (tiny random
config, no downloads): the layer loads ``DeepseekV32Attention``'s state_dict by name
(indexer included), picks the same top-k keys and computes its output, which transformers
gets from a dense (B, S, S) mask built from the indices."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
ds32 = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")

from attnkit.layers import DeepSeekSparseAttention  # noqa: E402


def _config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2,
                max_position_embeddings=256, q_lora_rank=32, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                moe_intermediate_size=32, index_n_heads=4, index_head_dim=16, index_topk=9)
    config = transformers.DeepseekV32Config(**{**base, **kw})
    config._attn_implementation = "eager"
    return config


def _ours_from(config) -> DeepSeekSparseAttention:
    rope = dict(config.rope_parameters)
    return DeepSeekSparseAttention(
        config.hidden_size, config.num_attention_heads, config.q_lora_rank,
        config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
        config.v_head_dim, index_n_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim, index_topk=config.index_topk,
        rope_theta=rope["rope_theta"],
        rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
        rope_interleave=True, attention_bias=config.attention_bias)  # V3.2: always interleaved


def _pair(**kw):
    config = _config(**kw)
    torch.manual_seed(0)
    theirs = ds32.DeepseekV32Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    ours = _ours_from(config).eval()
    ours.load_state_dict(theirs.state_dict())  # by name, strict: the indexer's too
    return config, theirs, ours


def test_layer_equals_deepseek_v32_attention():
    config, theirs, ours = _pair()
    rotary = ds32.DeepseekV32RotaryEmbedding(config)
    L = 40
    torch.manual_seed(1)
    x = torch.randn(2, L, 64)
    positions = torch.arange(L)[None]
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None].expand(2, 1, L, L)
    with torch.no_grad():
        want, _ = theirs(x, rotary(x, positions), mask, position_ids=positions)
        got, idx = ours(x, return_indices=True)
        got_decompressed = ours(x, absorb=False)
        hf_idx = theirs.indexer(x, theirs.q_a_layernorm(theirs.q_a_proj(x)),
                                rotary(x, positions), mask[:, 0], positions)
    # the same keys chosen (HF fills rows that see fewer than k keys with masked ones)
    for b in range(2):
        for t in range(L):
            ours_t = set(idx[b, 0, t][idx[b, 0, t] >= 0].tolist())
            theirs_t = set(k for k in hf_idx[b, t].tolist() if k <= t)
            assert ours_t == theirs_t, (b, t)
    assert (idx[:, 0, config.index_topk:] >= 0).all()  # sparse where it can be
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_decompressed, want, rtol=1e-5, atol=1e-5)


def test_decoding_with_caches_equals_one_pass_and_gradients_flow_to_the_attention():
    from attnkit import LatentCache
    # 16 index heads: a key scores exactly 0 (a tie top-k may break either way) only when
    # all 16 ReLUs are 0; float64: near-ties must not flip with a chunk's rounding
    _, _, ours = _pair(index_n_heads=16)
    ours = ours.double()
    torch.manual_seed(2)
    x = torch.randn(1, 30, 64, dtype=torch.float64)
    with torch.no_grad():
        full = ours(x)
        cache, index_cache = LatentCache(), LatentCache()
        steps = [ours(x[:, :12], cache=cache, index_cache=index_cache)]
        steps += [ours(x[:, t:t + 1], cache=cache, index_cache=index_cache) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    ours(xg).sum().backward()
    assert xg.grad.abs().sum() > 0 and ours.kv_b_proj.weight.grad.abs().sum() > 0
    assert ours.indexer.wk.weight.grad is None  # the selection is discrete


def _model_pair():
    import copy
    import attnkit.integrations.hf as ak_hf
    config = _config(index_n_heads=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    cls = transformers.DeepseekV32ForCausalLM
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours.load_state_dict(eager.state_dict())
    ak_hf.patch(ours)
    return eager, ours


def test_patch_replaces_every_attention_and_gives_eagers_logits_and_tokens():
    from attnkit.integrations.hf.deepseek_sparse import AttnkitDeepseekV32Attention
    from conftest import assert_equal_where_real, padded_ids
    eager, ours = _model_pair()
    assert len([m for m in ours.modules() if isinstance(m, AttnkitDeepseekV32Attention)]) == 2
    assert ours.state_dict().keys() == eager.state_dict().keys()
    ids, keep = padded_ids(2, 24, "right", 128, real=(17,), last_row_full=True)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep).logits
        got = ours(input_ids=ids, attention_mask=keep).logits
    assert_equal_where_real(want, got, keep)
    prompt = ids[1:, :12]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, **kw), eager.generate(prompt, **kw))
