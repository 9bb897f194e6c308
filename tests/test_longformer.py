"""LongformerAttention and LongformerMask: HuggingFace parity, a float64 textbook reference,
the mask against its own definition and the reference backend, gradients, errors."""

import math

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.integrations.hf.longformer import AttnkitLongformerSelfAttention, layer_from_hf
from attnkit.layers.longformer import LongformerAttention, LongformerMask, global_slots

from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def hf_layer(E=32, H=4, window=8):
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[window],
                           num_hidden_layers=1, initializer_range=0.2,
                           attention_probs_dropout_prob=0.0)
    hf = LongformerSelfAttention(cfg, 0).eval()
    with torch.no_grad():  # initializer_range=0.2 as the model's _init_weights would do
        for p in hf.parameters():
            p.normal_(0.0, cfg.initializer_range)
    return hf


def hf_mask(pad, glob):
    """The layer-level mask LongformerModel hands its layers: <0 pad, 0 local, >0 global."""
    m = torch.zeros(pad.shape)
    m[glob] = 10000.0
    m[pad] = -10000.0
    return m


def run_hf(hf, x, am):
    with torch.no_grad():
        return hf(x, attention_mask=am, is_index_masked=am < 0, is_index_global_attn=am > 0,
                  is_global_attn=bool((am > 0).any()))[0]


@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("with_globals", [True, False])
def test_equals_huggingface_with_globals_and_padding(window, with_globals):
    hf = hf_layer(window=window)
    ours = layer_from_hf(hf).eval()
    adapter = AttnkitLongformerSelfAttention.from_hf(hf).eval()  # transformers' signature
    B, L = 3, 4 * window
    x = torch.randn(B, L, 32)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, L - 5:] = True
    pad[2, L - window - 1:] = True
    glob = torch.zeros(B, L, dtype=torch.bool)
    if with_globals:  # different global tokens (and counts) per batch element
        glob[0, [0, 5, L // 2 + 1]] = True
        glob[1, 3] = True
        glob[2, [1, 2, 3, 4, window + 1]] = True
    want = run_hf(hf, x, hf_mask(pad, glob))
    with torch.no_grad():
        got = ours(x, key_padding_mask=pad, global_attention_mask=glob)
        got_hf_api = adapter(x, attention_mask=hf_mask(pad, glob))[0]
    keep = ~pad
    close(got[keep], want[keep])
    close(got_hf_api, got, tol=0)
    assert (got[pad] == 0).all() and (want[pad] == 0).all()


def test_equals_huggingface_padded_to_window_when_length_is_not_a_multiple():
    """LongformerModel pads to a multiple of the window; the layer needs no padding."""
    hf = hf_layer(window=8)
    ours = layer_from_hf(hf).eval()
    L, Lp = 21, 24
    x = torch.randn(2, L, 32)
    glob = torch.zeros(2, L, dtype=torch.bool)
    glob[0, [0, 20]] = True
    glob[1, 7] = True
    xp = torch.cat([x, torch.zeros(2, Lp - L, 32)], 1)
    pad_p = torch.zeros(2, Lp, dtype=torch.bool)
    pad_p[:, L:] = True
    glob_p = torch.cat([glob, torch.zeros(2, Lp - L, dtype=torch.bool)], 1)
    want = run_hf(hf, xp, hf_mask(pad_p, glob_p))[:, :L]
    with torch.no_grad():
        got = ours(x, global_attention_mask=glob)
    close(got, want)


def textbook(layer, x, pad, glob, window_allow):
    """Longformer from its definition, dense, float64: local rows see
    (window | global keys) & not padding; global rows see every non-padding key with the
    global projections; padded rows are zero."""
    B, L, E = x.shape
    H, d = layer.num_heads, layer.head_dim
    heads = lambda t: t.view(B, L, H, d).transpose(1, 2)
    q, k, v = heads(layer.query(x)), heads(layer.key(x)), heads(layer.value(x))
    allow = (window_allow | glob[:, None, None, :]) & ~pad[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    local = torch.softmax(s.masked_fill(~allow, -math.inf), -1) @ v
    qg = heads(layer.query_global(x))
    kg, vg = heads(layer.key_global(x)), heads(layer.value_global(x))
    sg = ((qg @ kg.transpose(-1, -2)) / math.sqrt(d)).masked_fill(pad[:, None, None, :], -math.inf)
    glob_rows = torch.softmax(sg, -1) @ vg
    out = torch.where(glob[:, None, :, None], glob_rows, local)
    out = out.transpose(1, 2).reshape(B, L, E)
    return out.masked_fill(pad[..., None], 0.0)


@pytest.mark.parametrize("case", range(6))
def test_equals_float64_textbook_random_shapes_windows_dilations(case):
    g = torch.Generator().manual_seed(case)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    H, d = ri(1, 3), ri(2, 5)
    L, B = ri(5, 40), ri(1, 3)
    window = 2 * ri(1, 6)
    dilation = [None, ri(2, 3), [ri(1, 3) for _ in range(H)]][case % 3]
    layer = LongformerAttention(H * d, H, window, dilation=dilation, backend="chunked")
    layer = layer.double().eval()
    layer.global_path = ["projected", "absorbed", "auto"][case % 3]
    x = torch.randn(B, L, H * d, generator=g, dtype=torch.float64)
    pad = torch.rand(B, L, generator=g) < 0.2
    pad[0] = False
    glob = (torch.rand(B, L, generator=g) < 0.15) & ~pad
    w = window // 2
    wmask = (masks.sliding_window(w) if dilation is None
             else masks.dilated(w, w, dilation)).materialize(L, L)
    with torch.no_grad():
        want = textbook(layer, x, pad, glob, wmask)
        got = layer(x, key_padding_mask=pad, global_attention_mask=glob)
    close(got, want, tol=1e-10)


def mask_definition(window, L, local_keys, slots):
    """LongformerMask by its docstring, with plain loops."""
    B = max(local_keys.shape[0], slots.shape[0])
    G = slots.shape[1]
    w_dense = window.materialize(L, L)
    if w_dense.dim() == 2:
        w_dense = w_dense.view(1, 1, L, L)
    Hm = w_dense.shape[1]
    out = torch.zeros(B, Hm, L, L + G, dtype=torch.bool)
    for b in range(B):
        lk, sl = local_keys[min(b, local_keys.shape[0] - 1)], slots[min(b, slots.shape[0] - 1)]
        for i in range(L):
            for j in range(L):
                out[b, :, i, j] = w_dense[0, :, i, j] & lk[j]
            for gi in range(G):
                out[b, :, i, L + gi] = sl[gi]
    return out


@pytest.mark.parametrize("case", range(5))
def test_mask_materialize_block_states_and_engine_agree(case):
    g = torch.Generator().manual_seed(100 + case)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    L, B, G, H = ri(3, 30), ri(1, 3), ri(0, 4), 2
    w = ri(0, 5)
    window = masks.sliding_window(w) if case % 2 else masks.dilated(w, w, [1, ri(2, 3)])
    local_keys = torch.rand(B, L, generator=g) < 0.8
    slots = torch.rand(B, G, generator=g) < 0.7
    m = LongformerMask(window, L, local_keys, slots if G else None)
    dense = m.materialize(L, L + G)
    want = mask_definition(window, L, local_keys, slots)
    assert torch.equal(dense.expand_as(want), want)
    # block states: EMPTY blocks hold no allowed entry, FULL blocks hold only allowed ones
    from attnkit.masks import EMPTY, FULL, Grid
    grid = Grid(L, L + G)
    bq, bk = ri(1, 7), ri(1, 7)
    qb = list(range(0, L, bq)) + [L]  # blocks of query rows
    kb = list(range(0, L + G, bk)) + [L + G]
    st = m.block_states(grid, torch.tensor(qb[:-1]).view(-1, 1), torch.tensor(qb[1:]).view(-1, 1),
                        torch.tensor(kb[:-1]).view(1, -1), torch.tensor(kb[1:]).view(1, -1))
    st = st.expand(B, dense.shape[1], len(qb) - 1, len(kb) - 1)
    for i in range(len(qb) - 1):
        for j in range(len(kb) - 1):
            blk = dense.expand_as(want)[:, :, qb[i]:qb[i + 1], kb[j]:kb[j + 1]]
            for b in range(B):
                for h in range(blk.shape[1]):
                    s = int(st[b, h, i, j])
                    if s == EMPTY:
                        assert not blk[b, h].any()
                    if s == FULL:
                        assert blk[b, h].all()
    # the engine with the mask object = the reference backend with the materialised mask
    q = torch.randn(B, H, L, 4, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, L + G, 4, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, L + G, 4, generator=g, dtype=torch.float64)
    got = attnkit.scaled_dot_product_attention(q, k, v, m, backend="chunked")
    ref = attnkit.scaled_dot_product_attention(q, k, v, dense, backend="reference")
    close(got, ref, tol=1e-10)


def test_global_slots_order_and_counts():
    glob = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    index, slots = global_slots(glob)
    assert index.shape == (3, 3)
    assert index[0].tolist() == [1, 3, 4] and index[1, 0] == 4
    assert slots.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_gradcheck_float64_chunked_engine():
    torch.manual_seed(1)
    layer = LongformerAttention(6, 2, 4, backend="chunked").double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 7:] = True
    glob = torch.zeros(2, 9, dtype=torch.bool)
    glob[0, 2] = glob[1, [0, 5]] = True
    assert torch.autograd.gradcheck(lambda t: layer(t, pad, glob), (x,), fast_mode=True)
    # parameter gradients equal those through the dense reference backend
    ref = LongformerAttention(6, 2, 4, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    for m in (layer, ref):
        m.zero_grad()
        (m(x, pad, glob) ** 2).sum().backward()
    for (name, a), b in zip(layer.named_parameters(), ref.parameters()):
        close(a.grad, b.grad, tol=1e-10)


def test_dilated_heads_against_reference_backend():
    layer = LongformerAttention(16, 4, 6, dilation=[1, 2, 3, 1], backend="chunked").eval()
    ref = LongformerAttention(16, 4, 6, dilation=[1, 2, 3, 1], backend="reference").eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 37, 16)
    glob = torch.zeros(2, 37, dtype=torch.bool)
    glob[0, [0, 36]] = glob[1, 11] = True
    with torch.no_grad():
        close(layer(x, global_attention_mask=glob), ref(x, global_attention_mask=glob))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="attention_window"):
        LongformerAttention(8, 2, 5)
    with pytest.raises(ValueError, match="dilation"):
        LongformerAttention(8, 2, 4, dilation=[1, 2, 3])
    with pytest.raises(ValueError, match="divisible"):
        LongformerAttention(9, 2, 4)
    layer = LongformerAttention(8, 2, 4)
    with pytest.raises(ValueError, match=r"\(batch, length, 8\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask must be .*\(2, 5\)"):
        layer(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="global_attention_mask"):
        layer(torch.randn(2, 5, 8), global_attention_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="key length"):
        LongformerMask(masks.sliding_window(1), 5).materialize(5, 7)


def test_long_band_many_tiles_equals_reference_backend():
    """Several 128-row tiles and cached window tiles, per-batch globals and padding."""
    torch.manual_seed(3)
    layer = LongformerAttention(16, 2, 64, backend="chunked").double().eval()
    ref = LongformerAttention(16, 2, 64, backend="reference").double().eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 333, 16, dtype=torch.float64)
    pad = torch.zeros(2, 333, dtype=torch.bool)
    pad[1, 290:] = True
    glob = torch.zeros(2, 333, dtype=torch.bool)
    glob[0, [0, 1, 2, 200]] = glob[1, [5, 150, 151, 152, 153, 280]] = True
    with torch.no_grad():
        close(layer(x, pad, glob), ref(x, pad, glob), tol=1e-10)
        close(layer(x, pad), ref(x, pad), tol=1e-10)


def test_hf_adapter_stands_in_for_huggingface_layers_inside_longformer_model():
    from transformers import LongformerModel
    cfg = LongformerConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                           attention_window=[8, 4], intermediate_size=64, vocab_size=100,
                           max_position_embeddings=200, initializer_range=0.2)
    model = LongformerModel(cfg).eval()
    ids = torch.randint(3, 100, (2, 29))  # padded to 32 by the model itself
    am = torch.ones(2, 29, dtype=torch.long)
    am[1, 20:] = 0
    gm = torch.zeros(2, 29, dtype=torch.long)
    gm[0, [0, 7]] = gm[1, 3] = 1
    with torch.no_grad():
        want = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        for layer in model.encoder.layer:
            ours = AttnkitLongformerSelfAttention.from_hf(layer.attention.self)
            layer.attention.self.forward = ours.forward
        got = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    close(got[am.bool()], want[am.bool()])


def test_absorbed_global_projections_equal_projected_ones_with_gradients():
    """Global rows computed over X with W_k folded into the queries and W_v applied after
    equal projecting every token to K_g and V_g; so do the gradients (key_global.bias
    has none: it shifts a row's scores equally, which the softmax ignores)."""
    torch.manual_seed(4)
    a = LongformerAttention(16, 4, 4, backend="chunked").double()
    b = LongformerAttention(16, 4, 4, backend="chunked").double()
    b.load_state_dict(a.state_dict())
    a.global_path, b.global_path = "absorbed", "projected"
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, 17:] = True
    glob = torch.zeros(2, 23, dtype=torch.bool)
    glob[0, [0, 4, 22]] = glob[1, [2, 3]] = True
    outs = [m(x, pad, glob) for m in (a, b)]
    close(outs[0], outs[1], tol=1e-10)
    for o in outs:
        (o.sin().sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name == "key_global.bias":
            assert pa.grad is None and pb.grad.abs().max() < 1e-10
        else:
            close(pa.grad, pb.grad, tol=1e-10)
