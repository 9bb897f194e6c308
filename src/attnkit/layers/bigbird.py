"""BigBird's block-sparse self-attention (Zaheer et al., 2020).

The sequence is cut into blocks of ``block_size`` tokens. A query block sees a few key
blocks only: its neighbours (the *window*), the *global* blocks (which also see
everything) and a few *random* blocks. Two layouts are available:

* ``pattern="bigbird"`` (default): attnkit's :func:`attnkit.masks.bigbird` — centred
  window of ``num_window_blocks``, ``num_global_blocks`` global blocks, and
  ``num_random_blocks`` further blocks per query block, drawn per head from a generator
  seeded with ``seed`` (the same plan on any machine).
* ``pattern="hf"``: exactly what HuggingFace's ``BigBirdBlockSparseAttention`` computes
  (:func:`hf_block_counts`). Its rows differ from the generic pattern: query blocks 0 and
  n-1 see everything; block 1 sees key blocks 0, 1, 2 and n-1; block n-2 sees 0, n-3, n-2,
  n-1; middle block i sees 0, i-1, i, i+1, n-1; rows 1..n-2 also see their random blocks.
  HuggingFace concatenates the key blocks of each row and takes one softmax over them, so
  a key block listed twice counts twice. That matters: **in eval mode transformers draws no
  random blocks at all, it uses block 0 for every random slot** (``rand_attn`` is all
  zeros), so block 0 enters rows 1..n-2 ``1 + num_random_blocks`` times. A key listed c
  times contributes ``c * exp(s)``, i.e. ``exp(s + log c)``: the layout here is a block
  mask (count > 0) plus a block bias ``log(count)``, which reproduces HuggingFace to float
  tolerance. In training mode the random plan is transformers' own numpy algorithm
  (:func:`hf_random_plan`), seeded with the layer's ``seed`` as transformers does. Both
  live in :mod:`attnkit.layers.bigbird_plan`.

Both patterns fall back to full attention when the sequence is too short for the blocks
to be sparse, with BigBird's rule: ``L <= (num_window_blocks + num_global_blocks +
2 * num_random_blocks) * block_size`` (HuggingFace: ``(5 + 2 r) * block_size``). A last
partial block counts as a block (the same as HuggingFace padding the sequence to a
multiple of the block size and masking the padding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bias import Bias
from ..checks import positive_int
from ..functional import scaled_dot_product_attention
from ..masks import BlockSparseMask, KeyPaddingMask, Mask, bigbird
from .bigbird_plan import hf_block_counts, hf_rand_attn_plan, hf_random_plan
from .common import bool_mask, check_dropout, check_heads, check_hidden

__all__ = ["BigBirdAttention", "BlockBias", "hf_block_counts", "hf_random_plan",
           "hf_rand_attn_plan"]


class BlockBias(Bias):
    """A bias constant on blocks: ``table[h, p // block_size, k // block_size]`` added to
    the score of query position p and key k. ``table`` is (H|1, nq_blocks, nk_blocks)."""

    def __init__(self, table: Tensor, block_size: int):
        if not isinstance(table, Tensor) or not table.is_floating_point() or table.dim() != 3:
            raise TypeError("table must be a float tensor (H|1, nq_blocks, nk_blocks)")
        self.table = table
        self.block_size = int(block_size)
        self.num_heads = table.shape[0] if table.shape[0] > 1 else None

    @property
    def dtype(self):
        return self.table.dtype

    def tile(self, grid, r0, r1, k0, k1, params=None):
        if not grid.affine:
            return super().tile(grid, r0, r1, k0, k1, params)
        bs = self.block_size
        rows = torch.arange(r0, r1, device=grid.device).add_(grid.q_offset) // bs
        cols = torch.arange(k0, k1, device=grid.device) // bs
        t = self.table.to(grid.device, grid.dtype)
        return t[:, rows][:, :, cols].unsqueeze(0)

    def score_mod(self, grid, b, h, q, k):
        t = self.table.to(grid.device, grid.dtype)
        hh = h if t.shape[0] > 1 else torch.zeros_like(h)
        return t[hh, q // self.block_size, k // self.block_size]

    def __repr__(self):
        return f"BlockBias(<table {tuple(self.table.shape)}>, {self.block_size})"


# ------------------------------------------------------------------ gathered blocks

#: bytes of gathered keys + values per chunk of query blocks (kept small: the page faults
#: of a fresh allocation of several MiB can cost more than the copy itself)
CHUNK_BYTES = 8 << 20


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, counts: Tensor,
                           block_size: int, key_keep: Tensor | None = None,
                           dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Block-sparse attention by gathering each query block's key blocks, as BigBird does.

    ``counts`` (H|1, n, n) long: how many times key block c enters query block r's
    softmax (0: not seen; c > 1 adds ``log c`` to those scores, a key listed c times).
    query/key/value (B, H, L, D) with n = ceil(L / block_size) (a last partial block is
    padded with keys nobody sees); ``key_keep`` (B, L) bool, False = padding.

    * query blocks that see every key block once in every head (BigBird's global rows)
      run as one dense call over all keys;
    * every other query block gathers its m listed key blocks (m = the most any row
      lists) into a contiguous (bs, m * bs) problem, and all of them run as batched calls
      of :func:`attnkit.scaled_dot_product_attention` (chunks of ``CHUNK_BYTES``), with
      a (…, 1, m * bs) mask for empty slots and padding and a log-count bias: cost
      ``L * m * block_size`` score entries, never an L x L tensor.

    Equals ``scaled_dot_product_attention(q, k, v, block_sparse(counts > 0) & keep,
    bias=log(counts))``; differentiable.
    """
    B, H, L, D = query.shape
    Dv = value.shape[-1]
    bs = int(block_size)
    n = -(-L // bs)
    Lp = n * bs
    if Lp != L:  # pad to whole blocks; the padded keys are never seen
        grow = lambda t: nn.functional.pad(t, (0, 0, 0, Lp - L))
        query, key, value = grow(query), grow(key), grow(value)
        if key_keep is None:
            key_keep = torch.ones(B, L, dtype=torch.bool, device=query.device)
        key_keep = nn.functional.pad(key_keep, (0, Lp - L), value=False)
    if key_keep is not None and bool(key_keep.all()):
        key_keep = None
    counts = counts.to(query.device)
    pieces, order = [], []  # output blocks (B, H, r, bs, Dv) and the query blocks they are

    dense = (counts == 1).all(-1).all(0)  # (n,): sees every key block once, in every head
    if bool(dense.any()):
        blocks = dense.nonzero().view(-1)
        tok = (blocks.view(-1, 1) * bs + torch.arange(bs, device=query.device)).view(-1)
        keep = None if key_keep is None else key_keep.view(B, 1, 1, Lp)
        o = scaled_dot_product_attention(query[:, :, tok], key, value, keep,
                                         dropout_p=dropout_p, backend=backend)
        pieces.append(o.view(B, H, -1, bs, Dv))
        order.append(blocks)
    rows = (~dense).nonzero().view(-1)
    if rows.numel():
        _gathered_rows(query, key, value, counts, rows, bs, key_keep, dropout_p, backend,
                       pieces, order)
    out = torch.cat(pieces, 2).index_select(2, torch.argsort(torch.cat(order)))
    return out.reshape(B, H, Lp, Dv)[:, :, :L]


def _gathered_rows(query, key, value, counts, rows, bs, key_keep, dropout_p, backend,
                   pieces, order):
    """Query blocks ``rows``: gather their listed key blocks, attend in chunks, and append
    the output blocks (B, H, r, bs, Dv) to ``pieces`` and their indices to ``order``."""
    B, H, Lp, D = query.shape
    Dv, n = value.shape[-1], Lp // bs
    c = counts[:, rows].expand(H, -1, -1)                      # (H, r, n)
    m = int((c > 0).sum(-1).max())
    if m == 0:  # rows that see nothing output zeros
        pieces.append(query.new_zeros(B, H, rows.numel(), bs, Dv))
        order.append(rows)
        return
    listed = torch.argsort((c == 0).to(torch.int8), dim=-1, stable=True)[..., :m]  # (H, r, m)
    listed_counts = c.gather(-1, listed)                       # 0: an empty slot
    flat = listed + n * torch.arange(H, device=query.device).view(H, 1, 1)
    k_blocks = key.contiguous().view(B, H * n, bs * D)
    v_blocks = value.contiguous().view(B, H * n, bs * Dv)
    q_blocks = query.contiguous().view(B, H, n, bs, D)
    per_row = B * H * m * bs * (D + Dv) * query.element_size()
    step = max(1, CHUNK_BYTES // per_row)
    for j0 in range(0, rows.numel(), step):
        j1 = min(rows.numel(), j0 + step)
        r = j1 - j0
        at = flat[:, j0:j1].reshape(-1)
        kc = k_blocks.index_select(1, at).view(B, H * r, m * bs, D)
        vc = v_blocks.index_select(1, at).view(B, H * r, m * bs, Dv)
        qc = q_blocks[:, :, rows[j0:j1]].reshape(B, H * r, bs, D)
        cnt = listed_counts[:, j0:j1].reshape(1, H * r, 1, m).repeat_interleave(bs, -1)
        keep = cnt > 0
        if key_keep is not None:
            seen = key_keep.view(B, n, bs)[:, listed[:, j0:j1]]  # (B, H, r, m, bs)
            keep = keep & seen.reshape(B, H * r, 1, m * bs)
        bias = None
        if bool((cnt > 1).any()):
            bias = torch.log(cnt.clamp(min=1).to(torch.float64)).to(query.dtype)
        oc = scaled_dot_product_attention(qc, kc, vc, None if bool(keep.all()) else keep,
                                          dropout_p=dropout_p, bias=bias, backend=backend)
        pieces.append(oc.view(B, H, r, bs, Dv))
        order.append(rows[j0:j1])


class BigBirdAttention(nn.Module):
    """BigBird block-sparse self-attention with HuggingFace's parameter names.

    Args:
        embed_dim: model width E = num_heads * head_dim.
        num_heads: H.
        block_size: tokens per block.
        num_random_blocks: random key blocks per query block (r).
        num_window_blocks, num_global_blocks: the generic pattern's window (odd) and
            global block counts (``pattern="hf"`` is fixed at 3 and 2, as transformers).
        seed: the random plan's seed (generic: per-head draw of ``masks.bigbird``; hf:
            the numpy seed transformers uses in training, its layer index).
        pattern: "bigbird" or "hf" (see the module docstring).
        bias: biases on the projections. dropout: on the weights, in training mode.
        max_seqlen: transformers' ``max_position_embeddings`` (hf training plans only).
        backend: passed to :func:`attnkit.scaled_dot_product_attention`.

    ``query``, ``key``, ``value`` are ``nn.Linear(E, E)`` as in transformers, so a
    ``BigBirdBlockSparseAttention`` ``state_dict`` loads as is. ``forward`` returns the
    concatenated heads (B, L, E) before the output projection, like transformers' module.
    """

    def __init__(self, embed_dim: int, num_heads: int, block_size: int = 64,
                 num_random_blocks: int = 3, *, num_window_blocks: int = 3,
                 num_global_blocks: int = 2, seed: int | None = 0, pattern: str = "bigbird",
                 bias: bool = True, dropout: float = 0.0, max_seqlen: int = 4096,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, x in (("embed_dim", embed_dim), ("num_heads", num_heads),
                        ("block_size", block_size)):
            positive_int(name, x)
        head_dim = check_heads(embed_dim, num_heads)
        if pattern not in ("bigbird", "hf"):
            raise ValueError(f"pattern must be 'bigbird' or 'hf', got {pattern!r}")
        if pattern == "hf" and (num_window_blocks, num_global_blocks) != (3, 2):
            raise ValueError(f"pattern='hf' has 3 window and 2 global blocks, got "
                             f"num_window_blocks={num_window_blocks}, "
                             f"num_global_blocks={num_global_blocks}")
        if pattern == "bigbird" and seed is None:
            raise ValueError("pattern='bigbird' needs an int seed")
        dropout = check_dropout(dropout)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.block_size, self.num_random_blocks = block_size, num_random_blocks
        self.num_window_blocks, self.num_global_blocks = num_window_blocks, num_global_blocks
        self.seed, self.pattern, self.max_seqlen = seed, pattern, max_seqlen
        self.dropout, self.backend = float(dropout), backend
        if pattern == "bigbird":  # validates the counts and caches layouts per length
            self._bigbird = bigbird(block_size, num_window_blocks, num_global_blocks,
                                    num_random_blocks, seed, num_heads)
        self._hf_layouts: dict = {}
        #: True: gather each query block's key blocks (:func:`block_sparse_attention`);
        #: False: hand the block mask to the tiled engine, which plans one set of key
        #: blocks per 128-row tile for all heads (the union of per-head random blocks is
        #: denser than any one head's)
        self.gather = True
        E = embed_dim
        f = dict(bias=bias, device=device, dtype=dtype)
        self.query = nn.Linear(E, E, **f)
        self.key = nn.Linear(E, E, **f)
        self.value = nn.Linear(E, E, **f)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"block_size={self.block_size}, num_random_blocks={self.num_random_blocks}, "
                f"pattern={self.pattern!r}, seed={self.seed}")

    def is_sparse(self, seq_len: int) -> bool:
        """False when BigBird falls back to full attention for this length."""
        blocks = self.num_window_blocks + self.num_global_blocks + 2 * self.num_random_blocks
        return seq_len > blocks * self.block_size

    def block_counts(self, seq_len: int) -> Tensor | None:
        """(H|1, n, n) long: how many times key block c enters query block r's softmax
        (n = ceil(seq_len / block_size); None when the layer falls back to full attention).
        The generic pattern lists every block once; HF's may list block 0 several times."""
        if not self.is_sparse(seq_len):
            return None
        if self.pattern == "bigbird":
            return self._bigbird.layout(seq_len).long()
        n = -(-seq_len // self.block_size)
        key = (n, self.training)
        if key not in self._hf_layouts or (self.training and self.seed is None):
            plan = hf_random_plan(n * self.block_size, self.block_size, self.num_random_blocks,
                                  self.num_heads, training=self.training, seed=self.seed,
                                  max_seqlen=self.max_seqlen)
            counts = hf_block_counts(n, plan)
            if bool((counts == counts[:1]).all()):  # eval: the same layout in every head
                counts = counts[:1]
            self._hf_layouts[key] = counts
        return self._hf_layouts[key]

    def pattern_for(self, seq_len: int) -> tuple[Mask | None, Bias | None]:
        """The pattern at this length as attnkit objects: a block mask (count > 0) and a
        ``log(count)`` block bias where a block counts more than once (else None);
        ``(None, None)`` when the layer falls back to full attention."""
        counts = self.block_counts(seq_len)
        if counts is None:
            return None, None
        mask = BlockSparseMask(counts[0] > 0 if counts.shape[0] == 1 else counts > 0,
                               self.block_size)
        bias = None
        if bool((counts > 1).any()):
            bias = BlockBias(torch.log(counts.clamp(min=1).to(torch.float64)), self.block_size)
        return mask, bias

    def forward(self, hidden_states: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``hidden_states`` (B, L, E) -> (B, L, E); ``key_padding_mask`` (B, L), True marks
        padding (those rows output zeros)."""
        x = hidden_states
        B, L, E = check_hidden(x, self.embed_dim)
        pad = bool_mask("key_padding_mask", key_padding_mask, B, L)
        if pad is not None and not pad.any():
            pad = None
        heads = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        p = self.dropout if self.training else 0.0
        counts = self.block_counts(L)
        if counts is not None and self.gather:
            out = block_sparse_attention(q, k, v, counts, self.block_size,
                                         None if pad is None else ~pad, p, self.backend)
        else:  # full attention (short sequences), or the tiled engine with mask objects
            mask, bias = self.pattern_for(L)
            if pad is not None:
                mask = KeyPaddingMask(~pad) if mask is None else mask & KeyPaddingMask(~pad)
            if bias is not None:
                bias = BlockBias(bias.table.to(device=x.device, dtype=x.dtype), self.block_size)
            out = scaled_dot_product_attention(q, k, v, mask, dropout_p=p, bias=bias,
                                               backend=self.backend)
        out = out.transpose(1, 2).reshape(B, L, E)
        if pad is not None:
            out = out.masked_fill(pad.unsqueeze(-1), 0.0)
        return out
