"""TransformerXLAttention against a float64 reference written from the paper's equations
(Dai et al. 2019, section 3.3), with and without memory, gradients, and the contract."""

import math

import pytest
import torch

from attnkit.layers.transformer_xl import TransformerXLAttention
from attnkit.positional import TransformerXLPositionTerm, relative_sinusoidal_encoding


def paper_reference(layer, x, mems=None, same_length=False, clamp_len=-1, key_padding_mask=None):
    """A[i, j] = q_i.k_j + q_i.W_r R_(i-j) + u.k_j + v.W_r R_(i-j), term by term, with the
    relative distance of every (i, j) pair encoded directly (no relative shift)."""
    H, d, D = layer.num_heads, layer.head_dim, layer.d_model
    B, L, _ = x.shape
    M = 0 if mems is None else mems.shape[1]
    S = M + L
    h = x if mems is None else torch.cat([mems, x], 1)
    W_q, W_k, W_v = layer.qkv_net.weight.chunk(3, 0)
    q = (x @ W_q.T).view(B, L, H, d)
    k = (h @ W_k.T).view(B, S, H, d)
    v = (h @ W_v.T).view(B, S, H, d)
    u, v_bias = layer.r_w_bias, layer.r_r_bias
    # R_(i-j) for the query at absolute position M + i and key j
    dist = (M + torch.arange(L)).view(L, 1) - torch.arange(S).view(1, S)
    dist = dist.to(x.dtype)
    if clamp_len > 0:
        dist = dist.clamp(max=clamp_len)
    freq = torch.tensor([10000.0 ** (-2 * t / D) for t in range(D // 2)], dtype=x.dtype)
    R = torch.cat([torch.sin(dist[..., None] * freq), torch.cos(dist[..., None] * freq)], -1)
    WR = (R @ layer.r_net.weight.T).view(L, S, H, d)                       # W_{k,R} R_(i-j)
    a = torch.einsum("bihd,bjhd->bhij", q, k)                              # (a)
    b = torch.einsum("bihd,ijhd->bhij", q, WR)                             # (b)
    c = torch.einsum("hd,bjhd->bhj", u, k)[:, :, None, :]                  # (c)
    dd = torch.einsum("hd,ijhd->hij", v_bias, WR)[None]                    # (d)
    A = (a + b + c + dd) / math.sqrt(d)
    i = torch.arange(L).view(L, 1)
    j = torch.arange(S).view(1, S)
    allowed = j <= M + i                                                   # causal with memory
    if same_length and M > 0:
        allowed = allowed & (j > i)                                        # keys p-M+1 .. p
    allowed = allowed.expand(B, 1, L, S)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(B, 1, 1, S)
    A = A.masked_fill(~allowed, float("-inf"))
    P = torch.softmax(A, -1).nan_to_num(0.0)                               # rows seeing nothing: 0
    out = torch.einsum("bhij,bjhd->bihd", P, v).reshape(B, L, H * d)
    return out @ layer.o_net.weight.T


def make_layer(d_model=6, num_heads=2, head_dim=4, dtype=torch.float64):
    layer = TransformerXLAttention(d_model, num_heads, head_dim).to(dtype)
    with torch.no_grad():  # larger weights than the default init: attention far from uniform
        for p in layer.parameters():
            p.normal_(0, 0.7)
    return layer


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


CASES = {
    "no memory": dict(M=0, L=7),
    "memory, klen != qlen": dict(M=3, L=5),
    "memory longer than segment": dict(M=9, L=4),
    "same_length": dict(M=4, L=6, same_length=True),
    "same_length, M > L": dict(M=7, L=3, same_length=True),
    "same_length without memory": dict(M=0, L=5, same_length=True),
    "clamp_len": dict(M=5, L=6, clamp_len=3),
    "padding": dict(M=3, L=5, pad=True),
    "a row that sees nothing": dict(M=0, L=4, pad_first=True),
    "everything": dict(M=6, L=5, same_length=True, clamp_len=4, pad=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_paper_equations_float64(case, kernel):
    cfg = CASES[case]
    layer = make_layer()
    B, M, L = 2, cfg["M"], cfg["L"]
    x = torch.randn(B, L, 6, dtype=torch.float64)
    mems = torch.randn(B, M, 6, dtype=torch.float64) if M else None
    kpm = None
    if cfg.get("pad"):
        kpm = torch.zeros(B, M + L, dtype=torch.bool)
        kpm[0, 0] = True                   # a padded memory slot
        kpm[1, M + L - 2:] = True          # padding at the end of the segment
    if cfg.get("pad_first"):
        kpm = torch.zeros(B, M + L, dtype=torch.bool)
        kpm[0, 0] = True                   # query 0 of batch 0 sees only a padded key
    kw = dict(same_length=cfg.get("same_length", False), clamp_len=cfg.get("clamp_len", -1),
              key_padding_mask=kpm)
    got = layer(x, mems, **kw)
    want = paper_reference(layer, x, mems, **kw)
    assert got.dtype == torch.float64
    close(got, want)
    if cfg.get("pad_first"):
        assert torch.all(got[0, 0] == 0)


def test_long_segments_cross_many_tiles(kernel):
    """Lengths beyond the engine's tiles (128), so the relative shift spans tile edges."""
    layer = make_layer(d_model=8, num_heads=2, head_dim=4)
    x = torch.randn(1, 150, 8, dtype=torch.float64)
    mems = torch.randn(1, 170, 8, dtype=torch.float64)
    for kw in (dict(), dict(same_length=True), dict(clamp_len=100)):
        close(layer(x, mems, **kw), paper_reference(layer, x, mems, **kw), tol=1e-9)


def test_float32_matches_float64_reference():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mems = torch.randn(2, 4, 6, dtype=torch.float64)
    want = paper_reference(layer, x, mems)
    got = layer.float()(x.float(), mems.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_gradients_equal_reference_gradients():
    layer = make_layer()
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    mems = torch.randn(2, 5, 6, dtype=torch.float64)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 2] = True
    g = torch.randn(2, 6, 6, dtype=torch.float64)
    kw = dict(clamp_len=4, key_padding_mask=kpm)
    grads = torch.autograd.grad((layer(x, mems, **kw) * g).sum(), [x, *layer.parameters()])
    want = torch.autograd.grad((paper_reference(layer, x, mems, **kw) * g).sum(),
                               [x, *layer.parameters()])
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_gradcheck_tiny_float64():
    layer = make_layer(d_model=4, num_heads=2, head_dim=2)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    mems = torch.randn(1, 2, 4, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def f(x, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps)), (x, mems),
                                         dict(same_length=True))
        return out

    assert torch.autograd.gradcheck(f, (x, *params))


def test_mems_receive_no_gradient():
    layer = make_layer()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    mems = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x, mems)
    out.sum().backward()
    assert mems.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    close(out, layer(x, mems.detach()))


def test_memory_is_the_previous_segment_seen_again():
    """One layer, memory = the previous segment's input: the second segment's output
    equals the full attention over both segments at its positions (relative positions
    make the encoding translation-free)."""
    layer = make_layer()
    x1 = torch.randn(2, 5, 6, dtype=torch.float64)
    x2 = torch.randn(2, 4, 6, dtype=torch.float64)
    full = layer(torch.cat([x1, x2], 1))
    close(layer(x2, mems=x1), full[:, 5:])
    close(layer(x1), full[:, :5])


def test_same_length_sees_exactly_M_keys():
    """With same_length the query at p = M + i sees keys p-M+1 .. p: changing key j
    changes exactly the queries i with i + 1 <= j <= i + M."""
    layer = make_layer()
    M, L = 4, 5
    x = torch.randn(1, L, 6, dtype=torch.float64)
    mems = torch.randn(1, M, 6, dtype=torch.float64)
    base = layer(x, mems, same_length=True)
    for j in range(M + L):
        h = torch.cat([mems, x], 1)
        h[0, j] += 1.0
        changed = (layer(h[:, M:], h[:, :M], same_length=True) - base).abs().amax(-1)[0]
        sees = torch.tensor([i + 1 <= j <= i + M for i in range(L)])
        assert torch.all(changed[sees] > 1e-6), j
        assert torch.all(changed[~sees] < 1e-12), j


def test_position_term_tiles_equal_dense_relative_shift():
    """The per-tile position term against the paper code's pad-and-reshape relative
    shift of the full (L, S) matrix."""
    B, H, L, M, d = 2, 3, 7, 5, 4
    S = M + L
    query_r = torch.randn(B, H, L, d, dtype=torch.float64)
    key_r = torch.randn(H, S, d, dtype=torch.float64)
    raw = torch.einsum("bhid,hmd->bhim", query_r, key_r)          # (B, H, L, S)
    zero_pad = raw.new_zeros(B, H, L, 1)
    shifted = torch.cat([zero_pad, raw], -1).view(B, H, S + 1, L)[:, :, 1:].view_as(raw)
    term = TransformerXLPositionTerm(query_r, key_r)
    dense = term.materialize(L, S)
    allowed = torch.arange(S).view(1, S) <= M + torch.arange(L).view(L, 1)
    close(dense[..., allowed], shifted[..., allowed])
    for q0, q1, k0, k1 in ((M, M + 3, 0, 4), (M + 2, S, 3, S), (M + 6, S, 0, S)):
        t = term.tile(term_grid(L, S), q0 - M, q1 - M, k0, k1)  # query rows
        ok = allowed[q0 - M:q1 - M, k0:k1]
        close(t[..., ok], dense[:, :, q0 - M:q1 - M, k0:k1][..., ok])


def term_grid(L, S):
    from attnkit.masks import Grid
    return Grid(L, S)


def test_relative_encoding_rows_and_clamp():
    R = relative_sinusoidal_encoding(6, 8, dtype=torch.float64)
    for m in range(6):
        dist = 6 - 1 - m
        want = [math.sin(dist * 10000 ** (-2 * t / 8)) for t in range(4)] + \
               [math.cos(dist * 10000 ** (-2 * t / 8)) for t in range(4)]
        close(R[m], torch.tensor(want, dtype=torch.float64))
    Rc = relative_sinusoidal_encoding(6, 8, clamp_len=2, dtype=torch.float64)
    close(Rc[:4], R[3].expand(4, 8))      # distances 5, 4, 3, 2 -> 2
    close(Rc[4:], R[4:])


def test_parameters_named_as_the_paper_code():
    layer = TransformerXLAttention(10, 3, 4)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"qkv_net.weight": (36, 10), "r_net.weight": (12, 10),
                      "o_net.weight": (10, 12), "r_w_bias": (3, 4), "r_r_bias": (3, 4)}
    assert all(m.bias is None for m in (layer.qkv_net, layer.r_net, layer.o_net))


def test_bad_input_names_argument_and_shapes():
    layer = TransformerXLAttention(6, 2, 4)
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"x must be .*\(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"mems must be .*\(3, 4, 6\)"):
        layer(x, torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask must be .*\(2, 8\).*\(2, 5\)"):
        layer(x, torch.randn(2, 3, 6), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        layer(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="float64"):
        layer(x.double())
    with pytest.raises(TypeError, match="clamp_len"):
        layer(x, clamp_len=2.5)
    with pytest.raises(ValueError, match="d_model must be even"):
        TransformerXLAttention(7, 2, 4)
    with pytest.raises(ValueError, match="num_heads"):
        TransformerXLAttention(6, 0, 4)
