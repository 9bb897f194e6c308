"""MultiHeadAttention: torch parity, MHA/GQA/MQA, self/cross, KV-cache decoding, errors."""

import pytest
import torch
from torch import nn

from attnkit import KVCache, MultiHeadAttention, masks


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_self_attention(batch_first, bias):
    t = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    if batch_first:
        ours = MultiHeadAttention.from_torch(t).eval()
    else:
        with pytest.warns(UserWarning, match="batch-first"):
            ours = MultiHeadAttention.from_torch(t).eval()
    x = torch.randn(3, 7, 16)
    xt = x if batch_first else x.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal_torch = torch.ones(7, 7, dtype=torch.bool).triu(1)  # torch: True = NOT allowed
    want, want_w = t(xt, xt, xt, key_padding_mask=pad, attn_mask=causal_torch,
                     average_attn_weights=False)
    want = want if batch_first else want.transpose(0, 1)
    got, w = ours(x, key_padding_mask=pad, is_causal=True, need_weights=True)
    close(got, want)
    close(w, want_w)
    got2, _ = ours(x, key_padding_mask=pad, attn_mask=~causal_torch)
    close(got2, want)


def test_from_torch_cross_attention_with_kdim_vdim():
    t = nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(t)
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 9, 5), torch.randn(2, 9, 7)
    close(ours(q, k, v)[0], t(q, k, v)[0])
    w_avg = t(q, k, v)[1]
    close(ours(q, k, v, need_weights=True)[1].mean(1), w_avg)


def test_from_torch_output_equals_torch_where_finite():
    t = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(t)
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [True] * 5])  # the second sequence is all padding
    want = t(x, x, x, key_padding_mask=pad)[0]
    got = ours(x, key_padding_mask=pad)[0]
    finite = want.isfinite().all(-1)
    close(got[finite], want[finite])
    assert got.isfinite().all()


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(kv_heads):
    """GQA/MQA is MHA whose K/V projections repeat per query group."""
    gqa = MultiHeadAttention(32, 4, kv_heads).eval()
    mha = MultiHeadAttention(32, 4).eval()
    d, g = 8, 4 // kv_heads
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src = getattr(gqa, name)
            w = src.weight.view(kv_heads, d, 32).repeat_interleave(g, 0).reshape(32, 32)
            b = src.bias.view(kv_heads, d).repeat_interleave(g, 0).reshape(32)
            getattr(mha, name).weight.copy_(w)
            getattr(mha, name).bias.copy_(b)
    x = torch.randn(2, 10, 32)
    close(gqa(x, is_causal=True)[0], mha(x, is_causal=True)[0])
    assert gqa.k_proj.out_features == kv_heads * d


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_decoding_equals_one_full_causal_call(kv_heads):
    layer = MultiHeadAttention(32, 4, kv_heads).eval()
    x = torch.randn(2, 13, 32)
    full, _ = layer(x, is_causal=True)
    cache = KVCache()
    steps = [layer(x[:, :5], is_causal=True, cache=cache)[0]]  # prefill
    for t in range(5, 13):
        steps.append(layer(x[:, t:t + 1], is_causal=True, cache=cache)[0])
    close(torch.cat(steps, 1), full)
    assert len(cache) == 13
    assert cache.keys.shape == (2, kv_heads, 13, 8)
    assert cache.nbytes == 2 * 2 * kv_heads * 13 * 8 * 4  # K and V, float32


def test_kv_cache_with_padding_and_chunks():
    layer = MultiHeadAttention(16, 4, 2).eval()
    x = torch.randn(2, 10, 16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, :3] = True  # left padding
    full, _ = layer(x, key_padding_mask=pad, is_causal=True)
    cache, outs = KVCache(), []
    for a, b in ((0, 4), (4, 7), (7, 8), (8, 10)):
        outs.append(layer(x[:, a:b], key_padding_mask=pad[:, :b], is_causal=True, cache=cache)[0])
    got = torch.cat(outs, 1)
    close(got[:, 3:], full[:, 3:])  # positions whose row sees a real key
    close(got[1], full[1])


def test_kv_cache_grows_without_quadratic_copies():
    cache = KVCache()
    k = torch.randn(1, 2, 1, 4)
    buffers = set()
    for _ in range(100):
        ks, _ = cache.update(k, k)
        buffers.add(ks.untyped_storage().data_ptr())
    assert len(buffers) <= 8  # doubling: ~log2(100) reallocations, not 100


def test_cross_attention_decoder_over_encoder():
    layer = MultiHeadAttention(16, 4, kdim=6, vdim=6).eval()
    dec, enc = torch.randn(2, 3, 16), torch.randn(2, 11, 6)
    enc_pad = torch.zeros(2, 11, dtype=torch.bool)
    enc_pad[1, 8:] = True
    out, w = layer(dec, enc, key_padding_mask=enc_pad, need_weights=True)
    assert out.shape == (2, 3, 16) and w.shape == (2, 4, 3, 11)
    assert (w[1, :, :, 8:] == 0).all()
    close(w.sum(-1), torch.ones(2, 4, 3))
    q = layer.q_proj(dec).view(2, 3, 4, 4).transpose(1, 2)
    k = layer.k_proj(enc).view(2, 11, 4, 4).transpose(1, 2)
    v = layer.v_proj(enc).view(2, 11, 4, 4).transpose(1, 2)
    manual = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~enc_pad[:, None, None])
    close(out, layer.out_proj(manual.transpose(1, 2).reshape(2, 3, 16)))


def test_mask_objects_and_dropout_in_the_layer():
    layer = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(1, 20, 16)
    layer.eval()
    a = layer(x, attn_mask=masks.sliding_window(2))[0]
    b = layer(x, attn_mask=masks.sliding_window(2).materialize(20))[0]
    close(a, b)
    layer.train()
    assert not torch.allclose(layer(x)[0], layer(x)[0])


def test_layer_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        MultiHeadAttention(12, 4, 3)
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must be \(batch, length, 8\)"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask must be .* \(2, 5\)"):
        layer(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="cache must be an attnkit.KVCache"):
        layer(torch.randn(2, 5, 8), cache={})
    with pytest.raises(ValueError, match="share the batch size"):
        layer(torch.randn(2, 5, 8), torch.randn(3, 5, 8))
