"""QK-norm and the gated attention output of MultiHeadAttention against the models that
use them: Qwen3's attention (per-head RMSNorm of q and k before RoPE) and Qwen3-Next's
(zero-centred norms, a sigmoid gate from q_proj, partial rotary), both tiny random
configs with the HF weights copied in by name. As in the real models, Hq * head_dim
differs from the hidden size (4 x 32 against 64)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3Config  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import (Qwen3Attention,  # noqa: E402
                                                      Qwen3RotaryEmbedding)

from attnkit import MultiHeadAttention  # noqa: E402
from attnkit.positional import RotaryEmbedding  # noqa: E402

E, H, HKV, D = 64, 4, 2, 32


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _copy(hf, ours):
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(ours, name).weight.copy_(getattr(hf, name).weight)
        ours.out_proj.weight.copy_(hf.o_proj.weight)
        ours.q_norm.weight.copy_(hf.q_norm.weight)
        ours.k_norm.weight.copy_(hf.k_norm.weight)


def _hf_forward(hf, rotary, x):
    positions = torch.arange(x.shape[1]).view(1, -1)
    cos, sin = rotary(x, positions)
    return hf(x, (cos, sin), None)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_equals_qwen3_attention(dtype):
    config = Qwen3Config(hidden_size=E, num_attention_heads=H, num_key_value_heads=HKV,
                         head_dim=D, num_hidden_layers=1, intermediate_size=32,
                         vocab_size=32, rms_norm_eps=1e-6)
    config._attn_implementation = "sdpa"
    hf = Qwen3Attention(config, layer_idx=0).eval()
    _randomize(hf)
    theta = config.rope_parameters["rope_theta"]
    ours = MultiHeadAttention(E, H, HKV, bias=False, qk_norm=True, norm_eps=1e-6, head_dim=D,
                              positional=RotaryEmbedding(D, base=theta)).eval()
    _copy(hf, ours)
    hf, ours = hf.to(dtype), ours.to(dtype)
    x = torch.randn(2, 11, E, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        want = _hf_forward(hf, Qwen3RotaryEmbedding(config), x)
        got, _ = ours(x, is_causal=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_zero_centered_norms_and_the_output_gate_equal_qwen3_next_attention():
    next_ = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    config = transformers.Qwen3NextConfig(
        hidden_size=E, num_attention_heads=H, num_key_value_heads=HKV, head_dim=D,
        num_hidden_layers=1, intermediate_size=32, vocab_size=32, rms_norm_eps=1e-6,
        partial_rotary_factor=0.5, layer_types=["full_attention"])
    config._attn_implementation = "sdpa"
    hf = next_.Qwen3NextAttention(config, layer_idx=0).eval()
    _randomize(hf, seed=2)
    rope = config.rope_parameters
    ours = MultiHeadAttention(
        E, H, HKV, bias=False, qk_norm="zero_centered", norm_eps=1e-6, output_gate=True,
        head_dim=D,
        positional=RotaryEmbedding(D, base=rope["rope_theta"],
                                   rotary_dim=int(D * rope.get("partial_rotary_factor", 0.5)))
    ).eval()
    _copy(hf, ours)
    assert ours.q_proj.weight.shape == (2 * H * D, E) and ours.out_proj.weight.shape == (E, H * D)
    x = torch.randn(2, 9, E, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _hf_forward(hf, next_.Qwen3NextRotaryEmbedding(config), x)
        got, _ = ours(x, is_causal=True)
        ungated = MultiHeadAttention(E, H, HKV, bias=False, qk_norm="zero_centered",
                                     output_gate=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ungated.q_proj.weight.shape == (E, E)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="qk_norm"):
        MultiHeadAttention(E, H, qk_norm="layer")
    with pytest.raises(TypeError, match="output_gate"):
        MultiHeadAttention(E, H, output_gate=1)
