"""Bahdanau's additive and Luong's attention against their formulas, one pair at a time
(attnkit.layers.additive's references), against torch (dot = SDPA with scale 1) and the
PyTorch seq2seq tutorial's BahdanauAttention; padding gets weight exactly 0."""

import pytest
import torch

from attnkit.layers import AdditiveAttention, LuongAttention
from attnkit.layers import additive as A


def _data(B=2, L=3, S=5, Dq=6, Dk=4, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Dq, generator=g, dtype=dtype)
    k = torch.randn(B, S, Dk, generator=g, dtype=dtype)
    v = None if Dv is None else torch.randn(B, S, Dv, generator=g, dtype=dtype)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True  # the first source sentence is 2 tokens shorter
    return q, k, v, pad


@pytest.mark.parametrize("Dv", [None, 7])
def test_additive_equals_its_formula(Dv):
    torch.manual_seed(0)
    layer = AdditiveAttention(6, 4, 8).double()
    q, k, v, pad = _data(Dv=Dv)
    ctx, w = layer(q, k, v, key_padding_mask=pad)
    want_ctx, want_w = A.additive_attention_reference(
        q, k, k if v is None else v, layer.query_proj.weight, layer.key_proj.weight,
        layer.key_proj.bias, layer.v, key_padding_mask=pad)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(ctx, want_ctx)
    assert (w[0, :, -2:] == 0).all() and torch.allclose(w.sum(-1), torch.ones(2, 3).double())


def test_additive_equals_the_pytorch_tutorial_layer():
    """The PyTorch seq2seq tutorial's BahdanauAttention: Va(tanh(Wa(query) + Ua(keys)))."""
    torch.manual_seed(0)
    H = 8
    Wa, Ua, Va = (torch.nn.Linear(H, H), torch.nn.Linear(H, H), torch.nn.Linear(H, 1))
    layer = AdditiveAttention(H, H, H)
    with torch.no_grad():
        layer.query_proj.weight.copy_(Wa.weight)
        layer.key_proj.weight.copy_(Ua.weight)
        layer.key_proj.bias.copy_(Ua.bias + Wa.bias)  # the tutorial has two biases
        layer.v.copy_(Va.weight[0])
    query, keys = torch.randn(3, 1, H), torch.randn(3, 7, H)
    scores = Va(torch.tanh(Wa(query) + Ua(keys))).squeeze(2).unsqueeze(1)  # Va's bias: a shift
    weights = torch.softmax(scores, -1)
    ctx, w = layer(query[:, 0], keys)  # a (B, query_dim) query: no L dim
    torch.testing.assert_close(w, weights[:, 0])
    torch.testing.assert_close(ctx, torch.bmm(weights, keys)[:, 0])


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_equals_its_formula(score):
    torch.manual_seed(0)
    Dq, Dk = (6, 6) if score == "dot" else (6, 4)
    layer = LuongAttention(Dq, Dk, score, hidden_dim=5).double()
    q, k, v, pad = _data(Dq=Dq, Dk=Dk, Dv=3)
    ctx, w = layer(q, k, v, key_padding_mask=pad)
    weight = {"dot": None, "general": getattr(layer, "weight", None),
              "concat": getattr(getattr(layer, "proj", None), "weight", None)}[score]
    want_ctx, want_w = A.luong_attention_reference(
        q, k, v, score, weight, getattr(layer, "v", None),
        getattr(getattr(layer, "proj", None), "bias", None), key_padding_mask=pad)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(ctx, want_ctx)
    assert (w[0, :, -2:] == 0).all()


def test_luong_dot_is_unscaled_sdpa():
    q, k, v, pad = _data(Dq=4, Dk=4, Dv=3)
    ctx, w = LuongAttention(4, 4, "dot")(q, k, v, key_padding_mask=pad)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, ~pad[:, None, :], scale=1.0)
    torch.testing.assert_close(ctx, want)


def test_rows_of_only_padding_get_zeros_and_blocks_of_queries_agree():
    torch.manual_seed(0)
    layer = AdditiveAttention(6, 4, 8).double()
    q, k, _, pad = _data(L=A.ADDITIVE_ROWS + 7, S=5)
    pad[1] = True  # sentence 1: nothing to attend to
    ctx, w = layer(q, k, key_padding_mask=pad)
    assert (w[1] == 0).all() and (ctx[1] == 0).all() and torch.isfinite(ctx).all()
    # the blocked scores equal one broadcast over every query
    whole = torch.tanh(layer.query_proj(q)[:, :, None] + layer.key_proj(k)[:, None]) @ layer.v
    torch.testing.assert_close(layer.scores(q, layer.project_keys(k)), whole)


def test_gradients_flow_to_every_parameter():
    for layer, (Dq, Dk) in ((AdditiveAttention(6, 4, 8), (6, 4)),
                            (LuongAttention(6, 4, "general"), (6, 4)),
                            (LuongAttention(6, 4, "concat"), (6, 4))):
        q, k, _, pad = _data(Dq=Dq, Dk=Dk, dtype=torch.float32)
        ctx, _ = layer(q.requires_grad_(), k, key_padding_mask=pad)
        ctx.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_bad_input_is_named():
    layer = AdditiveAttention(6, 4, 8)
    q, k, _, pad = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"query must be \(batch, length, 6\)"):
        layer(q[..., :5], k)
    with pytest.raises(ValueError, match="keys must be"):
        layer(q, k[..., :3])
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        layer(q, k, key_padding_mask=pad[:, :3])
    with pytest.raises(TypeError, match="bool"):
        layer(q, k, key_padding_mask=pad.float())
    with pytest.raises(ValueError, match="values must be"):
        layer(q, k, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        LuongAttention(6, 4, "dot")
    with pytest.raises(ValueError, match="score must be one of"):
        LuongAttention(6, 4, "cosine")
