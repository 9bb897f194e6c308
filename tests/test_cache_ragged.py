"""Ragged batches in the KV cache: each sequence has its own cached length
(FlashAttention's ``cache_seqlens``). Prefilling prompts of different lengths in one call
and then decoding every sequence one token per call equals running each sequence alone,
with positions (RoPE, ALiBi) that follow each sequence's own length."""

import pytest
import torch

from attnkit import KVCache, MultiHeadAttention, bias, masks, scaled_dot_product_attention
from attnkit.backends.reference import reference_attention
from attnkit.positional import RotaryEmbedding


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def layer_with(positional, heads=4, kv_heads=2):
    torch.manual_seed(0)
    pos = {"none": None, "rope": RotaryEmbedding(8), "alibi": bias.alibi(heads)}[positional]
    return MultiHeadAttention(8 * heads, heads, kv_heads, positional=pos).double().eval()


@pytest.mark.parametrize("positional", ["none", "rope", "alibi"])
def test_ragged_prefill_then_decode_equals_each_sequence_alone(positional):
    layer = layer_with(positional)
    prompts, steps, E = [5, 2, 7], 4, layer.embed_dim
    torch.manual_seed(1)
    seqs = [torch.randn(1, n + steps, E, dtype=torch.float64) for n in prompts]
    batch = torch.zeros(3, max(prompts), E, dtype=torch.float64)
    for b, n in enumerate(prompts):
        batch[b, :n] = seqs[b][0, :n]
    cache = KVCache()
    with torch.no_grad():
        first = layer(batch, cache=cache, is_causal=True,
                      query_lengths=torch.tensor(prompts))[0]
        steps_out = [layer(torch.stack([s[0, n + t] for s, n in zip(seqs, prompts)])[:, None],
                           cache=cache, is_causal=True)[0] for t in range(steps)]
        alone = [layer(s, is_causal=True)[0] for s in seqs]
    for b, n in enumerate(prompts):
        close(first[b, :n], alone[b][0, :n], 1e-10)
        close(first[b, n:], layer.out_proj.bias.expand(len(first[b, n:]), -1), 0)  # see nothing
        for t in range(steps):
            close(steps_out[t][b, 0], alone[b][0, n + t], 1e-10)
    assert cache.lengths.tolist() == [n + steps for n in prompts]
    assert len(cache) == max(prompts) + steps


def test_chunks_of_different_sizes_per_sequence_equal_one_pass():
    """Speculative verification: each sequence adds a different number of tokens."""
    layer = layer_with("rope")
    torch.manual_seed(2)
    x = torch.randn(2, 12, layer.embed_dim, dtype=torch.float64)
    plan = [[3, 5], [4, 1], [2, 6]]  # tokens added per call, per sequence
    cache, done, outs = KVCache(), [0, 0], [[], []]
    with torch.no_grad():
        for counts in plan:
            n = max(counts)
            chunk = torch.zeros(2, n, layer.embed_dim, dtype=torch.float64)
            for b, c in enumerate(counts):
                chunk[b, :c] = x[b, done[b]:done[b] + c]
            out = layer(chunk, cache=cache, is_causal=True, query_lengths=torch.tensor(counts))[0]
            for b, c in enumerate(counts):
                outs[b].append(out[b, :c])
                done[b] += c
        full = layer(x, is_causal=True)[0]
    for b in range(2):
        got = torch.cat(outs[b])
        close(got, full[b, :done[b]], 1e-10)


def test_update_writes_each_row_after_its_own_length_and_pads_with_zeros():
    cache = KVCache()
    k = torch.arange(1., 1 + 2 * 1 * 3 * 2).view(2, 1, 3, 2)
    kk, _ = cache.update(k, -k, lengths=torch.tensor([3, 1]))
    assert kk.shape == (2, 1, 3, 2) and cache.lengths.tolist() == [3, 1]
    new = torch.full((2, 1, 1, 2), 100.)
    kk, vv = cache.update(new, new)
    assert cache.lengths.tolist() == [4, 2] and kk.shape == (2, 1, 4, 2)
    close(kk[0, 0], torch.cat([k[0, 0], new[0, 0]]))
    close(kk[1, 0, :2], torch.cat([k[1, 0, :1], new[1, 0]]))
    assert kk[1, 0, 2:].abs().max() == 0 and torch.isfinite(vv).all()  # never the caller's padding
    assert cache.nbytes == (4 + 2) * 2 * 2 * 4
    m = cache.mask()
    assert m.lengths.tolist() == [4, 2] and m.query_lengths.tolist() == [1, 1]


@pytest.mark.parametrize("L", [1, 3])
def test_functional_call_with_the_cache_mask_equals_the_reference(L):
    torch.manual_seed(3)
    cache = KVCache()
    B, H, Hkv, D = 3, 4, 2, 8
    lens = torch.tensor([9, 4, 6])
    cache.update(torch.randn(B, Hkv, 9, D), torch.randn(B, Hkv, 9, D), lengths=lens)
    q = torch.randn(B, H, L, D)
    k, v = cache.update(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D))
    out = scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(), is_causal=True)
    for b in range(B):
        n = int(cache.lengths[b])
        kb, vb = k[b:b + 1, :, :n], v[b:b + 1, :, :n]
        want = reference_attention(q[b:b + 1], kb, vb, mask=masks.causal(),
                                   scale=D ** -0.5)[0]
        close(out[b:b + 1], want)


def test_crop_per_sequence_and_reorder_keep_rows_straight():
    torch.manual_seed(4)
    cache = KVCache()
    k = torch.randn(3, 2, 6, 4)
    cache.update(k, k, lengths=torch.tensor([6, 3, 5]))
    cache.crop(torch.tensor([4, 3, 2]))
    assert cache.lengths.tolist() == [4, 3, 2]
    cache.reorder(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [2, 4]
    close(cache.keys[0, :, :2], k[2, :, :2])
    close(cache.keys[1, :, :4], k[0, :, :4])
    cache.crop(3)  # an int crops the longer rows only
    assert cache.lengths.tolist() == [2, 3]
    kk, _ = cache.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    close(kk[0, :, 2], torch.ones(2, 4))
    close(kk[1, :, 3], torch.ones(2, 4))
    with pytest.raises(ValueError, match="can only shrink"):
        cache.crop(torch.tensor([5, 1]))


def test_equal_lengths_stay_on_the_in_place_path():
    cache = KVCache()
    k = torch.randn(2, 1, 4, 8)
    cache.update(k, k, lengths=torch.tensor([4, 4]))
    assert not cache.is_ragged and cache.mask() is None


def test_bad_lengths_raise():
    cache = KVCache()
    k = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"\(B,\) = \(2,\)"):
        cache.update(k, k, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        cache.update(k, k, lengths=torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="integers"):
        cache.update(k, k, lengths=torch.tensor([1.0, 2.0]))
    cache.update(k, k, lengths=[1, 2])
    with pytest.raises(ValueError, match="cannot add"):
        cache.update(k[:1], k[:1])


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_ragged_sliding_window_cache_far_past_the_window_equals_each_sequence_alone(positional):
    from attnkit.cache import SlidingWindowCache
    layer = layer_with(positional)
    window, prompts, steps, E = 4, [6, 2, 3], 9, layer.embed_dim
    m = masks.sliding_window(window - 1, 0)
    torch.manual_seed(5)
    seqs = [torch.randn(1, n + steps, E, dtype=torch.float64) for n in prompts]
    batch = torch.zeros(3, max(prompts), E, dtype=torch.float64)
    for b, n in enumerate(prompts):
        batch[b, :n] = seqs[b][0, :n]
    cache = SlidingWindowCache(window)
    with torch.no_grad():
        first = layer(batch, cache=cache, attn_mask=m, is_causal=True,
                      query_lengths=torch.tensor(prompts))[0]
        outs = [layer(torch.stack([s[0, n + t] for s, n in zip(seqs, prompts)])[:, None],
                      cache=cache, attn_mask=m, is_causal=True)[0] for t in range(steps)]
        alone = [layer(s, attn_mask=m, is_causal=True)[0] for s in seqs]
    for b, n in enumerate(prompts):
        close(first[b, :n], alone[b][0, :n], 1e-10)
        for t in range(steps):
            close(outs[t][b, 0], alone[b][0, n + t], 1e-10)
    assert cache.lengths.tolist() == [n + steps for n in prompts]
    assert cache.keys.shape[2] == window - 1  # constant memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_runs_on_the_decode_kernel_and_equals_the_reference(dtype):
    import attnkit
    torch.manual_seed(6)
    B, H, Hkv, D = 3, 8, 2, 16
    lens = torch.tensor([300, 257, 420])
    cache = KVCache()
    cache.update(torch.randn(B, Hkv, 420, D, dtype=dtype), torch.randn(B, Hkv, 420, D, dtype=dtype),
                 lengths=lens)
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = cache.update(torch.randn(B, Hkv, 1, D, dtype=dtype), torch.randn(B, Hkv, 1, D, dtype=dtype))
    choice = attnkit.explain(q, k, v, attn_mask=cache.mask(), is_causal=True)
    assert choice.backend == "decode", choice
    out = scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(), is_causal=True)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b in range(B):
        n = int(cache.lengths[b])
        want = reference_attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                   v[b:b + 1, :, :n].double(), scale=D ** -0.5)[0]
        close(out[b:b + 1].double(), want, tol)
    with_bias = attnkit.explain(q, k, v, attn_mask=cache.mask(), bias=bias.alibi(H))
    assert with_bias.backend != "decode"
