"""attnkit's MLA against transformers' DeepSeek-V3 (tiny random configs, no downloads):
the layer loads ``DeepseekV3Attention``'s state_dict by name and computes its output (low-
and full-rank queries, both rotary layouts, YaRN past the original context, biases); and
``patch()`` on a tiny DeepseekV3 model gives eager's logits with left and right padding
and its greedy tokens, decoding in the absorbed form from a cache that holds what
transformers' own module caches."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds  # noqa: E402

import attnkit.integrations.hf as ak_hf  # noqa: E402
from attnkit.integrations.hf.deepseek import AttnkitDeepseekV3Attention  # noqa: E402
from attnkit.layers import MultiHeadLatentAttention  # noqa: E402
from attnkit.layers import latent as latent_module  # noqa: E402
from conftest import assert_equal_where_real, padded_ids  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}


def _config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32)
    config = transformers.DeepseekV3Config(**{**base, **kw})
    config._attn_implementation = "eager"
    return config


def _ours_from(config) -> MultiHeadLatentAttention:
    rope = dict(config.rope_parameters)
    return MultiHeadLatentAttention(
        config.hidden_size, config.num_attention_heads, config.q_lora_rank,
        config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
        config.v_head_dim, rope_theta=rope["rope_theta"],
        rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
        rope_interleave=config.rope_interleave, attention_bias=config.attention_bias)


@pytest.mark.parametrize("case", [
    dict(),
    dict(q_lora_rank=None),
    dict(rope_interleave=False),
    dict(attention_bias=True),
    dict(rope_parameters=YARN),
], ids=["low-rank-q", "full-q", "rotate-half", "bias", "yarn"])
def test_layer_equals_deepseek_v3_attention(case):
    config = _config(**case)
    torch.manual_seed(0)
    theirs = ds.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # norms and biases away from their initial values
        for p in theirs.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    rotary = ds.DeepseekV3RotaryEmbedding(config)
    ours = _ours_from(config).eval()
    ours.load_state_dict(theirs.state_dict())  # by name, strict
    L = 80  # past YaRN's original context of 32
    x = torch.randn(2, L, 64)
    positions = torch.arange(L)[None]
    causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = theirs(x, rotary(x, positions), causal)
        got = ours(x)
        got_absorbed = ours(x, absorb=True)
    assert ours.scaling == pytest.approx(theirs.scaling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_absorbed, want, rtol=1e-5, atol=1e-5)


def _pair():
    config = _config()
    torch.manual_seed(0)
    cls = transformers.DeepseekV3ForCausalLM
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours.load_state_dict(eager.state_dict())
    ak_hf.patch(ours)
    return eager, ours


@pytest.fixture
def forms(monkeypatch):
    seen = []
    for name in ("absorbed", "decompressed"):
        real = getattr(MultiHeadLatentAttention, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(MultiHeadLatentAttention, name, spy)
    return seen


def test_patch_replaces_every_attention_and_keeps_the_state_dict():
    eager, ours = _pair()
    layers = [m for m in ours.modules() if isinstance(m, AttnkitDeepseekV3Attention)]
    assert len(layers) == 2
    assert not any(type(m) is ds.DeepseekV3Attention for m in ours.modules())
    assert ours.state_dict().keys() == eager.state_dict().keys()
    ak_hf.patch(ours)  # again: harmless
    assert len([m for m in ours.modules() if isinstance(m, AttnkitDeepseekV3Attention)]) == 2


@pytest.mark.parametrize("side", ["right", "left"])
def test_patched_logits_equal_eager(side, forms):
    eager, ours = _pair()
    ids, keep = padded_ids(3, 16, side, 128, real=(11, 3), last_row_full=False)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=keep).logits
        got = ours(input_ids=ids, attention_mask=keep).logits
    assert_equal_where_real(want, got, keep)
    assert forms == ["decompressed"] * 2  # no cache: keys rebuilt, as in training


def test_patched_greedy_decoding_equals_eager_from_the_compressed_cache(forms, monkeypatch):
    eager, ours = _pair()
    rows = []
    sdpa = latent_module.scaled_dot_product_attention
    monkeypatch.setattr(latent_module, "scaled_dot_product_attention",
                        lambda q, *a, **k: rows.append(q.shape[-2]) or sdpa(q, *a, **k))
    ids, keep = padded_ids(2, 7, "left", 128, real=(4,), last_row_full=True)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
              attention_mask=keep)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert forms.count("absorbed") == 2 * 9  # every step after the prompt, in each layer
    # ... each one multi-query call with the 4 heads as rows (the model's mask object,
    # padding included, is shared by the heads)
    assert rows.count(4) == 2 * 9

    # the cache after a prompt holds what transformers' own module stores: per layer
    # the normalised latent c (r = 16 numbers) and the rotated shared key (dr = 8), at
    # every real position (a padding row's output is arbitrary from the first layer on)
    real = keep.bool()
    with torch.no_grad():
        theirs = eager(ids, attention_mask=keep, use_cache=True).past_key_values
        mine = ours(ids, attention_mask=keep, use_cache=True).past_key_values
    for a, b in zip(theirs.layers, mine.layers):
        assert b.keys.shape == (2, 1, 7, 16) and b.values.shape == (2, 1, 7, 8)
        torch.testing.assert_close(b.keys[:, 0][real], a.keys[:, 0][real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values[:, 0][real], a.values[:, 0][real], rtol=1e-5,
                                   atol=1e-5)
