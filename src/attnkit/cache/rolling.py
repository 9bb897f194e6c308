"""Caches of constant memory: the rolling window of sliding-window attention."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import padding
from .common import (batch_indices, check_update, crop_length, crop_lengths,
                     step_counts, tail_rows, write_rows)
from .growing import KVCache

__all__ = ["SlidingWindowCache"]


class SlidingWindowCache(KVCache):
    """A rolling cache for sliding-window attention: memory stays constant however long
    generation runs.

    ``window`` is the number of keys a query sees, itself included (transformers'
    ``sliding_window=W``, attnkit's ``masks.sliding_window(W - 1, 0)``). Between calls the
    cache keeps only the last ``window - 1`` keys and values, all a later query can reach.
    ``update(k, v)`` returns the kept keys followed by the new ones, contiguous in
    position and ending at the newest token, so with bottom-right alignment (query row i
    of L sits at ``S - L + i``) the returned keys' indices are the absolute positions
    shifted by ``len(cache) - S``: every shift-invariant rule (causal, sliding window,
    ALiBi) stays exact. ``len(cache)`` is the number of tokens seen so far (the absolute
    position of the next token, what rotary embeddings need), not the number kept.

    Storage is one buffer of ``2 * (window - 1) + 16`` slots per head: new tokens are
    written after the kept ones and, when the buffer is full, the kept tail moves to the
    front (``window - 1`` copies every ``window`` tokens or so, O(1) per token amortised).
    The tensors returned by ``update`` are views of that buffer, valid until the next
    ``update``. Under autograd (keys that require grad) it concatenates instead and never
    writes in place.

    With a prompt longer than the buffer, ``update`` returns the whole prompt's keys once
    (the caller needs them for that call) and keeps only the tail.

    Pass the window mask (``masks.sliding_window(window - 1, 0)``) with every call: for a
    one-token step the cache alone limits the query to its window, but in a chunk of n > 1
    tokens the later rows would otherwise also see the chunk's earlier rows' old keys. A
    ``key_padding_mask`` covers the returned keys, ``min(len_before, keep) + n``.

    ``rollback=r`` keeps r tokens more than the window needs, so that ``crop`` can take
    back up to r tokens (speculative decoding's rejected drafts) and the window is still
    whole afterwards; the returned keys then reach further back than the window, so pass
    the window mask with every call, one-token steps included.
    """

    def __init__(self, window: int, *, rollback: int = 0):
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (keys a query sees, itself included), "
                             f"got {window}")
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
            raise ValueError(f"rollback must be an int >= 0, got {rollback!r}")
        super().__init__()
        self.window, self.rollback = window, rollback
        self._start = 0  # kept keys are buffer slots [_start, _end)
        self._end = 0
        self._kept = None      # ragged: (B,) keys each row keeps, slots [0, _kept[b])
        self._returned = None  # ragged: (B,) keys the last update returned per row

    @property
    def keep(self) -> int:
        """Keys kept between calls: ``window - 1 + rollback``."""
        return self.window - 1 + self.rollback

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept keys and values (not the spare capacity)."""
        if self._k is None:
            return 0
        return (self.keys.numel() * self._k.element_size()
                + self.values.numel() * self._v.element_size())

    @property
    def capacity(self) -> int:
        """Slots per (batch, head) in the buffer; constant once allocated."""
        return 2 * self.keep + 16

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, self._start:self._end]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, self._start:self._end]

    def reset(self) -> None:
        super().reset()
        self._start = self._end = 0
        self._kept = self._returned = None

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` tokens seen, as long as the window of the
        next token is still kept whole: at most ``rollback`` tokens past the window."""
        if self._lens is not None:
            return self._crop_ragged(length)
        length = crop_length(length, self.length, "SlidingWindowCache")
        drop, kept = self.length - length, self._end - self._start
        if kept - drop < min(self.window - 1, length):
            raise ValueError(f"SlidingWindowCache(window={self.window}, rollback="
                             f"{self.rollback}) keeps {kept} tokens; rolling back {drop} would "
                             f"lose keys the window needs (pass rollback= to keep more)")
        self._end -= drop
        self.length = length

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search)."""
        if self._k is None:
            return
        idx = batch_indices(indices, self._k.shape[0], self._k.device, "SlidingWindowCache")
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)
        if self._lens is not None:
            rows = idx.cpu()
            self._lens, self._kept = self._lens[rows], self._kept[rows]
            self._returned = self._counts = None

    def _store(self, key: Tensor, value: Tensor) -> None:
        """Keep the last ``keep`` positions of (key, value) in a fresh buffer."""
        n = min(self.keep, key.shape[2])
        self._k = key.new_empty(*key.shape[:2], self.capacity, key.shape[3])
        self._v = value.new_empty(*value.shape[:2], self.capacity, value.shape[3])
        self._k[:, :, :n] = key[:, :, key.shape[2] - n:]
        self._v[:, :, :n] = value[:, :, value.shape[2] - n:]
        self._start, self._end = 0, n

    def update(self, key: Tensor, value: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
        """Add (B, Hkv, n, D) keys and (B, Hkv, n, Dv) values; return the kept ones
        (at most ``window - 1``) followed by these, (B, Hkv, kept + n, D).

        ``lengths`` (B,): row b adds only its first ``lengths[b]`` tokens (ragged batch).
        Once rows differ, each row keeps its own last tokens, left-aligned, and
        :meth:`mask` covers the returned keys: row b's kept ones and its new ones."""
        check_update(key, value, self.keys, self.values, "SlidingWindowCache")
        counts = step_counts(lengths, key.shape[0], key.shape[2], "SlidingWindowCache")
        if counts is not None and bool((counts == key.shape[2]).all()):
            counts = None
        if self._lens is not None or counts is not None:
            return self._update_ragged(key, value, counts)
        n = key.shape[2]
        if self._k is None:
            self.length = n
            if torch.is_grad_enabled() and key.requires_grad:
                cut = n - min(self.keep, n)
                self._k, self._v = key[:, :, cut:], value[:, :, cut:]
                self._start, self._end = 0, n - cut
            else:
                self._store(key, value)
            return key, value
        old_k, old_v = self.keys, self.values
        self.length += n
        if torch.is_grad_enabled() and (key.requires_grad or old_k.requires_grad):
            k_all, v_all = torch.cat([old_k, key], 2), torch.cat([old_v, value], 2)
            cut = k_all.shape[2] - min(self.keep, k_all.shape[2])
            self._k, self._v = k_all[:, :, cut:], v_all[:, :, cut:]
            self._start, self._end = 0, self._k.shape[2]
            return k_all, v_all
        kept = self._end - self._start
        if kept + n > self.capacity or self._k.shape[2] != self.capacity:
            k_all, v_all = torch.cat([old_k, key], 2), torch.cat([old_v, value], 2)
            self._store(k_all, v_all)
            return k_all, v_all
        if self._end + n > self.capacity:  # slide the kept tail to the front
            self._k[:, :, :kept] = old_k.clone()
            self._v[:, :, :kept] = old_v.clone()
            self._start, self._end = 0, kept
        s0, s1 = self._start, self._end + n
        self._k[:, :, self._end:s1] = key
        self._v[:, :, self._end:s1] = value
        self._start, self._end = max(s0, s1 - self.keep), s1
        return self._k[:, :, s0:s1], self._v[:, :, s0:s1]

    # ---- ragged batches: every row keeps its own last ``keep`` tokens, left-aligned

    def mask(self):
        """For a ragged batch, the mask of the last update's queries over the keys it
        returned (row b: its kept keys, then its new ones); None otherwise."""
        if self._lens is None:
            return None
        return padding(self._returned, self._counts) if self._returned is not None else None

    def _update_ragged(self, key: Tensor, value: Tensor, counts: Tensor | None):
        """Per-row concatenation of the kept keys and the new ones, then per-row tails:
        O(window) copies per call, constant memory."""
        B, n = key.shape[0], key.shape[2]
        counts = torch.full((B,), n, dtype=torch.long) if counts is None else counts
        if self._lens is None:  # entering ragged mode (or the first update)
            kept_now = self._end - self._start if self._k is not None else 0
            self._kept = torch.full((B,), kept_now, dtype=torch.long)
            self._lens = torch.full((B,), self.length, dtype=torch.long)
        old_k, old_v = self.keys, self.values
        total = self._kept + counts
        k_all = key.new_zeros(B, key.shape[1], int(total.max()), key.shape[3])
        v_all = value.new_zeros(B, value.shape[1], int(total.max()), value.shape[3])
        if old_k is not None:
            write_rows(k_all, torch.zeros_like(total), old_k, self._kept)
            write_rows(v_all, torch.zeros_like(total), old_v, self._kept)
        write_rows(k_all, self._kept, key, counts)
        write_rows(v_all, self._kept, value, counts)
        keep = total.clamp(max=self.keep)
        self._k, self._v = tail_rows(k_all, total, keep), tail_rows(v_all, total, keep)
        self._start, self._end = 0, self._k.shape[2]
        self._kept, self._returned, self._counts = keep, total, counts
        self._lens = self._lens + counts
        self.length = int(self._lens.max())
        return k_all, v_all

    def _crop_ragged(self, length) -> None:
        new = crop_lengths(length, self._lens, "SlidingWindowCache")
        drop = self._lens - new
        if (self._kept - drop < torch.minimum(new, torch.full_like(new, self.window - 1))).any():
            raise ValueError(f"SlidingWindowCache(window={self.window}, rollback="
                             f"{self.rollback}) keeps {self._kept.tolist()} tokens per row; "
                             f"rolling back {drop.tolist()} would lose keys the window needs "
                             f"(pass rollback= to keep more)")
        self._kept, self._lens = self._kept - drop, new
        self._returned = self._counts = None
        self.length = int(new.max())

    def __repr__(self) -> str:
        return (f"SlidingWindowCache(window={self.window}, rollback={self.rollback}, "
                f"seen={self.length}, "
                f"kept={self._end - self._start})")
