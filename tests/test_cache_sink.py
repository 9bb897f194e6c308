"""StreamingLLM's SinkCache: the first tokens and a rolling window, constant memory,
positions inside the cache (keys turned by RoPE when read, at their slots)."""

import pytest
import torch

from attnkit import MultiHeadAttention, SinkCache, bias, masks
from attnkit.positional import RotaryEmbedding


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def reference_step(layer, history, num_sinks, window):
    """What StreamingLLM computes for the newest token of ``history`` (1, T, E): keys of
    the first ``num_sinks`` and the last ``window`` tokens (itself included), RoPE at
    their index in that list, the query at the last index. Written from the paper, with
    the layer's projections and one plain softmax."""
    T = history.shape[1]
    kept = list(range(min(num_sinks, T))) + list(range(max(num_sinks, T - window), T))
    x = history[:, kept]
    H, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x[:, -1:]).view(1, 1, H, d).transpose(1, 2)
    k = layer.k_proj(x).view(1, -1, Hkv, d).transpose(1, 2)
    v = layer.v_proj(x).view(1, -1, Hkv, d).transpose(1, 2)
    rope = layer.positional
    S = len(kept)
    q, k = rope.rotate(q, torch.tensor([S - 1])), rope.rotate(k, torch.arange(S))
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1)
    return layer.out_proj((w @ v).transpose(1, 2).reshape(1, 1, H * d))[0, 0]


@pytest.mark.parametrize("num_sinks,window", [(4, 6), (1, 1), (0, 5)])
def test_one_token_steps_equal_streaming_llm_far_past_the_window(num_sinks, window):
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, 2, positional=RotaryEmbedding(8)).double().eval()
    T = num_sinks + 3 * window + 11
    x = torch.randn(1, T, 32, dtype=torch.float64)
    cache = SinkCache(num_sinks, window)
    with torch.no_grad():
        for t in range(T):
            out = layer(x[:, t:t + 1], cache=cache, is_causal=True)[0]
            close(out[0, 0], reference_step(layer, x[:, :t + 1], num_sinks, window))
            assert cache.keys.shape[2] == min(t + 1, num_sinks + window - 1)
    assert len(cache) == T and cache.lengths.tolist() == [T]


def test_a_prompt_in_one_call_equals_token_by_token():
    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, 4, positional=RotaryEmbedding(8)).double().eval()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = SinkCache(2, 5), SinkCache(2, 5)
        steps = torch.cat([layer(x[:, t:t + 1], cache=a, is_causal=True)[0] for t in range(30)], 1)
        first = layer(x[:, :3], cache=b, is_causal=True)[0]  # short prompt: nothing evicted
        rest = torch.cat([layer(x[:, t:t + 1], cache=b, is_causal=True)[0]
                          for t in range(3, 30)], 1)
    close(torch.cat([first, rest], 1), steps)


def test_alibi_distances_are_slot_distances_and_memory_is_constant():
    torch.manual_seed(2)
    layer = MultiHeadAttention(16, 2, positional=bias.alibi(2)).double().eval()
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    cache = SinkCache(3, 4)
    sizes = set()
    with torch.no_grad():
        for t in range(40):
            out = layer(x[:, t:t + 1], cache=cache, is_causal=True)[0]
            sizes.add(cache.nbytes)
        kept = list(range(3)) + list(range(36, 40))  # what the last token sees
        want = layer(x[:, kept], is_causal=True)[0][:, -1]
    close(out[:, 0], want)
    assert max(sizes) == 2 * (3 + 4 - 1) * 16 * 8


def test_ragged_batch_equals_each_sequence_alone():
    torch.manual_seed(3)
    layer = MultiHeadAttention(32, 4, 2, positional=RotaryEmbedding(8)).double().eval()
    lens = [3, 1]
    xs = [torch.randn(1, 20, 32, dtype=torch.float64) for _ in lens]
    batch = torch.zeros(2, 3, 32, dtype=torch.float64)
    for b, n in enumerate(lens):
        batch[b, :n] = xs[b][0, :n]
    cache = SinkCache(2, 4)
    with torch.no_grad():
        first = layer(batch, cache=cache, is_causal=True, query_lengths=torch.tensor(lens))[0]
        outs = [layer(torch.stack([xs[b][0, lens[b] + t] for b in range(2)])[:, None],
                      cache=cache, is_causal=True)[0] for t in range(15)]
        for b, n in enumerate(lens):
            for t in range(n):
                close(first[b, t], reference_step(layer, xs[b][:, :t + 1], 2, 4))
            for t in range(15):
                close(outs[t][b, 0], reference_step(layer, xs[b][:, :n + t + 1], 2, 4))
    assert cache.lengths.tolist() == [18, 16]


def test_crop_before_eviction_and_reorder():
    cache = SinkCache(2, 8)
    k = torch.randn(2, 1, 5, 4)
    cache.update(k, k)
    cache.crop(3)
    close(cache.keys[:, :, :3], k[:, :, :3], 0)
    cache.reorder(torch.tensor([1]))
    close(cache.keys, k[1:, :, :3], 0)
    for _ in range(10):
        cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    with pytest.raises(ValueError, match="evicted"):
        cache.crop(10)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="window"):
        SinkCache(4, 0)
    with pytest.raises(TypeError, match="num_sinks"):
        SinkCache(2.0, 4)
    layer = MultiHeadAttention(16, 2, positional=type("R", (), {"rope": lambda *a: a[1:3]})())
    with pytest.raises(TypeError, match="rotate"):
        layer(torch.randn(1, 2, 16), cache=SinkCache(1, 4), is_causal=True)
