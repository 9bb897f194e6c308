"""MultiHeadLatentAttention (DeepSeek's MLA) and LatentCache, without transformers: the
absorbed form equals the decompressed one (outputs and gradients), decoding from the
compressed cache equals one full pass, the cache holds r + dr numbers per token, bf16
keeps FlashAttention's error rule, and bad input is refused by name. Parity with
transformers' DeepseekV3Attention is in tests/test_hf_deepseek.py."""

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.layers import MultiHeadLatentAttention
from attnkit.layers import latent as latent_module

# a small MLA: 4 heads, query rank 32, latent r = 16, rope part 8, nope 16, values 12
SIZES = dict(hidden_size=48, num_heads=4, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _layer(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MultiHeadLatentAttention(**{**SIZES, **kw}, dtype=dtype)
    with torch.no_grad():  # norms away from 1, so a missing norm would show
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return layer


def _x(B=2, L=10, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, SIZES["hidden_size"], generator=g).to(dtype)


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("interleave", [True, False])
def test_absorbed_equals_decompressed_outputs_and_gradients(q_lora_rank, interleave):
    layer = _layer(torch.float64, q_lora_rank=q_lora_rank, rope_interleave=interleave)
    x = _x(dtype=torch.float64).requires_grad_()
    outs, grads = [], []
    for absorb in (False, True):
        y = layer(x, absorb=absorb)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        x.grad = None
        layer.zero_grad()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 5], [7, 3]])
def test_decoding_from_the_latent_cache_equals_one_pass(chunks):
    layer = _layer()
    x = _x()
    with torch.no_grad():
        want = layer(x)
        cache = attnkit.LatentCache()
        got, i = [], 0
        for n in chunks:
            got.append(layer(x[:, i:i + n], cache=cache))
            i += n
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
    r_dr = SIZES["kv_lora_rank"] + SIZES["qk_rope_head_dim"]
    assert cache.latents.shape == (2, 1, 10, r_dr) and len(cache) == 10
    assert cache.nbytes == 2 * 10 * r_dr * 4


def test_decoding_takes_the_absorbed_form(monkeypatch):
    layer = _layer()
    used = []
    for name in ("absorbed", "decompressed"):
        real = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    cache = attnkit.LatentCache()
    with torch.no_grad():
        layer(_x(L=6), cache=cache)  # prompt
        layer(_x(L=1), cache=cache)  # one decoding step
        layer(_x(L=8))  # no cache: the decompressed (training) form
    # the prompt: rebuilding 6 keys costs less than attending with r + dr-wide queries
    assert used == ["decompressed", "absorbed", "decompressed"]


def test_the_cheaper_form_for_deepseek_v3_sizes():
    v3 = MultiHeadLatentAttention(7168, 128, 1536, 512, 128, 64, 128, device="meta")
    assert v3.prefers_absorbed(1, 16384) and v3.prefers_absorbed(1, 2)
    assert v3.prefers_absorbed(100, 4096) and not v3.prefers_absorbed(4096, 4096)
    assert v3.latent_dim == 576


def test_left_padding_and_per_sequence_positions():
    """Sequence 0 starts 3 tokens late (left padding): with a key padding mask and its
    own positions it equals the unpadded sequence, in one pass and token by token."""
    layer = _layer()
    x = _x(B=2, L=9)
    pad = 3
    positions = torch.stack([torch.arange(9) - pad, torch.arange(9)]).clamp(min=0)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, :pad] = True
    with torch.no_grad():
        alone = layer(x[:1, pad:])
        full = layer(x, positions, key_padding_mask=padding)
        cache, steps = attnkit.LatentCache(), []
        for i in range(9):
            steps.append(layer(x[:, i:i + 1], positions[:, i:i + 1], cache=cache,
                               key_padding_mask=padding[:, :i + 1]))
    torch.testing.assert_close(full[:1, pad:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1)[:, pad:], full[:, pad:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_within_flash_attention_rule(dtype):
    """Absorbed decoding in half precision: error against float64 at most 2x that of the
    decompressed form run in the same dtype with torch's SDPA (+ a rounding slack)."""
    layer64 = _layer(torch.float64)
    layer = _layer(dtype)
    layer.load_state_dict(layer64.state_dict())
    x64 = _x(L=40, dtype=torch.float64)
    x = x64.to(dtype)
    with torch.no_grad():
        want = layer64(x64)[:, -1:]
        cache = attnkit.LatentCache()
        layer(x[:, :-1], cache=cache)
        got = layer(x[:, -1:], cache=cache, absorb=True).double()
        # the peer: the same layer's math, keys and values rebuilt, attention by torch
        q_nope, q_rope = layer.queries(x, torch.arange(40))
        z = layer.latents(x, torch.arange(40))
        c, k_rope = z.split([16, 8], -1)
        kv = layer.kv_b_proj(c.squeeze(1)).view(2, 40, 4, 28).transpose(1, 2)
        k_nope, v = kv.split([16, 12], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, 4, -1, -1)], -1)
        o = torch.nn.functional.scaled_dot_product_attention(
            torch.cat([q_nope, q_rope], -1), k, v, is_causal=True, scale=layer.scaling)
        peer = layer.o_proj(o.transpose(1, 2).reshape(2, 40, 48))[:, -1:].double()
    err, peer_err = (got - want).abs().max(), (peer - want).abs().max()
    assert err <= 2 * peer_err + 1e-3 * want.abs().max(), (err, peer_err)


def test_yarn_multiplies_the_softmax_scale_by_mscale_squared():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 0.707}
    plain, scaled = _layer(), _layer(rope_scaling=yarn)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1
    assert plain.scaling == pytest.approx(24 ** -0.5)
    assert scaled.scaling == pytest.approx(24 ** -0.5 * m * m)


def test_latent_cache_refuses_mismatched_latents():
    cache = attnkit.LatentCache()
    cache.update(torch.zeros(2, 1, 3, 24))
    with pytest.raises(ValueError, match="cannot append"):
        cache.update(torch.zeros(2, 1, 1, 20))
    with pytest.raises(ValueError, match="cannot append"):
        cache.update(torch.zeros(2, 1, 1, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, 1, n"):
        cache.update(torch.zeros(2, 4, 1, 24))
    with pytest.raises(TypeError):
        cache.update([0.0])
    cache.reset()
    assert len(cache) == 0 and cache.latents is None and cache.nbytes == 0


def test_bad_input_is_named():
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must be \(batch, length, 48\)"):
        layer(torch.zeros(2, 5, 40))
    with pytest.raises(TypeError, match="LatentCache"):
        layer(_x(), cache=attnkit.KVCache())
    with pytest.raises(TypeError, match="absorb"):
        layer(_x(), absorb=1)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(_x(L=4), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MultiHeadLatentAttention(**{**SIZES, "qk_rope_head_dim": 7})
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MultiHeadLatentAttention(**{**SIZES, "kv_lora_rank": 0})


def test_one_row_decoding_folds_heads_into_rows_with_mask_objects(monkeypatch):
    """A decoding step (L == 1) whose mask every head shares (a mask object, a (B, S)
    padding) runs as one multi-query call with the H heads as rows; a mask that differs
    by head does not; both equal the decompressed form."""
    layer = _layer(torch.float64)
    x = _x(L=8, dtype=torch.float64)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, :2] = True
    per_head = torch.rand(2, 4, 1, 8, generator=torch.Generator().manual_seed(3)) > 0.3
    per_head[..., -1] = True
    rows = []
    real = latent_module.scaled_dot_product_attention
    monkeypatch.setattr(latent_module, "scaled_dot_product_attention",
                        lambda q, *a, **k: rows.append(q.shape[-2]) or real(q, *a, **k))
    for mask, folded in ((masks.causal() & masks.key_padding(~pad), True),
                         (~pad[:, None, None, :], True), (per_head, False)):
        cache = attnkit.LatentCache()
        with torch.no_grad():
            layer(x[:, :7], cache=cache, absorb=False)
            z = cache.latents
            rows.clear()
            got = layer(x[:, 7:], cache=cache, attn_mask=mask, absorb=True)
        assert rows == [4 if folded else 1]
        cache = attnkit.LatentCache()
        cache.update(z)
        with torch.no_grad():
            want = layer(x[:, 7:], cache=cache, attn_mask=mask, absorb=False)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_wrapped_up_projection_is_never_folded():
    """LoRA or quantized wrappers of kv_b_proj are called, not read: decoding takes the
    decompressed form, and forcing the absorbed one is refused."""
    layer = _layer()

    class Wrapped(torch.nn.Module):  # a stand-in for a LoRA / quantized linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    with torch.no_grad():
        want = layer(_x())
    layer.kv_b_proj = Wrapped(layer.kv_b_proj)
    assert not layer.can_absorb
    cache = attnkit.LatentCache()
    with torch.no_grad():
        steps = [layer(_x()[:, i:i + 1], cache=cache) for i in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        layer(_x(), absorb=True)


def test_latent_cache_under_autograd_and_the_callers_tensor():
    """The first update keeps the caller's tensor and never writes into it; under autograd
    the cache concatenates, so gradients reach every step's latents."""
    first = torch.randn(1, 1, 3, 24)
    kept = first.clone()
    cache = attnkit.LatentCache()
    cache.update(first)
    for _ in range(40):
        cache.update(torch.randn(1, 1, 1, 24))
    assert torch.equal(first, kept) and len(cache) == 43
    a, b = torch.randn(1, 1, 2, 24, requires_grad=True), torch.randn(1, 1, 1, 24, requires_grad=True)
    cache = attnkit.LatentCache()
    cache.update(a)
    cache.update(b).sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, torch.ones_like(b))


def test_positions_and_yarn_without_factor():
    layer = _layer()
    with pytest.raises(ValueError, match=r"positions must be integers \(10,\) or \(2, 10\)"):
        layer(_x(), torch.zeros(3, 10, dtype=torch.long))
    yarn = {"rope_type": "yarn", "original_max_position_embeddings": 64,
            "max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0}
    m = 0.1 * torch.log(torch.tensor(4.0)).item() + 1
    assert _layer(rope_scaling=yarn).scaling == pytest.approx(24 ** -0.5 * m * m)
