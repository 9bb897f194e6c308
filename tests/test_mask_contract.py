"""The mask and bias protocol, checked for every subclass the library defines.

Subclasses are found through ``__subclasses__()`` (so a new one fails here until it is
given examples below), and each example is checked for what the engine relies on
(see :class:`attnkit.masks.Mask`):

* ``tile`` and ``at`` equal the corresponding entries of ``materialize``;
* ``block_states`` are sound: FULL only where every entry is allowed, EMPTY only where none;
* ``translation_invariant``: a tile moved along the diagonal, also past the grid (the
  engine's master tile starts at negative keys), is the same tile;
* ``tile_signature``: blocks that share a signature are equal;
* ``residue_classes``: a query at position p sees only keys k = p (mod d), and each
  class is its inner mask on the class's own positions.
"""

import itertools

import pytest
import torch

import attnkit.integrations.hf.mask_interface as hf_masks
import attnkit.layers.bigbird as bigbird_layer
import attnkit.layers.longformer as longformer_layer
from attnkit import bias as B, masks as M
from attnkit.masks import EMPTY, FULL, Grid, Mask
from attnkit.positional import t5 as t5_mod
from attnkit.positional.relative import TransformerXLPositionTerm


def _all_subclasses(cls):
    out = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _all_subclasses(sub)
    return out


L, S = 13, 17


def _hf_fn(b, h, q, k):
    return (k <= q) & ((q - k) < 5)


MASK_EXAMPLES = {
    M.CausalMask: lambda: [M.causal()],
    M.SlidingWindowMask: lambda: [M.sliding_window(3, 1), M.sliding_window(-2, 5),
                                  M.sliding_window(2, -4)],
    M.DilatedMask: lambda: [M.dilated(2, 2, 3), M.dilated(3, 0, [1, 2, 2, 3])],
    M.ChunkedMask: lambda: [M.chunked(4), M.chunked(7), M.chunked(1), M.chunked(3)],
    M.GlobalTokensMask: lambda: [M.global_tokens([0, 5])],
    M.PaddingMask: lambda: [M.padding([17, 9, 0]), M.padding([17, 9, 13], [5, 9, 13])],
    M.KeyPaddingMask: lambda: [M.key_padding(torch.rand(2, S) < 0.3)],
    M.DocumentMask: lambda: [M.document(torch.tensor([0] * 5 + [1] * 4 + [2] * 8)),
                             M.packed([0, 4, 4, 13], [0, 6, 9, 17])],
    M.BlockSparseMask: lambda: [M.block_sparse(torch.rand(5, 5) < 0.5, 4)],
    M.BigBirdMask: lambda: [M.bigbird(3, num_heads=2)],
    M.TensorMask: lambda: [M.TensorMask(torch.rand(2, 1, L, S) < 0.6)],
    M.CompressedCausalMask: lambda: [M.compressed_causal(4, 2), M.compressed_causal(3, 3, 5)],
    M.SelectedMask: lambda: [M.selected(torch.randint(-1, S, (2, 3, L, 5))),
                             M.selected(torch.randint(-1, 5, (1, 2, 4, 2)), block_size=4),
                             M.selected(torch.arange(S).expand(1, 1, L, S))],
    M.AndMask: lambda: [M.causal() & M.padding([17, 8, 12]),
                        M.packed([0, 4, 13], [0, 6, 17]) & M.padding([17, 3])],
    M.OrMask: lambda: [M.sliding_window(1, 1) | M.global_tokens([3])],
    longformer_layer.LongformerMask: lambda: [longformer_layer.LongformerMask(
        M.sliding_window(2), 13, torch.rand(2, 13) < 0.8, torch.tensor([[True, True, False, True]]))],
    hf_masks.Shifted: lambda: [hf_masks.Shifted(M.sliding_window(2, 0), 3)],
    hf_masks.HFMaskFunction: lambda: [hf_masks.HFMaskFunction(_hf_fn, 2, 4, 0)],
}
# abstract bases: never instantiated themselves
ABSTRACT = {M.Mask, M.base.Combined}


def _examples():
    return [pytest.param(m, id=f"{cls.__name__}-{i}")
            for cls, make in MASK_EXAMPLES.items() for i, m in enumerate(make())]


def test_every_mask_subclass_has_examples():
    missing = {c.__name__ for c in _all_subclasses(Mask) - ABSTRACT - set(MASK_EXAMPLES)}
    assert not missing, f"add examples for {sorted(missing)} to MASK_EXAMPLES"


def _grid(m, q_len=L, k_len=S):
    positions = m.query_positions(q_len, k_len)
    return Grid(q_len, k_len, query_positions=positions)


def _dense(m, q_len=L, k_len=S):
    d = m.materialize(q_len, k_len)
    return d.view(1, 1, q_len, k_len) if d.dim() == 2 else d


@pytest.mark.parametrize("m", _examples())
def test_tile_and_at_equal_materialize(m):
    dense, grid = _dense(m), _grid(m)
    for r0, r1, k0, k1 in [(0, L, 0, S), (2, 7, 3, 11), (5, 6, 0, S), (0, L, 16, 17)]:
        t = m.tile(grid, r0, r1, k0, k1)
        want = dense[..., r0:r1, k0:k1]
        assert torch.equal(t.expand(*want.shape[:2], *t.shape[2:]).expand_as(want), want)
    b = torch.arange(dense.shape[0]).view(-1, 1, 1, 1)
    h = torch.arange(dense.shape[1]).view(1, -1, 1, 1)
    i = torch.tensor([0, 4, 12]).view(1, 1, -1, 1)
    k = torch.tensor([1, 5, 9, 16]).view(1, 1, 1, -1)
    got = m.at(grid, b, h, i, k)
    want = dense[:, :, [0, 4, 12]][..., [1, 5, 9, 16]]
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("m", _examples())
@pytest.mark.parametrize("bq,bk", [(4, 4), (3, 5), (8, 16)])
def test_block_states_are_sound(m, bq, bk):
    dense, grid = _dense(m), _grid(m)
    qb, kb = list(range(0, L, bq)) + [L], list(range(0, S, bk)) + [S]
    t = lambda xs: torch.tensor(xs)
    st = m.block_states(grid, t(qb[:-1]).view(-1, 1), t(qb[1:]).view(-1, 1),
                        t(kb[:-1]).view(1, -1), t(kb[1:]).view(1, -1))
    st = st.view(*(1,) * (4 - st.dim()), *st.shape)
    n_b, n_h = max(st.shape[0], dense.shape[0]), max(st.shape[1], dense.shape[1])
    st = st.expand(n_b, n_h, -1, -1)
    dense = dense.expand(n_b, n_h, -1, -1)
    for x, y in itertools.product(range(n_b), range(n_h)):
        for i, j in itertools.product(range(len(qb) - 1), range(len(kb) - 1)):
            block = dense[x, y, qb[i]:qb[i + 1], kb[j]:kb[j + 1]]
            s = int(st[x, y, i, j])
            assert s != EMPTY or not block.any(), (x, y, i, j)
            assert s != FULL or block.all(), (x, y, i, j)


@pytest.mark.parametrize("m", _examples())
def test_translation_invariance_holds_where_claimed(m):
    if not m.translation_invariant:
        return
    grid = Grid(L, S)  # the engine reuses tiles only on affine grids
    base = m.tile(grid, 0, 4, 0, 6)
    for d in (-6, -2, 3, 9, 20):  # along the diagonal, inside and past the grid
        assert torch.equal(m.tile(grid, d, d + 4, d, d + 6), base), d


@pytest.mark.parametrize("m", _examples())
def test_equal_signatures_mean_equal_tiles(m):
    grid = _grid(m)
    seen = {}
    for r0, k0 in itertools.product(range(0, L - 3, 3), range(0, S - 3, 2)):
        sig = m.tile_signature(grid, r0, r0 + 3, k0, k0 + 3)
        if sig is None:
            continue
        t = m.tile(grid, r0, r0 + 3, k0, k0 + 3)
        if sig in seen:
            assert torch.equal(seen[sig].expand_as(t), t.expand_as(seen[sig])), sig
        else:
            seen[sig] = t


@pytest.mark.parametrize("m", _examples())
def test_residue_classes_split_the_mask_exactly(m):
    classes = m.residue_classes()
    if classes is None:
        return
    dense = _dense(m)
    p = torch.arange(L).view(-1, 1) + (S - L)
    k = torch.arange(S).view(1, -1)
    for heads, d, inner in classes:
        hs = list(range(dense.shape[1])) if heads is None else heads
        part = dense[:, hs] if dense.shape[1] > 1 else dense
        assert not (part & ((p - k) % d != 0)).any()  # only keys k = p (mod d)
        for r in range(d):
            rows = [i for i in range(L) if (i + S - L) % d == r]
            keys = list(range(r, S, d))
            if not rows or not keys:
                continue
            want = part[..., rows, :][..., keys]
            got = inner.materialize(len(rows), len(keys))
            assert torch.equal(got.expand_as(want), want), (heads, d, r)


# ------------------------------------------------------------------ biases

BIAS_EXAMPLES = {
    B.ALiBi: lambda: [B.alibi(3), B.alibi(2, torch.rand(2, 2))],
    B.TensorBias: lambda: [B.TensorBias(torch.randn(2, 1, L, S))],
    B.SumBias: lambda: [B.alibi(2) + B.TensorBias(torch.randn(1, 2, L, S))],
    t5_mod.T5Bias: lambda: [t5_mod.T5Bias(t5_mod.T5RelativeBias(4, num_buckets=8, max_distance=20),
                                           L, S, None)],
    TransformerXLPositionTerm: lambda: [TransformerXLPositionTerm(torch.randn(2, 2, L, 4).double(),
                                                                  torch.randn(2, S, 4).double())],
    bigbird_layer.BlockBias: lambda: [bigbird_layer.BlockBias(torch.randn(2, 5, 6), 4)],
}


#: where a bias's values are defined: Transformer-XL's term holds a finite placeholder for
#: keys after the query (its layer masks them), which tile and at need not agree on
DEFINED = {TransformerXLPositionTerm: lambda p, k: k <= p}


def test_every_bias_subclass_has_examples():
    missing = {c.__name__ for c in _all_subclasses(B.Bias) - set(BIAS_EXAMPLES)}
    assert not missing, f"add examples for {sorted(missing)} to BIAS_EXAMPLES"


def _bias_examples():
    return [pytest.param(b, id=f"{cls.__name__}-{i}")
            for cls, make in BIAS_EXAMPLES.items() for i, b in enumerate(make())]


@pytest.mark.parametrize("b", _bias_examples())
def test_bias_tile_and_at_agree(b):
    grid = Grid(L, S, dtype=torch.float64)
    dense = b.tile(grid, 0, L, 0, S)
    dense = dense.expand(*dense.shape[:2], L, S).double()
    defined = DEFINED.get(type(b), lambda p, k: (p + k) == (p + k))
    ok = defined(torch.arange(L).view(-1, 1) + (S - L), torch.arange(S).view(1, -1))

    def close(got, want, where):
        got = got.double().expand_as(want)
        torch.testing.assert_close(got.masked_fill(~where, 0), want.masked_fill(~where, 0))

    close(b.tile(grid, 3, 9, 2, 15), dense[..., 3:9, 2:15], ok[3:9, 2:15])
    rows, keys = [0, 7, 12], [0, 4, 16]
    bb = torch.arange(dense.shape[0]).view(-1, 1, 1, 1)
    hh = torch.arange(dense.shape[1]).view(1, -1, 1, 1)
    i = torch.tensor(rows).view(1, 1, -1, 1)
    k = torch.tensor(keys).view(1, 1, 1, -1)
    close(b.at(grid, bb, hh, i, k, *b.params), dense[:, :, rows][..., keys], ok[rows][:, keys])


@pytest.mark.parametrize("b", _bias_examples())
def test_bias_translation_invariance_holds_where_claimed(b):
    if not b.translation_invariant:
        return
    grid = Grid(L, S, dtype=torch.float64)
    base = b.tile(grid, 0, 4, 0, 6)
    for d in (-6, -2, 3, 9, 20):
        torch.testing.assert_close(b.tile(grid, d, d + 4, d, d + 6), base)
