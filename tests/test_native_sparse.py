"""NativeSparseAttention against a dense reference written from the paper's equations
(float64, explicit masks, one softmax per branch): outputs, the chosen blocks and
every gradient."""

import pytest
import torch

from attnkit.layers import NativeSparseAttention


def softmax_rows(s, allowed):
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def reference(layer, x):
    """Returns (output, chosen blocks as sets per (b, kv head, query block))."""
    B, L, _ = x.shape
    H, Hkv, D, l, d = (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.block_size,
                       layer.compress_stride)
    g = H // Hkv
    q = layer.q_proj(x).view(B, L, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)
    q, k = layer.rotary.rope(q, k, torch.arange(L))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # per query head
    gate = torch.sigmoid(layer.g_proj(x)).view(B, L, H, 3)
    t = torch.arange(L).view(-1, 1)
    # compression: the mean of each window of l tokens, every d tokens
    C = (L - l) // d + 1 if L >= l else 0
    kc = torch.stack([k[:, :, c * d:c * d + l].mean(2) for c in range(C)], 2)
    vc = torch.stack([v[:, :, c * d:c * d + l].mean(2) for c in range(C)], 2)
    seen_c = torch.arange(C) * d + l - 1 <= t
    p_cmp = softmax_rows(q @ kc.transpose(-1, -2) * layer.scale, seen_c)
    o_cmp = p_cmp @ vc
    # selection: importance of block j = p over the compressed tokens overlapping it,
    # averaged over the block's query rows and the kv head's query heads
    nb = -(-L // l)
    blocks = {}
    for b in range(B):
        for hk in range(Hkv):
            for jq in range(nb):
                rows = range(jq * l, min(L, (jq + 1) * l))
                imp = torch.zeros(nb, dtype=x.dtype)
                for j in range(nb):
                    over = [c for c in range(C) if c * d < (j + 1) * l and c * d + l > j * l]
                    for h in range(hk * g, (hk + 1) * g):
                        imp[j] += p_cmp[b, h, list(rows)][:, over].sum() if over else 0
                forced = list(dict.fromkeys(j for j in (jq, 0, jq - 1) if j >= 0))
                rest = sorted((j for j in range(jq + 1) if j not in forced),
                              key=lambda j: -imp[j])
                blocks[b, hk, jq] = set((forced + rest)[:layer.num_selected_blocks])
    allowed = torch.zeros(B, H, L, L, dtype=torch.bool)
    for (b, hk, jq), chosen in blocks.items():
        for j in chosen:
            allowed[b, hk * g:(hk + 1) * g, jq * l:(jq + 1) * l, j * l:(j + 1) * l] = True
    causal = torch.arange(L) <= t
    o_slc = softmax_rows(q @ k.transpose(-1, -2) * layer.scale, allowed & causal) @ v
    window = causal & (torch.arange(L) > t - layer.window)
    o_swa = softmax_rows(q @ k.transpose(-1, -2) * layer.scale, window) @ v
    gate = gate.permute(3, 0, 2, 1).unsqueeze(-1)
    out = gate[0] * o_cmp + gate[1] * o_slc + gate[2] * o_swa
    return layer.o_proj(out.transpose(1, 2).reshape(B, L, H * D)), blocks


@pytest.mark.parametrize("L,l,d,n,w", [(70, 16, 8, 3, 24), (64, 8, 4, 4, 9), (40, 16, 16, 2, 64)])
def test_outputs_blocks_and_gradients_equal_the_dense_reference(L, l, d, n, w):
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, 4, 2, 8, block_size=l, compress_stride=d,
                                  num_selected_blocks=n, window=w).double()
    x = torch.randn(2, L, 32, dtype=torch.float64, requires_grad=True)
    got, blocks = layer(x, return_indices=True)
    want, chosen = reference(layer, x)
    for (b, hk, jq), expect in chosen.items():
        row = blocks[b, hk, jq]
        assert set(row[row >= 0].tolist()) == expect, (b, hk, jq)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    params = [x] + list(layer.parameters())
    g1 = torch.autograd.grad(got.square().sum(), params)
    g2 = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        NativeSparseAttention(32, 4, 3, 8)
    with pytest.raises(ValueError, match="compress_stride"):
        NativeSparseAttention(32, 4, 2, 8, block_size=16, compress_stride=6)
    with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
        NativeSparseAttention(32, 4, 2, 8)(torch.randn(2, 5, 16))
