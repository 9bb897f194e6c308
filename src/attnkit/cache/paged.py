"""A paged KV cache: a pool of fixed-size blocks and a block table per sequence (vLLM's
PagedAttention, FlashInfer's paged KV, FlashAttention's ``block_table``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.decode import paged_decode_attention
from ..checks import positive_int
from ..masks import padding
from .common import batch_indices, crop_lengths, step_counts

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Keys and values in a pool of ``num_blocks`` blocks of ``block_size`` tokens; each
    sequence owns a list of blocks (its block table), so memory is allocated a block at a
    time and sequences with a common prefix share its blocks.

    Pools are (num_blocks, num_kv_heads, block_size, head_dim) ("HND"). The batch is the
    live sequences in the order they were added: :meth:`add_sequence` starts one,
    :meth:`fork` starts one that shares all blocks of another (copy on write: a shared
    block is copied only when one of its sharers writes into it), :meth:`free` returns a
    sequence's blocks to the pool once no one else holds them. The first :meth:`update`
    of an empty cache adds one sequence per batch row.

    ``update(k, v, lengths=None)`` appends (B, Hkv, n, D) keys to the B sequences (row b
    only its first ``lengths[b]`` tokens, ragged as :class:`KVCache`); :meth:`attention`
    then computes the queries' attention **reading through the block table**, never
    building a sequence's keys as one tensor (:func:`attnkit.backends.decode.
    paged_decode_attention`). :attr:`keys` / :attr:`values` gather the dense (B, Hkv,
    max length, D) tensors, for the cases the block-table kernel does not cover (masks,
    biases, weights) and for tests. ``crop`` frees the blocks it drops; ``reorder``
    forks the chosen rows (no copy of any block).
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device=None, value_dim: int | None = None):
        num_blocks = positive_int("num_blocks", num_blocks)
        self.block_size = positive_int("block_size", block_size)
        self.num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.value_dim = head_dim if value_dim is None else positive_int("value_dim", value_dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (num_blocks, num_kv_heads, block_size)
        self.key_pool = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.value_pool = torch.zeros(*shape, self.value_dim, dtype=dtype, device=device)
        self._refs = [0] * num_blocks          # sequences holding each block
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes block 0 first
        self._tables: dict[int, list[int]] = {}  # seq id -> its blocks, in logical order
        self._lens: dict[int, int] = {}
        self.seq_ids: list[int] = []           # the batch: live sequences, in order
        self._next_id = 0
        self._counts: Tensor | None = None     # tokens each row added in the last update
        self._table_cache: Tensor | None = None

    # ---- sequences

    def add_sequence(self) -> int:
        """Start an empty sequence (the last batch row); returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._tables[sid], self._lens[sid] = [], 0
        self.seq_ids.append(sid)
        self._changed()
        return sid

    def fork(self, seq_id: int) -> int:
        """A new sequence (the last batch row) holding the same tokens as ``seq_id`` by
        sharing its blocks; the first write into a shared block copies that block."""
        self._check_id(seq_id)
        sid = self.add_sequence()
        self._tables[sid] = list(self._tables[seq_id])
        self._lens[sid] = self._lens[seq_id]
        for blk in self._tables[sid]:
            self._refs[blk] += 1
        return sid

    def free(self, seq_id: int) -> None:
        """Drop sequence ``seq_id``; blocks no other sequence holds return to the pool."""
        self._check_id(seq_id)
        for blk in self._tables.pop(seq_id):
            self._release(blk)
        del self._lens[seq_id]
        self.seq_ids.remove(seq_id)
        self._changed()

    def _check_id(self, seq_id) -> None:
        if seq_id not in self._tables:
            raise ValueError(f"PagedKVCache has no sequence {seq_id!r}; live sequences are "
                             f"{self.seq_ids}")

    def _release(self, blk: int) -> None:
        self._refs[blk] -= 1
        if self._refs[blk] == 0:
            self._free.append(blk)

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError(f"PagedKVCache is out of blocks: all {len(self._refs)} blocks "
                               f"of {self.block_size} tokens are in use")
        blk = self._free.pop()
        self._refs[blk] = 1
        return blk

    def _changed(self) -> None:
        self._table_cache = None

    # ---- state

    def __len__(self) -> int:
        return max(self._lens.values(), default=0)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return len(self._refs) - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (shared blocks counted once)."""
        per_block = self.block_size * self.num_kv_heads * (
            self.head_dim * self.key_pool.element_size()
            + self.value_dim * self.value_pool.element_size())
        return self.blocks_in_use * per_block

    @property
    def lengths(self) -> Tensor | None:
        """(B,) cached tokens of each batch row, or None with no sequence."""
        if not self.seq_ids:
            return None
        return torch.tensor([self._lens[s] for s in self.seq_ids], dtype=torch.long,
                            device=self.key_pool.device)

    @property
    def is_ragged(self) -> bool:
        lens = [self._lens[s] for s in self.seq_ids]
        ragged_step = self._counts is not None and bool((self._counts != self._counts[0]).any())
        return len(set(lens)) > 1 or ragged_step

    @property
    def is_ragged_step(self) -> bool:
        """Whether the last update added different numbers of tokens to different rows
        (its queries then do not all end where their sequences end)."""
        return self._counts is not None and bool((self._counts != self._counts[0]).any())

    @property
    def block_table(self) -> Tensor:
        """(B, max blocks) physical block of each logical block, -1 past a sequence's end."""
        if self._table_cache is None:
            width = max((len(self._tables[s]) for s in self.seq_ids), default=0)
            table = torch.full((len(self.seq_ids), width), -1, dtype=torch.long)
            for row, s in enumerate(self.seq_ids):
                table[row, :len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.long)
            self._table_cache = table.to(self.key_pool.device)
        return self._table_cache

    def mask(self):
        """As :meth:`KVCache.mask`: the ragged batch's mask for the dense :attr:`keys`."""
        if not self.is_ragged:
            return None
        return padding(self.lengths.cpu(), self._counts)

    # ---- writing

    def _writable_block(self, sid: int, logical: int) -> int:
        """The physical block for logical block ``logical`` of ``sid``, allocated if new and
        copied first if shared (copy on write)."""
        table = self._tables[sid]
        if logical == len(table):
            table.append(self._take())
        blk = table[logical]
        if self._refs[blk] > 1:
            own = self._take()
            self.key_pool[own] = self.key_pool[blk]
            self.value_pool[own] = self.value_pool[blk]
            self._release(blk)
            table[logical] = blk = own
        return blk

    def update(self, key: Tensor, value: Tensor, lengths=None) -> None:
        """Append (B, Hkv, n, D) keys and (B, Hkv, n, Dv) values to the B sequences of the
        batch (row b: its first ``lengths[b]`` tokens). An empty cache adds B sequences."""
        self._check_kv(key, value)
        B, n = key.shape[0], key.shape[2]
        if not self.seq_ids:
            for _ in range(B):
                self.add_sequence()
        if B != len(self.seq_ids):
            raise ValueError(f"PagedKVCache holds {len(self.seq_ids)} sequences; keys "
                             f"{tuple(key.shape)} have {B} rows")
        counts = step_counts(lengths, B, n, "PagedKVCache")
        counts = torch.full((B,), n, dtype=torch.long) if counts is None else counts
        blocks, offsets, rows, cols = [], [], [], []
        bs = self.block_size
        for row, (sid, c) in enumerate(zip(self.seq_ids, counts.tolist())):
            start = self._lens[sid]
            for logical in range(start // bs, (start + c - 1) // bs + 1 if c else 0):
                lo, hi = max(start, logical * bs), min(start + c, (logical + 1) * bs)
                blk = self._writable_block(sid, logical)
                blocks += [blk] * (hi - lo)
                offsets += range(lo - logical * bs, hi - logical * bs)
                rows += [row] * (hi - lo)
                cols += range(lo - start, hi - start)
            self._lens[sid] = start + c
        self._changed()
        self._counts = counts
        if not blocks:
            return
        dev = self.key_pool.device
        blk, off = torch.tensor(blocks, device=dev), torch.tensor(offsets, device=dev)
        r, c = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        self.key_pool[blk, :, off] = key[r, :, c].to(self.key_pool.dtype)
        self.value_pool[blk, :, off] = value[r, :, c].to(self.value_pool.dtype)

    def _check_kv(self, key, value) -> None:
        if not isinstance(key, Tensor) or not isinstance(value, Tensor):
            raise TypeError("PagedKVCache.update takes key and value tensors")
        want_k = (self.num_kv_heads, self.head_dim)
        if (key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]
                or (key.shape[1], key.shape[3]) != want_k or value.shape[3] != self.value_dim):
            raise ValueError(f"PagedKVCache.update takes key (B, {self.num_kv_heads}, n, "
                             f"{self.head_dim}) and value (B, {self.num_kv_heads}, n, "
                             f"{self.value_dim}), got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        if key.dtype != self.key_pool.dtype or value.dtype != self.value_pool.dtype:
            raise ValueError(f"PagedKVCache holds {self.key_pool.dtype}; got keys {key.dtype} "
                             f"and values {value.dtype}")

    # ---- reading

    def attention(self, query: Tensor, *, scale: float | None = None,
                  is_causal: bool = False) -> Tensor:
        """softmax(scale q K^T) V over each sequence's cached keys, read through the block
        table: query (B, Hq, L, D) holds each sequence's last L tokens (bottom-right;
        ``is_causal`` masks the later ones among them). Returns (B, Hq, L, Dv)."""
        if not isinstance(query, Tensor) or query.dim() != 4 or query.shape[0] != len(self.seq_ids):
            raise ValueError(f"query must be (B={len(self.seq_ids)}, Hq, L, {self.head_dim}), "
                             f"got {tuple(query.shape) if isinstance(query, Tensor) else query!r}")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        return paged_decode_attention(query, self.key_pool, self.value_pool, self.block_table,
                                      self.lengths, scale=scale, is_causal=is_causal)

    def _gather(self, pool: Tensor) -> Tensor:
        table, lens = self.block_table, self.lengths
        B, width = table.shape
        dense = pool[table.clamp(min=0).view(-1)]  # (B * width, Hkv, bs, D)
        dense = dense.view(B, width, *pool.shape[1:]).transpose(1, 2).reshape(
            B, pool.shape[1], width * self.block_size, pool.shape[-1])
        S = int(lens.max()) if B else 0
        keep = torch.arange(S, device=pool.device) < lens.view(-1, 1)
        return dense[:, :, :S] * keep.view(B, 1, S, 1).to(pool.dtype)

    @property
    def keys(self) -> Tensor | None:
        """Dense (B, Hkv, max length, D) copy of the cached keys (zeros past each length)."""
        return self._gather(self.key_pool) if self.seq_ids else None

    @property
    def values(self) -> Tensor | None:
        return self._gather(self.value_pool) if self.seq_ids else None

    # ---- decoding algorithms

    def crop(self, length) -> None:
        """Keep the first ``length`` tokens of each sequence (an int, or (B,) per row);
        blocks past the new ends go back to the pool (or to their other holders)."""
        current = torch.tensor([self._lens[s] for s in self.seq_ids], dtype=torch.long)
        new = crop_lengths(length, current, "PagedKVCache")
        for sid, n in zip(self.seq_ids, new.tolist()):
            keep = -(-n // self.block_size)
            for blk in self._tables[sid][keep:]:
                self._release(blk)
            del self._tables[sid][keep:]
            self._lens[sid] = n
        self._counts = None
        self._changed()

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search): forks of the
        chosen sequences, sharing their blocks, then the old rows are freed."""
        idx = batch_indices(indices, len(self.seq_ids), "cpu", "PagedKVCache").tolist()
        old = list(self.seq_ids)
        new = [self.fork(old[i]) for i in idx]
        for sid in old:
            self.free(sid)
        self.seq_ids = new
        self._counts = None

    def __repr__(self) -> str:
        return (f"PagedKVCache(blocks {self.blocks_in_use}/{len(self._refs)} in use, "
                f"block_size={self.block_size}, lengths={[self._lens[s] for s in self.seq_ids]})")
