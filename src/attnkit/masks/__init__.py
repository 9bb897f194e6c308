"""Mask objects: which keys each query may see.

One module per family: :mod:`.grid` (positions, block states), :mod:`.base` (the
protocol, ``&``, ``|``), :mod:`.windows` (causal, sliding, dilated), :mod:`.tokens`
(global tokens, padding), :mod:`.documents` (packed sequences), :mod:`.blocks`
(block-sparse, BigBird), :mod:`.dense` (a bool tensor); the constructors below.

Every mask speaks in *positions*. Key ``j`` sits at position ``j``; query row ``i``
sits at position ``p = i + (S - L)`` (bottom-right alignment, what KV-cache decoding
needs), or at a position the mask itself declares per row (:meth:`Mask.query_positions`:
a ragged batch puts each sequence's queries bottom-right against its own keys, packed
cross-attention each document's). A mask describes its pattern in positions:

* ``mask_mod(grid, b, h, q, k)``: the elementwise rule on broadcasting index tensors
  (query positions ``q``, keys ``k``), FlexAttention's ``mask_mod`` with the grid bound in;
* ``position_states(grid, q_lo, q_hi, k_lo, k_hi)``: for every rectangle of query
  positions ``[q_lo, q_hi)`` x keys ``[k_lo, k_hi)``, is it ``EMPTY`` (no entry
  allowed), ``FULL`` (every entry allowed) or ``PARTIAL``?

The engine asks in query *rows*, and :class:`Mask` turns rows into positions through the
:class:`Grid`:

* ``block_states(grid, r_lo, r_hi, k_lo, k_hi)``: the states of row blocks; the chunked
  engine skips empty tiles and runs full tiles without a mask, so cost follows what the
  mask allows;
* ``tile(grid, r0, r1, k0, k1)``: the exact bool block ``(B|1, H|1, r1-r0, k1-k0)``;
* ``at(grid, b, h, i, k)``: the elementwise rule at query rows ``i`` (gathered keys,
  FlexAttention).

Masks that are defined on rows rather than positions (a dense tensor) override these
three. ``True`` means "may attend", as in ``torch.nn.functional.scaled_dot_product_attention``.
Masks compose with ``&`` (both allow) and ``|`` (either allows); ``materialize(L, S)``
draws the dense picture, for plots and tests only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AndMask, Mask, OrMask
from .blocks import BigBirdMask, BlockSparseMask, bigbird_layout
from .dense import TensorMask
from .documents import DocumentMask
from .grid import EMPTY, FULL, PARTIAL, Grid
from .selected import SelectedMask
from .tokens import GlobalTokensMask, KeyPaddingMask, PaddingMask
from .windows import (CausalMask, ChunkedMask, CompressedCausalMask, DilatedMask,
                      SlidingWindowMask)

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Grid", "Mask",
    "causal", "padding", "key_padding", "sliding_window", "chunked", "dilated",
    "global_tokens", "ChunkedMask",
    "block_sparse", "document", "packed", "bigbird", "KeyPaddingMask",
    "CausalMask", "PaddingMask", "SlidingWindowMask", "DilatedMask", "GlobalTokensMask",
    "BlockSparseMask", "BigBirdMask", "DocumentMask", "TensorMask", "AndMask", "OrMask",
    "bigbird_layout", "selected", "SelectedMask", "compressed_causal", "CompressedCausalMask",
]


def causal() -> CausalMask:
    """Query at position p sees keys 0..p (bottom-right aligned when L != S)."""
    return CausalMask()


def selected(indices: Tensor, block_size: int | None = None) -> SelectedMask:
    """Each query row sees the keys it chose: ``indices`` (B|1, H|1, L, k) key indices per
    row (DeepSeek Sparse Attention's top-k), or with ``block_size`` (B|1, H|1, ceil(L/bs),
    n) key-block indices per block of query rows (Native Sparse Attention). Entries < 0
    are unused; combine with ``causal()`` to keep the choice causal."""
    return SelectedMask(indices, block_size)


def compressed_causal(size: int, stride: int, query_offset: int = 0) -> CompressedCausalMask:
    """Token queries over compressed keys (NSA): key c summarises tokens c * stride ..
    c * stride + size - 1 and is seen from token position p once ``c * stride + size - 1
    <= p``; query row i sits at token ``i + query_offset``."""
    return CompressedCausalMask(size, stride, query_offset)


def padding(lengths, query_lengths=None) -> PaddingMask:
    """Keys at index >= ``lengths[b]`` are padding: masked for every query of batch ``b``.

    With ``query_lengths`` (ragged batches): sequence b's ``query_lengths[b]`` queries (rows
    0.., right-padded) sit bottom-right against its own ``lengths[b]`` keys, so causal
    masks, windows and position biases follow each sequence's own length."""
    return PaddingMask(lengths, query_lengths)


def sliding_window(left: int, right: int | None = None) -> SlidingWindowMask:
    """Query at position p sees keys p-left .. p+right (``right`` defaults to ``left``;
    ``right=0`` is causal local attention; transformers' ``sliding_window=W`` is
    ``sliding_window(W - 1, 0)``). A negative ``left`` or ``right`` moves that edge past
    p (one-sided windows); a window with ``left + right < 0`` sees nothing."""
    return SlidingWindowMask(left, right)


def chunked(size: int) -> ChunkedMask:
    """Llama 4's chunked attention: a query at position p sees the keys of its own chunk of
    ``size`` positions up to itself (causal inside the chunk, nothing across chunks;
    transformers' ``attention_chunk_size``). The engine skips the other chunks: cost and
    memory are linear in the length."""
    return ChunkedMask(size)


def dilated(left: int, right: int, dilation) -> DilatedMask:
    """Longformer's dilated window: keys p + t*dilation, t in [-left, right]; ``dilation``
    may be a per-head sequence."""
    return DilatedMask(left, right, dilation)


def global_tokens(indices) -> GlobalTokensMask:
    """Positions ``indices`` see every key and are seen by every query."""
    return GlobalTokensMask(indices)


def block_sparse(layout: Tensor, block_size: int) -> BlockSparseMask:
    """A (num_q_blocks, num_k_blocks) bool block layout (or (H, nq, nk) per head)."""
    return BlockSparseMask(layout, block_size)


def key_padding(key_padding_mask: Tensor) -> KeyPaddingMask:
    """Per-key padding anywhere in the sequence: ``key_padding_mask`` (B, S) bool with
    True marking padding, as ``nn.MultiheadAttention``'s argument of that name."""
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                        f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
    return KeyPaddingMask(~key_padding_mask)


def document(ids, key_ids=None) -> DocumentMask:
    """Packed sequences: a token sees only tokens with the same id (ids: (S,) or (B, S)).

    With ``key_ids`` (S,) or (B, S), the queries carry ``ids`` ((L,) or (B, L)) and the keys
    ``key_ids``: packed cross-attention, documents with different query and key lengths,
    each document's queries bottom-right against its own keys."""
    return DocumentMask(ids, key_ids)


def _cu_seqlens(name: str, cu) -> Tensor:
    t = torch.as_tensor(cu)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1 or t.numel() == 0:
        raise TypeError(f"{name} must be a 1-D integer tensor of cumulative lengths "
                        f"(0, n_1, n_1 + n_2, ...), got {cu!r}")
    t = t.long()
    if int(t[0]) != 0 or bool((t[1:] < t[:-1]).any()):
        raise ValueError(f"{name} must start at 0 and never decrease, got {t.tolist()}")
    return t


def packed(cu_seqlens_q, cu_seqlens_k=None) -> DocumentMask:
    """Documents packed back to back, as FlashAttention's varlen functions take them:
    document d holds queries ``cu_seqlens_q[d] .. cu_seqlens_q[d+1]-1`` and keys
    ``cu_seqlens_k[d] .. cu_seqlens_k[d+1]-1`` (``cu_seqlens_k=None``: the same as the
    queries, self-attention). Each document's queries sit bottom-right against its own
    keys, so ``is_causal=True`` gives FlashAttention's varlen causal mask."""
    cq = _cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    ids_q = torch.repeat_interleave(torch.arange(cq.numel() - 1), cq.diff())
    if cu_seqlens_k is None:
        return DocumentMask(ids_q)
    ck = _cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if ck.numel() != cq.numel():
        raise ValueError(f"cu_seqlens_q ({cq.numel() - 1} documents) and cu_seqlens_k "
                         f"({ck.numel() - 1} documents) must describe the same documents")
    ids_k = torch.repeat_interleave(torch.arange(ck.numel() - 1), ck.diff())
    # query i of document d at i + k_end(d) - q_end(d): its keys end where its queries end
    positions = (torch.arange(ids_q.numel()) + (ck[1:] - cq[1:])[ids_q]).view(1, -1)
    return DocumentMask(ids_q, ids_k, positions)


def bigbird(block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, seed: int = 0, num_heads: int | None = None) -> BigBirdMask:
    """BigBird's block pattern: window, global and seeded random blocks (see ``bigbird_layout``)."""
    return BigBirdMask(block_size, num_window_blocks, num_global_blocks, num_random_blocks,
                       seed, num_heads)
