"""KV caches: the growing KVCache and the rolling SlidingWindowCache. Decoding one token at a
time (or in chunks) equals one full causal(-sliding) call, positions stay absolute, memory
per token stays constant with the rolling cache."""

import pytest
import torch

import attnkit
from attnkit import KVCache, MultiHeadAttention, bias, masks
from attnkit.cache import SlidingWindowCache


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


class HalfTurn:
    """A minimal rotary embedding (rotate-half, base 10000) written out here, so the test
    checks that the layer hands the cache's absolute positions to ``rope``."""

    def __init__(self, dim):
        self.inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def rope(self, q, k, positions):
        ang = positions.to(torch.float64)[:, None] * self.inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def turn(x):
            x1, x2 = x.chunk(2, -1)
            rot = torch.cat([-x2, x1], -1)
            return (x * cos.to(x.dtype) + rot * sin.to(x.dtype))
        return turn(q), turn(k)


def decode(layer, x, cache, chunks, **kw):
    outs, t = [], 0
    for n in chunks:
        outs.append(layer(x[:, t:t + n], cache=cache, **kw)[0])
        t += n
    assert t == x.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("window", [1, 4, 7])
@pytest.mark.parametrize("positional", ["none", "rope", "alibi"])
def test_one_token_decode_equals_full_sliding_pass_far_beyond_the_window(window, positional):
    torch.manual_seed(window)
    pos = {"none": None, "rope": HalfTurn(8), "alibi": bias.alibi(4)}[positional]
    layer = MultiHeadAttention(32, 4, 2, positional=pos).eval()
    T = 10 * window + 13
    x = torch.randn(2, T, 32)
    m = masks.sliding_window(window - 1, 0)
    with torch.no_grad():
        full = layer(x, attn_mask=m, is_causal=True)[0]
        cache = SlidingWindowCache(window)
        got = decode(layer, x, cache, [3] + [1] * (T - 3), attn_mask=m, is_causal=True)
    close(got, full)
    assert len(cache) == T
    assert cache.keys.shape == (2, 2, window - 1, 8)


def test_memory_per_token_is_constant():
    torch.manual_seed(0)
    window = 6
    layer = MultiHeadAttention(16, 2).eval()
    cache = SlidingWindowCache(window)
    m = masks.sliding_window(window - 1, 0)
    storages, kept = set(), set()
    with torch.no_grad():
        for t in range(20 * window):
            layer(torch.randn(1, 1, 16), attn_mask=m, cache=cache)
            if t >= window:
                storages.add(cache._k.untyped_storage().nbytes()
                             + cache._v.untyped_storage().nbytes())
                kept.add(cache.nbytes)
    assert len(cache) == 20 * window
    assert storages == {2 * cache.capacity * 2 * 8 * 4}  # K and V, (1, 2, capacity, 8) float32
    assert kept == {2 * (window - 1) * 2 * 8 * 4}
    # the growing cache, by contrast, holds every token
    grow = KVCache()
    with torch.no_grad():
        for _ in range(3 * window):
            layer(torch.randn(1, 1, 16), cache=grow)
    assert grow.nbytes == 2 * 3 * window * 2 * 8 * 4


@pytest.mark.parametrize("chunks", [[40], [5, 9, 1, 1, 17, 7], [1, 30, 9]])
def test_chunked_prefill_and_decode_equal_the_full_pass(chunks):
    """Chunks longer than the buffer, shorter than the window, and everything between."""
    torch.manual_seed(1)
    window = 5
    layer = MultiHeadAttention(16, 4, 1, positional=HalfTurn(4)).eval()
    x = torch.randn(3, 40, 16)
    m = masks.sliding_window(window - 1, 0)
    with torch.no_grad():
        full = layer(x, attn_mask=m, is_causal=True)[0]
        cache = SlidingWindowCache(window)
        got = decode(layer, x, cache, chunks, attn_mask=m, is_causal=True)
    close(got, full)
    assert cache.keys.shape[2] == window - 1


def test_update_returns_kept_keys_then_new_ones_in_position_order():
    cache = SlidingWindowCache(4)
    seq = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1)
    k, _ = cache.update(seq[:, :, :2], -seq[:, :, :2])
    assert k.flatten().tolist() == [0, 1]
    t = 2
    for n in [1, 1, 5, 1, 2, 1, 1, 1, 15]:
        k, v = cache.update(seq[:, :, t:t + n], -seq[:, :, t:t + n])
        lo = max(0, t - 3)
        assert k.flatten().tolist() == list(range(lo, t + n))
        assert torch.equal(v, -k)
        t += n
    assert len(cache) == 30 and cache.keys.flatten().tolist() == [27, 28, 29]
    cache.reset()
    assert len(cache) == 0 and cache.keys is None


def test_gradients_through_the_rolling_cache_equal_the_full_pass():
    torch.manual_seed(2)
    window = 3
    layer = MultiHeadAttention(8, 2)
    x = torch.randn(1, 11, 8, requires_grad=True)
    m = masks.sliding_window(window - 1, 0)
    full = layer(x, attn_mask=m, is_causal=True)[0]
    gx_full, gw_full = torch.autograd.grad(full.square().sum(), [x, layer.q_proj.weight])
    got = decode(layer, x, SlidingWindowCache(window), [2] + [1] * 9, attn_mask=m, is_causal=True)
    close(got, full)
    gx, gw = torch.autograd.grad(got.square().sum(), [x, layer.q_proj.weight])
    close(gx, gx_full)
    close(gw, gw_full)


def test_kv_cache_appends_and_returns_all():
    cache = KVCache()
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 5)
    cache.update(a, a)
    k, v = cache.update(b, b)
    assert torch.equal(k, torch.cat([a, b], 2)) and len(cache) == 5


def test_bad_input_raises():
    with pytest.raises(ValueError, match="window must be >= 1"):
        SlidingWindowCache(0)
    with pytest.raises(TypeError, match="window must be an int"):
        SlidingWindowCache(2.5)
    cache = SlidingWindowCache(3)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        cache.update(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cannot add"):
        cache.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert isinstance(cache, KVCache)  # MultiHeadAttention accepts it


# --------------------------------------------------------------------------- crop, reorder, lengths

def _kv(B=3, H=2, n=1, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)


def test_crop_rolls_back_rejected_tokens_exactly():
    """Speculative decoding: 6 tokens, 3 draft tokens appended then 2 rejected; the cache
    equals one that never saw them, and the caller's tensors are never written."""
    first = _kv(n=6, seed=1)
    kept = tuple(t.clone() for t in first)
    cache, plain = attnkit.KVCache(), attnkit.KVCache()
    cache.update(*first)
    plain.update(*(t.clone() for t in first))
    cache.crop(4)  # straight into the caller's tensor's length: must not write into it
    cache.update(*_kv(seed=2))
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])
    draft = _kv(n=3, seed=3)
    cache.update(*draft)
    cache.crop(len(cache) - 2)
    plain.crop(4)
    for step in (_kv(seed=2), tuple(t[:, :, :1] for t in draft), _kv(seed=4)):
        plain.update(*step)
    k, v = cache.update(*_kv(seed=4))
    assert torch.equal(k, plain.keys) and torch.equal(v, plain.values)
    assert cache.lengths.tolist() == [7, 7, 7] and len(cache) == 7
    with pytest.raises(ValueError, match=r"length must be in \[0, 7\]"):
        cache.crop(8)
    with pytest.raises(TypeError):
        cache.crop(2.0)


def test_reorder_selects_beams():
    cache = attnkit.KVCache()
    for s in range(5):
        cache.update(*_kv(seed=s))
    before_k, before_v = cache.keys.clone(), cache.values.clone()
    beams = torch.tensor([2, 2, 0])
    cache.reorder(beams)
    assert torch.equal(cache.keys, before_k[beams]) and torch.equal(cache.values, before_v[beams])
    k, _ = cache.update(*_kv(seed=9))  # and decoding goes on from the chosen beams
    assert torch.equal(k[:, :, :5], before_k[beams]) and k.shape[2] == 6
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        cache.reorder(torch.tensor([3]))
    with pytest.raises(TypeError):
        cache.reorder([0, 1])


def test_sliding_window_cache_crops_within_its_rollback():
    """With rollback=2 the cache keeps two tokens past the window: cropping 2 drafts leaves
    the next token's window whole, and attention over the returned keys (with the window
    mask) equals a cache that never saw them; without rollback a crop is refused."""
    window = 4
    m = masks.sliding_window(window - 1, 0)
    cache, plain = (attnkit.SlidingWindowCache(window, rollback=2),
                    attnkit.SlidingWindowCache(window))
    steps = [_kv(seed=s) for s in range(8)]
    for st in steps:
        cache.update(*st)
    cache.crop(6)
    for st in steps[:6]:
        plain.update(*st)
    q = torch.randn(3, 2, 1, 4)
    k, v = cache.update(*steps[6])
    k2, v2 = plain.update(*steps[6])
    got = attnkit.scaled_dot_product_attention(q, k, v, m)
    want = attnkit.scaled_dot_product_attention(q, k2, v2, m)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(k[:, :, -window:], k2[:, :, -window:]) and len(cache) == 7
    with pytest.raises(ValueError, match="pass rollback="):
        plain.crop(5)
    cache.reorder(torch.tensor([1, 0, 2]))
    assert cache.lengths.tolist() == [7, 7, 7]


def test_latent_cache_crop_and_reorder():
    cache, plain = attnkit.LatentCache(), attnkit.LatentCache()
    zs = [torch.randn(2, 1, 1, 6, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for z in zs:
        cache.update(z)
    cache.crop(3)
    for z in zs[:3]:
        plain.update(z)
    assert torch.equal(cache.update(zs[4]), plain.update(zs[4]))
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.latents, plain.latents[[1, 1]]) and cache.lengths.tolist() == [4, 4]
