"""The growing key/value cache, for equal-length and ragged batches."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import padding
from .common import (append, batch_indices, check_update, crop_length, crop_lengths,
                     step_counts, write_rows)

__all__ = ["KVCache"]


class KVCache:
    """A growing cache: ``update(k, v)`` appends this step's (B, Hkv, n, D) keys and
    values in place and returns all of them so far.

    Storage grows by doubling, so appending one token at a time costs amortised O(1)
    copies per token instead of re-concatenating the whole history every step. Under
    autograd (keys that require grad) it concatenates instead, so earlier graphs are never
    overwritten.

    **Ragged batches** (each sequence its own length, FlashAttention's ``cache_seqlens``):
    ``update(k, v, lengths=c)`` adds only the first ``c[b]`` of the n tokens of row b (the
    rest are right padding), written right after that row's own cached tokens. Once rows
    differ, every later ``update`` appends at each row's own length, ``lengths`` is (B,)
    per row, and ``update`` returns (B, Hkv, max length, D) whose entries past a row's
    length are padding. :meth:`mask` gives the mask for the queries of the last update
    (``masks.padding(lengths, query_lengths=c)``): each sequence's queries sit bottom-right
    against its own keys, so causal masks, windows, ALiBi and T5 follow each sequence's
    length; :class:`attnkit.MultiHeadAttention` applies it, and RoPE at
    ``lengths[b] + i``, itself.

    For decoding algorithms: ``crop(length)`` rolls back to the first ``length`` tokens
    (speculative decoding's rejected drafts; a (B,) tensor crops each row to its own)
    without a copy, ``reorder(indices)`` picks batch rows (beam search). Tensors that
    ``update`` returned are views of the storage: after a ``crop``, later tokens overwrite
    the positions it dropped. A tensor the caller passed in is never written into.
    """

    def __init__(self):
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0        # the longest row's cached tokens: keys returned are (.., length, D)
        self._lens: Tensor | None = None    # (B,) per row once rows differ (CPU), else None
        self._counts: Tensor | None = None  # (B,) tokens each row added in the last update
        self._owned = False  # whether the storage is ours to write into

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    @property
    def is_ragged(self) -> bool:
        """Whether rows hold different lengths (or the last update added different counts)."""
        return self._lens is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (not the spare capacity or padding)."""
        if self._k is None:
            return 0
        h, d, dv = self._k.shape[1], self._k.shape[3], self._v.shape[3]
        tokens = int(self._row_lengths().sum())
        return tokens * h * (d * self._k.element_size() + dv * self._v.element_size())

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        self._lens = self._counts = None
        self._owned = False

    def _row_lengths(self) -> Tensor:
        if self._lens is not None:
            return self._lens
        return torch.full((0 if self._k is None else self._k.shape[0],), self.length,
                          dtype=torch.long)

    @property
    def lengths(self) -> Tensor | None:
        """(B,) cached tokens per batch row, or None when empty."""
        if self._k is None:
            return None
        return self._row_lengths().to(self._k.device)

    def mask(self):
        """The mask object for the queries of the last ``update`` of a ragged batch: row b's
        ``lengths[b]`` keys are real, its queries are the last ones it added, bottom-right
        against them (:func:`attnkit.masks.padding` with ``query_lengths``). None when every
        row has the same length (no mask needed). Combine it with ``is_causal=True``."""
        if self._lens is None:
            return None
        return padding(self._lens, self._counts)

    def crop(self, length) -> None:
        """Keep the first ``length`` tokens of every row (0 <= length <= len(self)), or of
        row b ``length[b]`` for a (B,) tensor; no copy."""
        if self._k is None:
            self.length = crop_length(length, self.length, "KVCache")
            return
        self._set_lengths(crop_lengths(length, self._row_lengths(), "KVCache"), None)

    def _set_lengths(self, lens: Tensor, counts: Tensor | None) -> None:
        self.length = int(lens.max()) if lens.numel() else 0
        uniform = bool((lens == self.length).all()) and (
            counts is None or bool((counts == counts[0]).all()))
        self._lens = None if uniform else lens
        self._counts = None if uniform else counts

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search): a gather of the
        cached tokens only, not of the spare capacity."""
        if self._k is None:
            return
        idx = batch_indices(indices, self._k.shape[0], self._k.device, "KVCache")
        lens = self._row_lengths()[idx.cpu()]
        counts = None if self._counts is None else self._counts[idx.cpu()]
        self._k, self._v = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        self._owned = not (self._k.requires_grad or self._v.requires_grad)
        self._set_lengths(lens, counts)

    def update(self, key: Tensor, value: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, n, D) keys and (B, Hkv, n, Dv) values; return all so far.

        ``lengths`` (B,): row b adds only its first ``lengths[b]`` tokens (ragged batch);
        None adds all n to every row, each after its own cached tokens."""
        check_update(key, value, self.keys, self.values, "KVCache")
        counts = step_counts(lengths, key.shape[0], key.shape[2], "KVCache")
        if counts is not None and bool((counts == key.shape[2]).all()):
            counts = None
        if self._lens is None and counts is None:
            return self._update_even(key, value)
        return self._update_ragged(key, value, counts)

    def _update_even(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        n = key.shape[2]
        if self._k is None:
            self._k, self._v = key, value
            self.length, self._owned = n, False
            return key, value
        old_k, old_v = self.keys, self.values
        if torch.is_grad_enabled() and (key.requires_grad or old_k.requires_grad
                                        or value.requires_grad or old_v.requires_grad):
            self._k = torch.cat([old_k, key], 2)
            self._v = torch.cat([old_v, value], 2)
            self.length += n
            self._owned = False
            return self._k, self._v
        self._k = append(self._k, self.length, key, self._owned)
        self._v = append(self._v, self.length, value, self._owned)
        self.length += n
        self._owned = True
        return self.keys, self.values

    def _update_ragged(self, key: Tensor, value: Tensor, counts: Tensor | None):
        """Row b's ``counts[b]`` tokens go after its own ``lengths[b]``; storage is zeroed
        where it is new, so padding entries are finite (never the caller's padding)."""
        B, n = key.shape[0], key.shape[2]
        counts = torch.full((B,), n, dtype=torch.long) if counts is None else counts
        old = self._row_lengths() if self._k is not None else torch.zeros(B, dtype=torch.long)
        new = old + counts
        need = int(new.max())
        grad = torch.is_grad_enabled() and (key.requires_grad or value.requires_grad or (
            self._k is not None and (self._k.requires_grad or self._v.requires_grad)))
        cap = 0 if self._k is None else self._k.shape[2]
        if grad or not self._owned or need > cap:
            size = need if grad else max(need, 2 * cap, 16)
            k = key.new_zeros(B, key.shape[1], size, key.shape[3])
            v = value.new_zeros(B, value.shape[1], size, value.shape[3])
            if self._k is not None:
                write_rows(k, torch.zeros_like(old), self.keys, old)
                write_rows(v, torch.zeros_like(old), self.values, old)
            self._k, self._v, self._owned = k, v, not grad
        write_rows(self._k, old, key, counts)
        write_rows(self._v, old, value, counts)
        self._set_lengths(new, counts)
        return self.keys, self.values

    def __repr__(self) -> str:
        lens = self.length if self._lens is None else self._lens.tolist()
        return f"KVCache(lengths={lens})"
