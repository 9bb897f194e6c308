"""Mask objects against brute-force definitions written from the contract's words."""

import itertools

import pytest
import torch

from attnkit import masks
from attnkit.masks import EMPTY, FULL, Grid


def brute(rule, L, S):
    off = S - L
    return torch.tensor([[bool(rule(i + off, j)) for j in range(S)] for i in range(L)])


@pytest.mark.parametrize("L,S", [(7, 7), (3, 9), (9, 4), (1, 5)])
def test_causal_is_bottom_right(L, S):
    assert torch.equal(masks.causal().materialize(L, S), brute(lambda p, j: j <= p, L, S))


@pytest.mark.parametrize("left,right", [(0, 0), (2, None), (3, 0), (1, 4)])
def test_sliding_window(left, right):
    r = left if right is None else right
    m = masks.sliding_window(left, right).materialize(11, 11)
    assert torch.equal(m, brute(lambda p, j: p - left <= j <= p + r, 11, 11))


def test_transformers_sliding_window_convention():
    W = 4  # transformers: a token sees itself and the W-1 before it
    m = masks.sliding_window(W - 1, 0).materialize(10)
    assert (m.sum(-1)[W - 1:] == W).all()
    assert torch.equal(m, brute(lambda p, j: 0 <= p - j < W, 10, 10))


def test_dilated_single_and_per_head():
    m = masks.dilated(2, 1, 3).materialize(20)
    want = brute(lambda p, j: (j - p) % 3 == 0 and -6 <= j - p <= 3, 20, 20)
    assert torch.equal(m, want)
    mh = masks.dilated(1, 1, [1, 2, 4]).materialize(16)
    assert mh.shape == (1, 3, 16, 16)
    for h, d in enumerate([1, 2, 4]):
        assert torch.equal(mh[0, h], brute(lambda p, j: (j - p) % d == 0 and abs(j - p) <= d, 16, 16))


def test_global_tokens():
    g = [0, 5]
    m = masks.global_tokens(g).materialize(8)
    assert torch.equal(m, brute(lambda p, j: p in g or j in g, 8, 8))
    lw = (masks.sliding_window(1) | masks.global_tokens([0])).materialize(6)
    assert torch.equal(lw, brute(lambda p, j: abs(p - j) <= 1 or p == 0 or j == 0, 6, 6))


def test_padding_depends_on_batch():
    m = masks.padding([3, 5]).materialize(4, 6)
    assert m.shape == (2, 1, 4, 6)
    assert m[0, 0, :, :3].all() and not m[0, 0, :, 3:].any()
    assert m[1, 0, :, :5].all() and not m[1, 0, :, 5:].any()


def test_document_packed_sequences():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    m = masks.document(ids).materialize(9)
    assert torch.equal(m, brute(lambda p, j: ids[p] == ids[j], 9, 9))
    causal_docs = (masks.document(ids) & masks.causal()).materialize(9)
    assert torch.equal(causal_docs, brute(lambda p, j: ids[p] == ids[j] and j <= p, 9, 9))
    mb = masks.document(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])).materialize(4)
    assert mb.shape == (2, 1, 4, 4) and mb[1, 0, 1, 3] and not mb[0, 0, 1, 3]


def test_block_sparse():
    layout = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    m = masks.block_sparse(layout, 4).materialize(10)
    assert torch.equal(m, brute(lambda p, j: bool(layout[p // 4, j // 4]), 10, 10))


def test_bigbird_pattern_follows_the_contract():
    bs, n = 4, 10  # 10 blocks, the last one partial (38 tokens)
    m = masks.bigbird(bs, num_window_blocks=3, num_global_blocks=2, num_random_blocks=2, seed=7)
    lay = m.layout(38)[0]
    assert lay.shape == (n, n)
    assert lay[0].all() and lay[-1].all() and lay[:, 0].all() and lay[:, -1].all()
    for qb in range(1, n - 1):
        window = {qb - 1, qb, qb + 1}
        seen = set(lay[qb].nonzero().flatten().tolist())
        assert window | {0, n - 1} <= seen
        assert len(seen - window - {0, n - 1}) == 2  # exactly num_random_blocks others
    dense = m.materialize(38)
    assert torch.equal(dense, brute(lambda p, j: bool(lay[p // bs, j // bs]), 38, 38))


def test_bigbird_is_deterministic_per_seed_and_per_head():
    a = masks.bigbird(4, seed=1).layout(64)
    assert torch.equal(a, masks.bigbird(4, seed=1).layout(64))
    assert not torch.equal(a, masks.bigbird(4, seed=2).layout(64))
    h = masks.bigbird(4, seed=1, num_heads=4).layout(64)
    assert h.shape == (4, 16, 16) and not all(torch.equal(h[0], h[i]) for i in range(1, 4))
    # a pattern drawn on any machine: pin one row of seed 0 (CPU generator, fixed algorithm)
    ref = masks.bigbird(4, seed=0).layout(64)[0]
    assert ref.sum(-1)[1:-1].tolist() == [3 + 2 + 3 - (1 if r in (1, 14) else 0)
                                          for r in range(1, 15)]


def test_bigbird_global_blocks_split_first_and_last():
    lay = masks.bigbird(2, num_window_blocks=1, num_global_blocks=3, num_random_blocks=0).layout(20)[0]
    g = lay.all(-1).nonzero().flatten().tolist()
    assert g == [0, 1, 9]


def test_bigbird_fewer_random_when_fewer_remain():
    lay = masks.bigbird(4, num_random_blocks=10).layout(24)[0]  # 6 blocks: all get seen
    assert lay.all()


def test_and_or_compose():
    a, b = masks.causal(), masks.sliding_window(2)
    assert torch.equal((a & b).materialize(8), a.materialize(8) & b.materialize(8))
    assert torch.equal((a | b).materialize(8), a.materialize(8) | b.materialize(8))
    # a bool tensor joins as a dense mask (True = may attend); anything else is refused
    dense = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal((a & dense).materialize(8), a.materialize(8) & dense)
    with pytest.raises(TypeError, match="bool tensor"):
        a & torch.ones(3, 3)


ALL_MASKS = {
    "causal": masks.causal(),
    "window": masks.sliding_window(5, 2),
    "dilated": masks.dilated(3, 3, [1, 2]),
    "global": masks.global_tokens([1, 30]),
    "padding": masks.padding([20, 33]),
    "document": masks.document(torch.repeat_interleave(torch.arange(5), torch.tensor([4, 9, 1, 12, 7]))),
    "block_sparse": masks.block_sparse(torch.rand(6, 6) > 0.5, 6),
    "bigbird": masks.bigbird(4, num_random_blocks=1, seed=3, num_heads=2),
    "window|global": masks.sliding_window(3) | masks.global_tokens([0, 17]),
    "causal&document": masks.causal() & masks.document(torch.arange(33) // 10),
}


@pytest.mark.parametrize("name", ALL_MASKS)
@pytest.mark.parametrize("bq,bk", [(4, 4), (5, 7), (16, 8)])
@pytest.mark.parametrize("L", [33, 20])
def test_block_states_are_sound(name, bq, bk, L):
    """EMPTY blocks hold no allowed entry, FULL blocks only allowed entries."""
    m, S = ALL_MASKS[name], 33
    grid = Grid(L, S)
    dense = m.materialize(L, S)
    dense = dense.view(-1, *dense.shape[-2:]) if dense.dim() == 4 else dense[None]
    qb = list(range(0, L, bq)) + [L]  # blocks of query rows
    kb = list(range(0, S, bk)) + [S]
    t = lambda xs: torch.tensor(xs)
    st = m.block_states(grid, t(qb[:-1]).view(-1, 1), t(qb[1:]).view(-1, 1),
                        t(kb[:-1]).view(1, -1), t(kb[1:]).view(1, -1))
    st = st.reshape(-1, *st.shape[-2:]) if st.dim() == 4 else st[None]
    st = st.expand(dense.shape[0], -1, -1) if st.shape[0] == 1 else st
    for x, (i, j) in itertools.product(range(dense.shape[0]), itertools.product(range(len(qb) - 1), range(len(kb) - 1))):
        block = dense[x if dense.shape[0] > 1 else 0, qb[i]:qb[i + 1], kb[j]:kb[j + 1]]
        s = int(st[x if st.shape[0] > 1 else 0, i, j])
        if s == EMPTY:
            assert not block.any()
        if s == FULL:
            assert block.all()


def test_block_states_are_tight_for_windows():
    grid = Grid(64, 64)
    lo = torch.arange(0, 64, 8)
    st = masks.sliding_window(8, 0).block_states(grid, lo.view(-1, 1), (lo + 8).view(-1, 1),
                                                 lo.view(1, -1), (lo + 8).view(1, -1))
    st = st.reshape(8, 8)
    for i in range(8):  # diagonal partial, one block below partial, everything else empty
        assert st[i, i] == 1 and (i == 0 or st[i, i - 1] == 1)
        assert (st[i, :max(0, i - 1)] == EMPTY).all() and (st[i, i + 1:] == EMPTY).all()


@pytest.mark.parametrize("make,exc", [
    (lambda: masks.sliding_window(2.5), TypeError),
    (lambda: masks.dilated(2, 2, 0), ValueError),
    (lambda: masks.dilated(2, 2, [1.5]), TypeError),
    (lambda: masks.global_tokens([-1]), ValueError),
    (lambda: masks.padding([-2]), ValueError),
    (lambda: masks.padding([[1.0]]), TypeError),
    (lambda: masks.block_sparse(torch.ones(2, 2), 4), TypeError),
    (lambda: masks.block_sparse(torch.ones(2, dtype=torch.bool), 4), ValueError),
    (lambda: masks.bigbird(4, num_window_blocks=2), ValueError),
    (lambda: masks.bigbird(0), ValueError),
    (lambda: masks.document([0.5, 1.0]), TypeError),
])
def test_bad_mask_arguments(make, exc):
    with pytest.raises(exc):
        make()


def test_mask_that_does_not_fit_the_grid_is_refused():
    with pytest.raises(ValueError, match="global token index 9"):
        masks.global_tokens([9]).materialize(5)
    with pytest.raises(ValueError, match="document ids cover 4"):
        masks.document([0, 0, 1, 1]).materialize(6)
    with pytest.raises(ValueError, match="block layout"):
        masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 2).materialize(9)
