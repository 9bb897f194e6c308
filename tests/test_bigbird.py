"""BigBirdAttention: HuggingFace parity (eval and training plans, padding, lengths that are
not multiples of the block, the full-attention fallback), the generic pattern against the
reference backend with the materialised mask, determinism, gradients, errors."""

import math

import numpy as np
import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.masks import KeyPaddingMask as KeyMask
from attnkit.integrations.hf.bigbird import AttnkitBigBirdBlockSparseAttention, layer_from_hf
from attnkit.layers.bigbird import BigBirdAttention, BlockBias
from attnkit.layers.bigbird_plan import hf_block_counts, hf_random_plan
from transformers import BigBirdConfig
from transformers.models.big_bird.modeling_big_bird import (BigBirdBlockSparseAttention,
                                                            BigBirdModel, BigBirdSelfAttention)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def hf_config(E=32, H=4, block_size=8, r=2, max_len=4096):
    return BigBirdConfig(hidden_size=E, num_attention_heads=H, block_size=block_size,
                         num_random_blocks=r, attention_type="block_sparse",
                         initializer_range=0.2, max_position_embeddings=max_len,
                         attention_probs_dropout_prob=0.0)


def hf_sparse(cfg, seed=3, training=False):
    hf = BigBirdBlockSparseAttention(cfg, seed=seed).train(training)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, cfg.initializer_range)
    return hf


def run_hf(hf, x, attention_mask):
    bm, band, fm, tm = BigBirdModel.create_masks_for_block_sparse_attn(attention_mask,
                                                                       hf.block_size)
    with torch.no_grad():
        return hf(x, band, fm, tm, bm, bm)[0]


@pytest.mark.parametrize("L,bs,r,training", [
    (128, 8, 2, False), (96, 8, 3, False), (120, 8, 1, False), (80, 4, 3, False),
    (128, 8, 2, True), (80, 4, 3, True), (1024, 64, 2, True),  # 1024: the paper's plans
])
def test_equals_huggingface_block_sparse(L, bs, r, training):
    cfg = hf_config(block_size=bs, r=r, max_len=max(L, 512))
    hf = hf_sparse(cfg, training=training)
    ours = layer_from_hf(hf)
    assert ours.training == training and ours.is_sparse(L)
    x = torch.randn(2, L, 32)
    am = torch.ones(2, L)
    am[1, L - bs - 3:] = 0  # padding reaching into the second-to-last block
    want = run_hf(hf, x, am)
    with torch.no_grad():
        got = ours(x, key_padding_mask=am == 0)
    keep = am.bool()
    close(got[keep], want[keep])
    assert (got[~keep] == 0).all()
    if not training:  # the eval quirk: block 0 fills every random slot, counted 1 + r times
        counts = hf_block_counts(L // bs, hf_random_plan(L, bs, r, 4))
        assert (counts[:, 2:-2, 0] == 1 + r).all()


def test_eval_duplicates_must_count_twice():
    """Without the log(count) bias (block 0 once per row) the output differs from HF's."""
    cfg = hf_config(block_size=8, r=2)
    hf = hf_sparse(cfg)
    ours = layer_from_hf(hf).eval()
    x = torch.randn(1, 128, 32)
    want = run_hf(hf, x, torch.ones(1, 128))
    mask, bias = ours.pattern_for(128)
    assert bias is not None
    ours._hf_layouts[(16, False)] = (mask.layout > 0).long()  # block 0 counted once
    with torch.no_grad():
        wrong = ours(x)
    assert (wrong - want).abs().max() > 1e-3


def test_random_plan_is_transformers_own():
    cfg = hf_config(block_size=4, r=3)
    hf = hf_sparse(cfg, training=True)
    for L in (64, 100, 160):
        n = L // 4
        plan_len, plan_r = hf._get_rand_attn_plan(L, 4, 3)
        np.random.seed(7)
        want = hf._bigbird_block_rand_mask_with_head(L, L, 4, 4, 4, plan_len, plan_r)
        got = hf_random_plan(L, 4, 3, 4, training=True, seed=7)
        assert got.shape == (4, n - 2, 3)
        assert torch.equal(got, torch.as_tensor(np.stack(want)).long())
    assert (hf_random_plan(100, 4, 3, 4) == 0).all()  # eval: no randomness at all


def test_length_not_a_multiple_of_the_block_equals_huggingface_padded():
    """BigBirdModel pads to a multiple of the block; a partial last block is the same."""
    cfg = hf_config(block_size=8, r=2)
    hf = hf_sparse(cfg)
    ours = layer_from_hf(hf).eval()
    L, Lp = 101, 104
    x = torch.randn(2, L, 32)
    xp = torch.cat([x, torch.zeros(2, Lp - L, 32)], 1)
    am = torch.ones(2, Lp)
    am[:, L:] = 0
    want = run_hf(hf, xp, am)[:, :L]
    with torch.no_grad():
        got = ours(x)
    close(got, want)


def test_short_sequences_fall_back_to_full_attention_like_huggingface():
    cfg = hf_config(block_size=8, r=2)  # block-sparse needs L > (5 + 2*2) * 8 = 72
    hf = hf_sparse(cfg)
    full = BigBirdSelfAttention(cfg).eval()
    full.load_state_dict(hf.state_dict())
    for pattern in ("hf", "bigbird"):
        ours = BigBirdAttention(32, 4, 8, 2, pattern=pattern).eval()
        ours.load_state_dict(hf.state_dict())
        assert not ours.is_sparse(72) and ours.is_sparse(73)
        x = torch.randn(2, 72, 32)
        pad = torch.zeros(2, 72, dtype=torch.bool)
        pad[1, 60:] = True
        additive = torch.zeros(2, 1, 1, 72).masked_fill(pad[:, None, None, :], -1e9)
        with torch.no_grad():
            want = full(x, attention_mask=additive)[0]
            got = ours(x, key_padding_mask=pad)
        close(got[~pad], want[~pad])


def dense_reference(layer, x, pad, allow, log_count=None):
    """Textbook attention in float64 with a dense (H|1, L, L) allow mask."""
    B, L, E = x.shape
    H, d = layer.num_heads, layer.head_dim
    heads = lambda t: t.view(B, L, H, d).transpose(1, 2)
    q, k, v = heads(layer.query(x)), heads(layer.key(x)), heads(layer.value(x))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if log_count is not None:
        s = s + log_count
    allow = allow & ~pad[:, None, None, :]
    out = torch.softmax(s.masked_fill(~allow, -math.inf), -1) @ v
    out = out.transpose(1, 2).reshape(B, L, E)
    return out.masked_fill(pad[..., None], 0.0)


@pytest.mark.parametrize("case", range(5))
def test_generic_pattern_equals_reference_random_shapes(case):
    g = torch.Generator().manual_seed(case)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    H, d, bs, r = ri(1, 3), ri(2, 4), ri(2, 6), ri(0, 2)
    nw, ng = [1, 3, 5][ri(0, 2)], ri(0, 3)
    L = (nw + ng + 2 * r) * bs + ri(1, 3 * bs)  # sparse, often with a partial last block
    layer = BigBirdAttention(H * d, H, bs, r, num_window_blocks=nw, num_global_blocks=ng,
                             seed=case, backend="chunked").double().eval()
    assert layer.is_sparse(L)
    x = torch.randn(2, L, H * d, generator=g, dtype=torch.float64)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, L - ri(1, L // 2):] = True
    allow = masks.bigbird(bs, nw, ng, r, seed=case, num_heads=H).materialize(L, L)
    with torch.no_grad():
        got = layer(x, key_padding_mask=pad)
        want = dense_reference(layer, x, pad, allow)
    close(got, want, tol=1e-10)
    layer.gather = False  # the tiled engine with the mask objects: the same numbers
    with torch.no_grad():
        close(layer(x, key_padding_mask=pad), want, tol=1e-10)


def test_hf_pattern_equals_reference_with_materialised_mask_and_bias():
    layer = BigBirdAttention(12, 3, 4, 2, pattern="hf", backend="chunked").double().train()
    L = 4 * 13 + 2
    x = torch.randn(2, L, 12, dtype=torch.float64)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[0, 40:] = True
    mask, bias = layer.pattern_for(L)
    allow = mask.materialize(L, L)
    log_count = None if bias is None else bias.materialize(L, L)
    with torch.no_grad():
        want = dense_reference(layer, x, pad, allow, log_count)
        close(layer(x, key_padding_mask=pad), want, tol=1e-10)
        layer.gather = False  # the tiled engine with the mask and bias objects
        close(layer(x, key_padding_mask=pad), want, tol=1e-10)


def test_seeded_plan_is_deterministic_and_per_head():
    a = BigBirdAttention(16, 4, 4, 2, seed=5)
    b = BigBirdAttention(16, 4, 4, 2, seed=5)
    c = BigBirdAttention(16, 4, 4, 2, seed=6)
    lay = lambda m: m.block_counts(64)
    assert torch.equal(lay(a), lay(b))
    assert not torch.equal(lay(a), lay(c))
    assert not all(torch.equal(lay(a)[0], lay(a)[h]) for h in range(1, 4))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 64, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("pattern", ["bigbird", "hf"])
def test_gradcheck_float64(pattern):
    torch.manual_seed(0)
    layer = BigBirdAttention(4, 2, 2, 1, pattern=pattern, backend="chunked").double().eval()
    x = torch.randn(1, 17, 4, dtype=torch.float64, requires_grad=True)
    assert layer.is_sparse(17)
    pad = torch.zeros(1, 17, dtype=torch.bool)
    pad[0, 15:] = True
    assert torch.autograd.gradcheck(lambda t: layer(t, pad), (x,), fast_mode=True)


def test_key_mask_and_block_bias_materialise_what_they_say():
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    m = KeyMask(keep).materialize(5, 5)
    assert m.shape == (2, 1, 5, 5) and torch.equal(m[:, 0, 1], keep)
    table = torch.arange(2 * 3 * 3, dtype=torch.float64).view(2, 3, 3)
    bb = BlockBias(table, 2).materialize(5, 5)
    assert bb.shape == (1, 2, 5, 5) and bb[0, 1, 4, 3] == table[1, 2, 1]
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    got = attnkit.scaled_dot_product_attention(q, k, k, KeyMask(keep), bias=BlockBias(table, 2),
                                               backend="chunked")
    want = attnkit.scaled_dot_product_attention(q, k, k, m, bias=bb, backend="reference")
    close(got, want, tol=1e-10)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="pattern"):
        BigBirdAttention(8, 2, pattern="longformer")
    with pytest.raises(ValueError, match="pattern='hf' has 3 window"):
        BigBirdAttention(8, 2, pattern="hf", num_window_blocks=5)
    with pytest.raises(ValueError, match="odd"):
        BigBirdAttention(8, 2, num_window_blocks=4)
    layer = BigBirdAttention(8, 2, 4, 1)
    with pytest.raises(ValueError, match=r"\(batch, length, 8\)"):
        layer(torch.randn(1, 30, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask must be .*\(1, 30\)"):
        layer(torch.randn(1, 30, 8), key_padding_mask=torch.zeros(1, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match="rand_attn"):
        hf_block_counts(8, torch.zeros(2, 5, 1))


@pytest.mark.parametrize("seed", range(3))
def test_block_sparse_attention_any_counts_equals_reference(seed, monkeypatch):
    """Dense rows, empty rows, duplicated blocks, per-head layouts, padding, a partial
    last block, several chunks: all equal the reference with the materialised pattern."""
    import attnkit.layers.bigbird as bb
    monkeypatch.setattr(bb, "CHUNK_BYTES", 1)  # one query block per chunk
    g = torch.Generator().manual_seed(seed)
    B, H, bs, L, D = 2, 3, 3, 17, 4
    n = -(-L // bs)
    counts = torch.randint(0, 4, (H, n, n), generator=g) * (torch.rand(H, n, n, generator=g) < 0.4)
    counts[:, 0] = 1       # a dense row in every head
    counts[:, 2] = 0       # a row that sees nothing
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(B, L, generator=g) > 0.2
    got = bb.block_sparse_attention(q, k, v, counts, bs, keep)
    allow = masks.block_sparse(counts > 0, bs).materialize(L, L) & keep[:, None, None, :]
    log_count = BlockBias(torch.log(counts.clamp(min=1).double()), bs).materialize(L, L)
    want = attnkit.scaled_dot_product_attention(q, k, v, allow, bias=log_count,
                                                backend="reference")
    close(got, want, tol=1e-10)


def test_hf_adapter_stands_in_for_huggingface_layers_inside_bigbird_model():
    cfg = BigBirdConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                        intermediate_size=64, vocab_size=100, max_position_embeddings=512,
                        block_size=8, num_random_blocks=2, attention_type="block_sparse",
                        initializer_range=0.2)
    model = BigBirdModel(cfg).eval()
    ids = torch.randint(3, 100, (2, 150))  # padded to 152 by the model itself
    am = torch.ones(2, 150, dtype=torch.long)
    am[1, 130:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=am).last_hidden_state
        for layer in model.encoder.layer:
            ours = AttnkitBigBirdBlockSparseAttention.from_hf(layer.attention.self)
            layer.attention.self.forward = ours.forward
        got = model(ids, attention_mask=am).last_hidden_state
    close(got[am.bool()], want[am.bool()])
