"""RoPE scaling against transformers: for every rope_type, the inverse frequencies and the
attention factor equal ``modeling_rope_utils``', and so do the cos and sin a Llama
rotary embedding applies, at positions inside and far past the original context."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from attnkit.positional import RotaryEmbedding  # noqa: E402

HEAD_DIM, CONTEXT = 64, 256

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": CONTEXT},
    "yarn, mscale": {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0,
                     "mscale_all_dim": 0.707, "beta_fast": 24, "beta_slow": 2,
                     "original_max_position_embeddings": CONTEXT},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": CONTEXT},
    "longrope": {"rope_type": "longrope", "factor": 4.0,
                 "short_factor": [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)],
                 "original_max_position_embeddings": CONTEXT},
}


def _config(scaling, max_positions):
    params = {"rope_theta": 10000.0, **scaling}
    return LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, head_dim=HEAD_DIM,
                       num_hidden_layers=1, intermediate_size=64, vocab_size=32,
                       max_position_embeddings=max_positions, rope_parameters=params)


def _ours(scaling, max_positions):
    own = dict(scaling)
    own.setdefault("max_position_embeddings", max_positions)
    return RotaryEmbedding(HEAD_DIM, base=10000.0, scaling=own)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("seq_len", [CONTEXT // 2, 4 * CONTEXT])
def test_frequencies_and_attention_factor_equal_transformers(name, seq_len):
    scaling = SCALINGS[name]
    max_positions = CONTEXT if name == "dynamic" else 4 * CONTEXT
    config = _config(scaling, max_positions)
    want, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
    rope = _ours(scaling, max_positions)
    got = rope.inv_freq(seq_len=seq_len)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(want_factor, rel=1e-7)
    if name.startswith("yarn") or name == "longrope":
        assert rope.attention_scaling > 1  # the factor is real, not a default of 1


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cos_and_sin_equal_a_llama_rotary_embedding_past_the_context(name):
    """Positions up to 4x the original context in one call, as a long prompt gives them
    (dynamic NTK and LongRoPE switch frequencies there), then shorter calls: dynamic NTK
    keeps its grown frequencies until a call shorter than the context resets them, as
    transformers' embedding keeps them."""
    scaling = SCALINGS[name]
    max_positions = CONTEXT if name == "dynamic" else 4 * CONTEXT
    hf = LlamaRotaryEmbedding(_config(scaling, max_positions))
    rope = _ours(scaling, max_positions)
    for n in (4 * CONTEXT, 2 * CONTEXT + 88, CONTEXT, CONTEXT // 2, 3 * CONTEXT):
        positions = torch.arange(n)
        x = torch.zeros(1, n, HEAD_DIM)
        cos, sin = hf(x, positions.view(1, -1))
        our_cos, our_sin = rope.cos_sin(positions)
        half = HEAD_DIM // 2
        # transformers forms the angles p * theta in float32 (attnkit in float64): its
        # rounding, ~p * 2^-23 per angle, sets the tolerance
        tol = 4 * n * 2.0 ** -23
        torch.testing.assert_close(our_cos, cos[0, :, :half], rtol=0, atol=tol)
        torch.testing.assert_close(our_sin, sin[0, :, :half], rtol=0, atol=tol)


def test_linear_scaling_is_position_interpolation():
    """Linear scaling with factor s rotates position p as plain RoPE rotates p / s."""
    q = torch.randn(1, 2, 8, HEAD_DIM, dtype=torch.float64)
    plain = RotaryEmbedding(HEAD_DIM)
    scaled = RotaryEmbedding(HEAD_DIM, scaling={"rope_type": "linear", "factor": 4.0})
    p = torch.arange(0, 32, 4)
    cos, sin = scaled.cos_sin(p, torch.float64)
    angle = torch.outer(p.double() / 4, plain.inv_freq())
    torch.testing.assert_close(cos, angle.cos())
    torch.testing.assert_close(sin, angle.sin())
    assert scaled.rotate(q, p).shape == q.shape


def test_bad_scaling_is_refused_by_name():
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(HEAD_DIM, scaling={"rope_type": "ntk-by-parts"})
    with pytest.raises(ValueError, match="needs factor"):
        RotaryEmbedding(HEAD_DIM, scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RotaryEmbedding(HEAD_DIM, scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(TypeError, match="dict"):
        RotaryEmbedding(HEAD_DIM, scaling="yarn")
    with pytest.raises(ValueError, match="pass base=500000"):
        RotaryEmbedding(HEAD_DIM, scaling={**SCALINGS["linear"], "rope_theta": 500000.0})
    with pytest.raises(ValueError, match="rotary_dim 32"):
        RotaryEmbedding(HEAD_DIM, scaling={**SCALINGS["linear"], "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="longrope factors"):
        RotaryEmbedding(HEAD_DIM, scaling={**SCALINGS["longrope"], "short_factor": [1.0]})
    assert math.isfinite(RotaryEmbedding(HEAD_DIM).attention_scaling)
