"""StreamingLLM's cache: a few attention-sink tokens and a rolling window."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import key_padding, padding, sliding_window
from .common import batch_indices, check_update, crop_lengths, step_counts, write_rows

__all__ = ["SinkCache"]


class SinkCache:
    """Keep the first ``num_sinks`` tokens and a rolling ``window``: constant memory however
    long generation runs (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"; transformers v5 dropped its SinkCache).

    Between calls each sequence keeps its first ``num_sinks`` tokens and its last
    ``window - 1``; ``update(k, v)`` returns those followed by the n new tokens, so a
    one-token step sees ``num_sinks + window`` keys (``window`` counts the newest token,
    as in :class:`SlidingWindowCache`).

    **Positions inside the cache**, as the paper does (mit-han-lab/streaming-llm,
    ``pos_shift``): key slot j sits at position j and a query at its slot, however many
    tokens were evicted before it. Rotary embeddings therefore turn keys when they are
    read, not when they are stored: the cache holds keys *before* RoPE
    (``rotates_keys = True``), and :class:`attnkit.MultiHeadAttention` rotates the keys
    ``update`` returns at 0..S-1 and its queries at their slots. Position biases (ALiBi,
    T5) see slot distances through the usual bottom-right alignment.

    :meth:`mask` is the mask of the last update's queries (their window of slots, the
    sinks, and each sequence's own length in a ragged batch); pass ``is_causal=True``
    with it. ``lengths`` counts the tokens each sequence has seen; ``len(cache)`` the
    longest. ``update(k, v, lengths=c)`` takes ragged batches as :class:`KVCache` does.
    Storage is rebuilt at each update: O(num_sinks + window) copies per step, as the
    paper's own ``torch.cat``.
    """

    rotates_keys = True

    def __init__(self, num_sinks: int, window: int):
        for name, v, low in (("num_sinks", num_sinks, 0), ("window", window, 1)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        self.num_sinks, self.window = num_sinks, window
        self.reset()

    def reset(self) -> None:
        self._k = self._v = None
        self._seen = self._kept = self._returned = self._counts = None  # (B,) each
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def keep(self) -> int:
        """Keys a sequence keeps between calls: ``num_sinks + window - 1``."""
        return self.num_sinks + self.window - 1

    @property
    def keys(self) -> Tensor | None:
        """(B, Hkv, kept, D) keys before RoPE: sinks, then the window's."""
        return self._k

    @property
    def values(self) -> Tensor | None:
        return self._v

    @property
    def lengths(self) -> Tensor | None:
        """(B,) tokens each sequence has seen (not the number kept)."""
        return None if self._seen is None else self._seen.to(self._k.device)

    @property
    def is_ragged(self) -> bool:
        return self._seen is not None and not bool((self._seen == self._seen[0]).all())

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept keys and values."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def mask(self):
        """The last update's queries over the keys it returned: slot p sees slots
        p - window + 1 .. p and the sinks, within its own sequence. None before any update."""
        if self._returned is None:
            return None
        S = int(self._returned.max())
        is_sink = (torch.arange(S) < self.num_sinks).expand(len(self._returned), S)
        rule = sliding_window(self.window - 1, 0) | key_padding(~is_sink.to(self._k.device))
        return rule & padding(self._returned, self._counts)

    def query_slots(self, n: int) -> Tensor:
        """(B, n) slots of the last update's n queries among the keys it returned: row b's
        ``i``-th query at ``returned[b] - counts[b] + i`` (its position for RoPE)."""
        if self._returned is None:
            raise ValueError("SinkCache.query_slots: call update first")
        return (self._returned - self._counts).view(-1, 1) + torch.arange(n)

    def update(self, key: Tensor, value: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
        """Add (B, Hkv, n, D) keys (before RoPE) and (B, Hkv, n, Dv) values; return the kept
        ones followed by these, (B, Hkv, kept + n, D). ``lengths`` (B,): row b adds only
        its first ``lengths[b]`` tokens."""
        check_update(key, value, self._k, self._v, "SinkCache")
        B, n = key.shape[0], key.shape[2]
        counts = step_counts(lengths, B, n, "SinkCache")
        counts = torch.full((B,), n, dtype=torch.long) if counts is None else counts
        if self._k is None:
            self._seen = self._kept = torch.zeros(B, dtype=torch.long)
        total = self._kept + counts
        k_all = self._join(self._k, key, total, counts)
        v_all = self._join(self._v, value, total, counts)
        keep = total.clamp(max=self.keep)
        self._k, self._v = self._evict(k_all, total, keep), self._evict(v_all, total, keep)
        self._kept, self._returned, self._counts = keep, total, counts
        self._seen = self._seen + counts
        self.length = int(self._seen.max())
        return k_all, v_all

    def _join(self, old: Tensor | None, new: Tensor, total: Tensor, counts: Tensor) -> Tensor:
        """Row b: its kept keys, then its ``counts[b]`` new ones (zeros after)."""
        out = new.new_zeros(new.shape[0], new.shape[1], int(total.max()), new.shape[3])
        if old is not None:
            write_rows(out, torch.zeros_like(total), old, self._kept)
        write_rows(out, self._kept, new, counts)
        return out

    def _evict(self, x: Tensor, total: Tensor, keep: Tensor) -> Tensor:
        """Row b keeps its first ``num_sinks`` slots and its last ``keep[b] - num_sinks``."""
        s = self.num_sinks
        out = x.new_zeros(x.shape[0], x.shape[1], int(keep.max()), x.shape[3])
        even = bool((total == total[0]).all())
        rows = [(slice(None), int(total[0]), int(keep[0]))] if even else [
            (b, t, k) for b, (t, k) in enumerate(zip(total.tolist(), keep.tolist()))]
        for b, t, k in rows:
            if k == t:
                out[b, ..., :k, :] = x[b, ..., :k, :]
            else:  # evict: the sinks, then the most recent
                out[b, ..., :s, :] = x[b, ..., :s, :]
                out[b, ..., s:k, :] = x[b, ..., t - (k - s):t, :]
        return out

    def crop(self, length) -> None:
        """Roll back to the first ``length`` tokens seen, as long as no evicted token is
        needed: only the tokens added since the last eviction can be taken back."""
        if self._seen is None:
            if length != 0:
                raise ValueError(f"SinkCache.crop({length}): the cache is empty")
            return
        new = crop_lengths(length, self._seen, "SinkCache")
        drop = self._seen - new
        evicted = self._seen - self._kept
        if ((drop > 0) & (evicted > 0)).any() or (drop > self._kept).any():
            raise ValueError(f"SinkCache.crop: sequences have seen {self._seen.tolist()} tokens "
                             f"and keep {self._kept.tolist()}; a sequence that evicted tokens "
                             f"cannot be rolled back")
        keep = self._kept - drop  # nothing was evicted: each row's first keep[b] slots
        self._k, self._v = self._k[:, :, :int(keep.max())], self._v[:, :, :int(keep.max())]
        self._kept, self._seen = keep, new
        self._returned = self._counts = None
        self.length = int(new.max())

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search)."""
        if self._k is None:
            return
        idx = batch_indices(indices, self._k.shape[0], self._k.device, "SinkCache")
        rows = idx.cpu()
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)
        self._seen, self._kept = self._seen[rows], self._kept[rows]
        self._returned = self._counts = None
        self.length = int(self._seen.max()) if rows.numel() else 0

    def __repr__(self) -> str:
        seen = None if self._seen is None else self._seen.tolist()
        return f"SinkCache(num_sinks={self.num_sinks}, window={self.window}, seen={seen})"
