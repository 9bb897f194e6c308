"""PagedKVCache: a block pool and per-sequence block tables. Attention read through the
table equals the contiguous cache; forks share blocks (copy on write); free returns them;
a batch with a shared system prompt holds its prompt once."""

import pytest
import torch

from attnkit import KVCache, MultiHeadAttention, PagedKVCache, bias, masks
from attnkit.positional import RotaryEmbedding


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def layer_with(positional="rope", heads=4, kv_heads=2):
    torch.manual_seed(0)
    pos = {"none": None, "rope": RotaryEmbedding(8), "alibi": bias.alibi(heads)}[positional]
    return MultiHeadAttention(8 * heads, heads, kv_heads, positional=pos).double().eval()


@pytest.mark.parametrize("positional", ["rope", "alibi"])
@pytest.mark.parametrize("block_size", [4, 7])
def test_ragged_prefill_and_decode_equal_the_contiguous_cache(positional, block_size):
    layer = layer_with(positional)
    torch.manual_seed(1)
    prompts, E = torch.tensor([9, 3, 6]), layer.embed_dim
    x = torch.randn(3, 9, E, dtype=torch.float64)
    steps = torch.randn(3, 6, E, dtype=torch.float64)
    paged = PagedKVCache(64, block_size, 2, 8, dtype=torch.float64)
    dense = KVCache()
    with torch.no_grad():
        a = layer(x, cache=paged, is_causal=True, query_lengths=prompts)[0]
        b = layer(x, cache=dense, is_causal=True, query_lengths=prompts)[0]
        close(a, b)
        for t in range(6):
            close(layer(steps[:, t:t + 1], cache=paged, is_causal=True)[0],
                  layer(steps[:, t:t + 1], cache=dense, is_causal=True)[0])
    assert paged.lengths.tolist() == dense.lengths.tolist() == (prompts + 6).tolist()
    close(paged.keys, dense.keys * (torch.arange(15) < dense.lengths.view(-1, 1)).view(3, 1, 15, 1))


def test_a_chunk_per_sequence_and_gqa_on_the_kernel_path():
    layer = layer_with("rope", heads=8, kv_heads=2)
    torch.manual_seed(2)
    x = torch.randn(2, 21, layer.embed_dim, dtype=torch.float64)
    paged = PagedKVCache(32, 4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, is_causal=True)[0]
        got = torch.cat([layer(x[:, a:b], cache=paged, is_causal=True)[0]
                         for a, b in [(0, 5), (5, 6), (6, 13), (13, 21)]], 1)
    close(got, full)


def test_fork_shares_blocks_and_copies_on_write():
    layer = layer_with("rope")
    torch.manual_seed(3)
    prompt = torch.randn(1, 10, layer.embed_dim, dtype=torch.float64)
    paged = PagedKVCache(16, 4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(prompt, cache=paged, is_causal=True)
        assert paged.blocks_in_use == 3
        paged.fork(paged.seq_ids[0])
        paged.fork(paged.seq_ids[0])
        assert paged.blocks_in_use == 3  # three sequences, one copy of the prompt
        nxt = torch.randn(3, 1, layer.embed_dim, dtype=torch.float64)
        out = layer(nxt, cache=paged, is_causal=True)[0]
        # the last block (2 of 4 slots used) was shared: two writers copied it
        assert paged.blocks_in_use == 5
        for b in range(3):
            alone = layer(torch.cat([prompt, nxt[b:b + 1]], 1), is_causal=True)[0][:, -1]
            close(out[b], alone)
    table = paged.block_table
    assert table[:, :2].unique().numel() == 2  # the two full prompt blocks stay shared


def test_free_returns_blocks_and_the_pool_can_run_out():
    paged = PagedKVCache(4, 2, 1, 4)
    k = torch.randn(1, 1, 5, 4)
    paged.update(k, k)
    assert paged.num_free_blocks == 1
    sid = paged.fork(paged.seq_ids[0])
    paged.free(paged.seq_ids[0])
    assert paged.num_free_blocks == 1 and paged.seq_ids == [sid]
    with pytest.raises(RuntimeError, match="out of blocks"):
        paged.update(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
    paged.free(sid)
    assert paged.num_free_blocks == 4
    with pytest.raises(ValueError, match="no sequence"):
        paged.free(sid)


def test_shared_system_prompt_memory():
    """8 requests that share a 512-token system prompt and add 32 tokens each."""
    block, H, D, n_req = 16, 2, 8, 8
    paged = PagedKVCache(512, block, H, D)
    torch.manual_seed(4)
    sys_prompt = torch.randn(1, H, 512, D)
    paged.update(sys_prompt, sys_prompt)
    root = paged.seq_ids[0]
    for _ in range(n_req - 1):
        paged.fork(root)
    own = torch.randn(n_req, H, 32, D)
    paged.update(own, own)
    dense = KVCache()
    dense.update(sys_prompt.expand(n_req, -1, -1, -1).contiguous(),
                 sys_prompt.expand(n_req, -1, -1, -1).contiguous())
    dense.update(own, own)
    close(paged.keys, dense.keys, 0)
    assert paged.nbytes == (512 // block + n_req * 32 // block) * block * H * D * 2 * 4
    assert dense.nbytes / paged.nbytes == pytest.approx(8 * 544 / (512 + 8 * 32))


def test_crop_frees_blocks_and_reorder_forks():
    paged = PagedKVCache(16, 4, 1, 4)
    k = torch.randn(2, 1, 10, 4)
    paged.update(k, k)
    assert paged.blocks_in_use == 6
    paged.crop(torch.tensor([5, 10]))
    assert paged.blocks_in_use == 5 and paged.lengths.tolist() == [5, 10]
    paged.reorder(torch.tensor([1, 1]))
    assert paged.blocks_in_use == 3 and paged.lengths.tolist() == [10, 10]
    close(paged.keys[0], k[1], 0)
    close(paged.keys[1], k[1], 0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(4, 0, 1, 4)
    paged = PagedKVCache(4, 2, 2, 4)
    with pytest.raises(ValueError, match=r"key \(B, 2, n, 4\)"):
        paged.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        paged.update(torch.randn(1, 2, 3, 4, dtype=torch.float64),
                     torch.randn(1, 2, 3, 4, dtype=torch.float64))
    paged.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        paged.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))


def test_sliding_window_and_alibi_through_the_dense_fallback_equal_the_full_pass():
    layer = layer_with("alibi")
    torch.manual_seed(5)
    x = torch.randn(2, 19, layer.embed_dim, dtype=torch.float64)
    m = masks.sliding_window(4, 0)
    paged = PagedKVCache(32, 4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, attn_mask=m, is_causal=True)[0]
        got = torch.cat([layer(x[:, t:t + 1], cache=paged, attn_mask=m, is_causal=True)[0]
                         for t in range(19)], 1)
    close(got, full)


def test_speculative_rollback_and_beam_reorder_in_the_layer():
    layer = layer_with("rope")
    torch.manual_seed(6)
    x = torch.randn(2, 12, layer.embed_dim, dtype=torch.float64)
    drafts = torch.randn(2, 3, layer.embed_dim, dtype=torch.float64)
    paged = PagedKVCache(32, 4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x[:, :8], cache=paged, is_causal=True)
        layer(drafts, cache=paged, is_causal=True)  # rejected: roll back all three
        paged.crop(8)
        got = torch.cat([layer(x[:, t:t + 1], cache=paged, is_causal=True)[0]
                         for t in range(8, 12)], 1)
        full = layer(x, is_causal=True)[0]
        close(got, full[:, 8:])
        paged.reorder(torch.tensor([1, 1, 0]))
        nxt = torch.randn(3, 1, layer.embed_dim, dtype=torch.float64)
        out = layer(nxt, cache=paged, is_causal=True)[0]
        for row, src in enumerate([1, 1, 0]):
            alone = layer(torch.cat([x[src:src + 1], nxt[row:row + 1]], 1), is_causal=True)[0]
            close(out[row, 0], alone[0, -1])
