"""Positional schemes against HuggingFace transformers (tiny random configs) and the
properties that define them: sinusoidal/learned absolute positions, RoPE (Llama, GPT-NeoX,
GPT-J), ALiBi (BLOOM), T5's relative bias; KV-cache decoding equals the full pass."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import attnkit
from attnkit import KVCache, MultiHeadAttention, masks
from attnkit import bias as biases
from attnkit.backends.chunked import chunked_attention
from attnkit.masks import Grid
from attnkit.positional import (LearnedPositionalEmbedding, RotaryEmbedding,
                                SinusoidalPositionalEncoding, T5RelativeBias,
                                relative_position_bucket, sinusoidal_encoding)

transformers = pytest.importorskip("transformers")
sdpa = attnkit.scaled_dot_product_attention


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- absolute

def test_sinusoidal_matches_the_transformer_paper_formula():
    dim, n = 10, 37
    pe = sinusoidal_encoding(n, dim, dtype=torch.float64)
    want = torch.zeros(n, dim, dtype=torch.float64)
    for pos in range(n):
        for i in range(dim // 2):
            want[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / dim))
            want[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / dim))
    close(pe, want, 1e-12)


def test_sinusoidal_halves_layout_matches_marian():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding
    marian = MarianSinusoidalPositionalEmbedding(50, 16).create_weight()
    close(SinusoidalPositionalEncoding(16, interleaved=False)(50), marian)


def test_sinusoidal_shift_is_a_rotation():
    """The paper's reason for sinusoids: PE(pos + k) is a fixed linear map of PE(pos)."""
    dim, k = 8, 5
    pos = torch.arange(40)
    a, b = sinusoidal_encoding(pos, dim, dtype=torch.float64), \
        sinusoidal_encoding(pos + k, dim, dtype=torch.float64)
    sol = torch.linalg.lstsq(a, b).solution          # one (dim, dim) map for every pos
    close(a @ sol, b, 1e-9)


def test_learned_positions_are_an_embedding_lookup():
    emb = LearnedPositionalEmbedding(16, 4)
    pos = torch.tensor([[0, 3, 15], [2, 2, 1]])
    close(emb(pos), emb.weight[pos])
    close(emb(5), emb.weight[:5])
    emb(pos).sum().backward()
    assert emb.weight.grad[2].sum() != 0 and emb.weight.grad[4].abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[0, 16\).*16"):
        emb(torch.tensor([3, 16]))
    with pytest.raises(TypeError, match="integers"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dim must be even"):
        sinusoidal_encoding(4, 7)


# ----------------------------------------------------------------------------- RoPE

def _llama_rope(head_dim, base, q, k, position_ids):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": base})
    cos, sin = LlamaRotaryEmbedding(cfg)(q, position_ids)
    return apply_rotary_pos_emb(q, k, cos, sin)


def test_rotate_half_matches_llama():
    B, H, Hkv, L, d = 2, 4, 2, 9, 16
    q, k = torch.randn(B, H, L, d), torch.randn(B, Hkv, L, d)
    pos = torch.stack([torch.arange(L), torch.arange(30, 30 + L)])   # per-batch offsets
    want_q, want_k = _llama_rope(d, 500.0, q, k.repeat_interleave(2, 1), pos)
    got_q, got_k = RotaryEmbedding(d, base=500.0).rope(q, k, pos)
    close(got_q, want_q)
    close(got_k.repeat_interleave(2, 1), want_k)


def test_partial_rotate_half_matches_gpt_neox():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import (GPTNeoXRotaryEmbedding,
                                                                 apply_rotary_pos_emb)
    d = 16
    cfg = GPTNeoXConfig(hidden_size=2 * d, num_attention_heads=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.25})
    q, k = torch.randn(1, 2, 7, d), torch.randn(1, 2, 7, d)
    pos = torch.arange(3, 10).view(1, 7)
    cos, sin = GPTNeoXRotaryEmbedding(cfg)(q, pos)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = RotaryEmbedding(d, rotary_dim=4).rope(q, k, pos[0])
    close(got_q, want_q)
    close(got_k, want_k)
    assert torch.equal(got_q[..., 4:], q[..., 4:])


def test_interleaved_matches_gpt_j_with_partial_rotary_dim():
    from transformers.models.gptj.modeling_gptj import (apply_rotary_pos_emb,
                                                        create_sinusoidal_positions)
    B, H, L, d, r = 2, 3, 6, 12, 8
    q = torch.randn(B, H, L, d)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    sincos = create_sinusoidal_positions(64, r)[pos]          # GPT-J: (B, L, r) [sin | cos]
    sin, cos = torch.split(sincos, r // 2, dim=-1)
    x = q.transpose(1, 2)                                      # GPT-J works on (B, L, H, d)
    want = torch.cat([apply_rotary_pos_emb(x[..., :r], sin, cos), x[..., r:]], -1)
    got = RotaryEmbedding(d, interleaved=True, rotary_dim=r).rotate(q, pos)
    close(got, want.transpose(1, 2))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_offset(interleaved):
    rope = RotaryEmbedding(8, interleaved=interleaved)
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.tensor([0, 3, 4, 9, 20])
    ref = None
    for shift in (0, 7, 1000):
        rq, rk = rope.rope(q, k, pos + shift)
        scores = rq @ rk.transpose(-1, -2)
        ref = scores if ref is None else ref
        close(scores, ref, 1e-9)
        close(rq.norm(dim=-1), q.norm(dim=-1), 1e-12)          # a rotation keeps norms
    rq, rk = rope.rope(q, k, pos)
    assert not torch.allclose(rq @ rk.transpose(-1, -2), q @ k.transpose(-1, -2))


def test_rope_keeps_dtype_and_is_differentiable():
    rope = RotaryEmbedding(8, rotary_dim=6)
    q = torch.randn(2, 3, 5, 8)
    got = rope.rotate(q.to(torch.bfloat16), torch.arange(5))
    assert got.dtype == torch.bfloat16
    close(got.float(), rope.rotate(q, torch.arange(5)), 2e-2)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rope.rotate(t, torch.tensor([0, 5, 2, 9])), (x,))
    # the cos/sin tables grow for later positions and agree with a fresh module
    far = rope.rotate(q[..., :1, :], torch.tensor([5000]))
    close(far, RotaryEmbedding(8, rotary_dim=6).rotate(q[..., :1, :], torch.tensor([5000])))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_kv_cache_decoding_equals_full_pass(interleaved):
    E, H = 32, 4
    mha = MultiHeadAttention(E, H, num_kv_heads=2,
                             positional=RotaryEmbedding(E // H, interleaved=interleaved)).eval()
    x = torch.randn(2, 11, E)
    full, _ = mha(x, is_causal=True)
    cache = KVCache()
    steps = [mha(x[:, :4], is_causal=True, cache=cache)[0]]            # a prompt, then tokens
    steps += [mha(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(4, 11)]
    close(torch.cat(steps, 1), full)


def test_rope_bad_input():
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"rotary_dim must be even.*5"):
        RotaryEmbedding(8, rotary_dim=5)
    with pytest.raises(ValueError, match=r"head_dim=8.*\(1, 2, 5, 6\)"):
        rope.rope(torch.randn(1, 2, 5, 6), q, torch.arange(5))
    with pytest.raises(ValueError, match=r"same length.*\(1, 2, 4, 8\)"):
        rope.rope(q, q[:, :, :4], torch.arange(5))
    with pytest.raises(ValueError, match=r"positions \(4,\)"):
        rope.rope(q, q, torch.arange(4))
    with pytest.raises(TypeError, match="integer"):
        rope.rope(q, q, torch.arange(5.0))
    with pytest.raises(ValueError, match=">= 0"):
        rope.rope(q, q, torch.arange(-1, 4))


# ----------------------------------------------------------------------------- ALiBi

@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 31, 64])
def test_alibi_slopes_match_bloom(num_heads):
    # BLOOM's public build_alibi_tensor gives slope * position; at position 1, the slope
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    bloom = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(biases.alibi_slopes(num_heads), bloom, atol=0, rtol=0)
    assert biases.alibi(num_heads).slopes.shape == (num_heads,)


@pytest.mark.parametrize("num_heads", [4, 8, 16, 6, 12])
def test_alibi_slopes_form_the_geometric_sequence(num_heads):
    """n a power of two: 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the sequence of the
    closest smaller power of two c, then every other slope of 2c heads."""
    s = biases.alibi_slopes(num_heads).double()
    c = 2 ** int(math.log2(num_heads))
    first = 2.0 ** (-8.0 / c)
    close(s[:c], first ** torch.arange(1, c + 1, dtype=torch.float64), 1e-7)
    close(s[1:c] / s[:c - 1], torch.full((c - 1,), first, dtype=torch.float64), 1e-6)
    if num_heads != c:
        extra = (2.0 ** (-8.0 / (2 * c))) ** torch.arange(1, 2 * (num_heads - c), 2,
                                                          dtype=torch.float64)
        close(s[c:], extra, 1e-7)
        assert s[c:].unique().numel() == num_heads - c and not set(s[c:].tolist()) & set(s[:c].tolist())


@pytest.mark.parametrize("num_heads", [8, 6])
def test_alibi_causal_attention_equals_bloom(num_heads, kernel):
    """BLOOM adds slope * j (its build_alibi_tensor) and relies on softmax's shift
    invariance; attnkit adds -slope * (p - j). Under a causal mask they agree."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    B, L, D = 2, 13, 8
    q, k, v = (torch.randn(B, num_heads, L, D) for _ in range(3))
    bloom = build_alibi_tensor(torch.ones(B, L), num_heads, torch.float32).view(B, num_heads, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D) + bloom
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    for backend in ("chunked", "reference", "auto"):
        close(sdpa(q, k, v, is_causal=True, bias=biases.alibi(num_heads), backend=backend), want)
    dense = biases.alibi(num_heads).materialize(L, L)[0]        # (H, L, L): -slope * |p - j|
    row_shift = bloom[0] - dense                                # constant along each causal row
    for h in range(num_heads):
        for p in range(L):
            r = row_shift[h, p, :p + 1]
            close(r, r[:1].expand_as(r))


def test_alibi_bidirectional_and_bottom_right_tiles(kernel):
    """Without a mask ALiBi is symmetric, -slope * |p - j|; with L != S the queries sit
    at p = i + S - L. Small tiles make the engine evaluate the bias block by block."""
    H, L, S, D = 6, 21, 37, 8
    q, k, v = torch.randn(2, H, L, D), torch.randn(2, 3, S, D), torch.randn(2, 3, S, D)
    slopes = biases.alibi_slopes(H)
    p = torch.arange(S - L, S).view(L, 1)
    j = torch.arange(S).view(1, S)
    dense = -slopes.view(H, 1, 1) * (p - j).abs()
    for mask in (None, masks.causal()):
        want = sdpa(q, k, v, mask, bias=dense, backend="reference")
        got, _, _ = chunked_attention(q, k, v, mask=mask, bias=biases.alibi(H), scale=D ** -0.5,
                                      block_q=8, block_k=16)
        close(got, want)


@pytest.mark.parametrize("num_heads", [4, 6])
def test_alibi_kv_cache_decoding_equals_full_pass(num_heads):
    E = 24
    mha = MultiHeadAttention(E, num_heads, positional=biases.alibi(num_heads)).eval()
    x = torch.randn(2, 10, E)
    full, _ = mha(x, is_causal=True)
    cache = KVCache()
    steps = [mha(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(10)]
    close(torch.cat(steps, 1), full)


# ----------------------------------------------------------------------------- T5

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 9), (6, 50)])
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-400, 401)
    want = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    got = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, want)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40)])
def test_t5_buckets_monotone_in_distance(num_buckets, max_distance):
    d = torch.arange(0, 1000)
    causal = relative_position_bucket(-d, False, num_buckets, max_distance)
    assert torch.all(causal.diff() >= 0) and causal[0] == 0
    assert torch.all(causal[:num_buckets // 2] == d[:num_buckets // 2])     # exact buckets
    assert torch.all(causal[max_distance:] == num_buckets - 1)              # all far ones share
    assert torch.all(relative_position_bucket(d, False, num_buckets, max_distance) == 0)
    half = num_buckets // 2
    back = relative_position_bucket(-d, True, num_buckets, max_distance)
    fwd = relative_position_bucket(d[1:], True, num_buckets, max_distance)
    assert torch.all(back.diff() >= 0) and back.max() == half - 1
    assert torch.all(fwd.diff() >= 0) and fwd.min() == half + 1 and fwd.max() == num_buckets - 1


def _t5_attention(is_decoder, has_bias=True, H=4, d_kv=6, num_buckets=16, max_distance=20):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention
    cfg = T5Config(d_model=16, d_kv=d_kv, num_heads=H, relative_attention_num_buckets=num_buckets,
                   relative_attention_max_distance=max_distance, is_decoder=is_decoder,
                   dropout_rate=0.0, initializer_range=0.2)
    cfg._attn_implementation = "eager"
    att = T5Attention(cfg, has_relative_attention_bias=has_bias, layer_idx=0).eval()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.5)
    return att


def _ours(att):
    t5 = T5RelativeBias(att.n_heads, att.relative_attention_num_buckets,
                        att.relative_attention_max_distance, bidirectional=not att.is_decoder)
    t5.embedding.weight.data.copy_(att.relative_attention_bias.weight)
    return t5


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("q_len,k_len,offset", [(9, 9, None), (1, 30, 29), (5, 40, 12), (40, 40, 0)])
def test_t5_bias_matches_compute_bias(is_decoder, q_len, k_len, offset):
    att = _t5_attention(is_decoder)
    t5 = _ours(att)
    past = k_len - q_len if offset is None else offset
    want = att.compute_bias(q_len, k_len, past_seen_tokens=past)[0]
    close(t5.materialize(q_len, k_len, offset), want, 0)
    grid = Grid(q_len, k_len)
    tiled = t5.bias(q_len, k_len, offset).tile(grid, 0, q_len, 0, k_len)  # query rows
    close(tiled[0], want, 0)


def test_t5_attention_layer_and_shared_bias_equal_transformers(kernel):
    """T5: scale 1, the bias computed by the first layer and reused by the next. Here one
    bias object serves both layers; the engine evaluates it per tile in each."""
    first, second = _t5_attention(False), _t5_attention(False, has_bias=False)
    t5 = _ours(first)
    x = torch.randn(2, 19, 16)
    y, position_bias, _ = first(x)
    want, _, _ = second(y, position_bias=position_bias)

    def layer(att, h, bias):
        B, L, _ = h.shape
        heads = lambda w: w(h).view(B, L, att.n_heads, -1).transpose(1, 2)  # noqa: E731
        out = sdpa(heads(att.q), heads(att.k), heads(att.v), scale=1.0, bias=bias,
                   backend="chunked")
        return att.o(out.transpose(1, 2).reshape(B, L, -1))

    shared = t5.bias(19, 19)
    got = layer(second, layer(first, x, shared), shared)
    close(got, want, 1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_tiles_and_gradients_equal_the_dense_path(bidirectional, kernel):
    H, L, S, D = 4, 23, 41, 8
    t5 = T5RelativeBias(H, num_buckets=12, max_distance=15, bidirectional=bidirectional)
    with torch.no_grad():
        t5.embedding.weight.normal_(0, 1.0)
    q, k, v = (torch.randn(2, H, n, D, requires_grad=True) for n in (L, S, S))
    mask = None if bidirectional else masks.causal()
    g = torch.randn(2, H, L, D)
    for offset in (None, 5):
        got, _, _ = chunked_attention(q, k, v, mask=mask, bias=t5.bias(L, S, offset),
                                      scale=1.0, block_q=8, block_k=16)
        grads = torch.autograd.grad((got * g).sum(), [q, k, v, t5.embedding.weight])
        dense = t5.materialize(L, S, offset)
        want = sdpa(q, k, v, mask, scale=1.0, bias=dense, backend="reference")
        want_grads = torch.autograd.grad((want * g).sum(), [q, k, v, t5.embedding.weight])
        close(got, want)
        for a, b in zip(grads, want_grads):
            close(a, b, 1e-4)
        assert grads[-1].abs().sum() > 0


def test_t5_decoding_with_offset_one_token_at_a_time_equals_full_pass():
    H, L, D = 4, 12, 8
    t5 = T5RelativeBias(H, num_buckets=8, max_distance=10, bidirectional=False)
    with torch.no_grad():
        t5.embedding.weight.normal_(0, 1.0)
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    full = sdpa(q, k, v, is_causal=True, scale=1.0, bias=t5.bias(L, L))
    steps = [sdpa(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], scale=1.0,
                  bias=t5.bias(1, t + 1, offset=t)) for t in range(L)]
    close(torch.cat(steps, 2), full)
    # through MultiHeadAttention and its KV cache (offset from the bottom-right rule)
    mha = MultiHeadAttention(32, H, positional=t5).eval()
    x = torch.randn(2, L, 32)
    want, _ = mha(x, is_causal=True)
    cache = KVCache()
    got = torch.cat([mha(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(L)], 1)
    close(got, want)


def test_t5_bad_input():
    t5 = T5RelativeBias(4)
    q = torch.randn(1, 4, 5, 8)
    for offset in (None, 0):
        with pytest.raises(ValueError, match=r"q_len=5, k_len=5.*q_len=5, k_len=7"):
            sdpa(q, torch.randn(1, 4, 7, 8), torch.randn(1, 4, 7, 8),
                 bias=t5.bias(5, 5, offset=offset))
    with pytest.raises(ValueError, match="for 4 heads but the query has 2"):
        sdpa(q[:, :2], q[:, :2], q[:, :2], bias=t5.bias(5, 5))
    with pytest.raises(TypeError, match="integer"):
        relative_position_bucket(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeBias(4, num_buckets=0)
