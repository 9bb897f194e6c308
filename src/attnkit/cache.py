"""Key/value caches for incremental decoding.

A decoder that generates token t needs the keys and values of tokens 0..t-1 again;
caching them turns each step from O(t^2) into O(t) work. Keys and values are stored as
(B, Hkv, S, D): with grouped-query attention the cache holds Hkv heads, not Hq, which is
the whole memory saving of GQA/MQA at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache", "SlidingWindowCache", "LatentCache"]


class KVCache:
    """A growing cache: ``update(k, v)`` appends this step's (B, Hkv, n, D) keys and
    values in place and returns all of them so far.

    Storage grows by doubling, so appending one token at a time costs amortised O(1)
    copies per token instead of re-concatenating the whole history every step. Under
    autograd (keys that require grad) it concatenates instead, so earlier graphs are never
    overwritten.

    For decoding algorithms: ``crop(length)`` rolls back to the first ``length`` tokens
    (speculative decoding's rejected drafts) without a copy, ``reorder(indices)`` picks
    batch rows (beam search), ``lengths`` is each row's cached length (B,). Tensors that
    ``update`` returned are views of the storage: after a ``crop``, later tokens overwrite
    the positions it dropped. A tensor the caller passed in is never written into.
    """

    def __init__(self):
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0
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
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (not the spare capacity)."""
        if self._k is None:
            return 0
        return (self.keys.numel() * self._k.element_size()
                + self.values.numel() * self._v.element_size())

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        self._owned = False

    @property
    def lengths(self) -> Tensor | None:
        """(B,) cached tokens per batch row (all equal here), or None when empty."""
        keys = self.keys
        return None if keys is None else torch.full((keys.shape[0],), self.length,
                                                     dtype=torch.long, device=keys.device)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (0 <= length <= len(self)); no copy."""
        self.length = _crop_length(length, self.length, type(self).__name__)

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search): a gather of the
        cached tokens only, not of the spare capacity."""
        if self._k is None:
            return
        idx = _batch_indices(indices, self._k.shape[0], self._k.device, type(self).__name__)
        self._k, self._v = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        self._owned = not (self._k.requires_grad or self._v.requires_grad)

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, n, D) keys and (B, Hkv, n, Dv) values; return all so far."""
        if not isinstance(key, Tensor) or not isinstance(value, Tensor):
            raise TypeError("KVCache.update takes key and value tensors")
        if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
            raise ValueError(f"KVCache.update takes key (B, Hkv, n, D) and value "
                             f"(B, Hkv, n, Dv), got {tuple(key.shape)} and {tuple(value.shape)}")
        if self._k is not None:
            old_k, old_v = self.keys, self.values
            if (key.shape[:2] != old_k.shape[:2] or key.shape[3] != old_k.shape[3]
                    or value.shape[3] != old_v.shape[3] or key.dtype != old_k.dtype):
                raise ValueError(f"KVCache holds keys {tuple(old_k.shape)} ({old_k.dtype}); "
                                 f"cannot append {tuple(key.shape)} ({key.dtype})")
        n = key.shape[2]
        if self._k is None:
            self._k, self._v = key, value
            self.length, self._owned = n, False
            return key, value
        if torch.is_grad_enabled() and (key.requires_grad or old_k.requires_grad):
            self._k = torch.cat([old_k, key], 2)
            self._v = torch.cat([old_v, value], 2)
            self.length += n
            self._owned = False
            return self._k, self._v
        self._k = _append(self._k, self.length, key, self._owned)
        self._v = _append(self._v, self.length, value, self._owned)
        self.length += n
        self._owned = True
        return self.keys, self.values


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

    @property
    def keep(self) -> int:
        """Keys kept between calls: ``window - 1 + rollback``."""
        return self.window - 1 + self.rollback

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

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` tokens seen, as long as the window of the
        next token is still kept whole: at most ``rollback`` tokens past the window."""
        length = _crop_length(length, self.length, "SlidingWindowCache")
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
        idx = _batch_indices(indices, self._k.shape[0], self._k.device, "SlidingWindowCache")
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)

    def _store(self, key: Tensor, value: Tensor) -> None:
        """Keep the last ``keep`` positions of (key, value) in a fresh buffer."""
        n = min(self.keep, key.shape[2])
        self._k = key.new_empty(*key.shape[:2], self.capacity, key.shape[3])
        self._v = value.new_empty(*value.shape[:2], self.capacity, value.shape[3])
        self._k[:, :, :n] = key[:, :, key.shape[2] - n:]
        self._v[:, :, :n] = value[:, :, value.shape[2] - n:]
        self._start, self._end = 0, n

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, Hkv, n, D) keys and (B, Hkv, n, Dv) values; return the kept ones
        (at most ``window - 1``) followed by these, (B, Hkv, kept + n, D)."""
        _check_update(key, value, self.keys, self.values, "SlidingWindowCache")
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

    def __repr__(self) -> str:
        return (f"SlidingWindowCache(window={self.window}, rollback={self.rollback}, "
                f"seen={self.length}, "
                f"kept={self._end - self._start})")


class LatentCache:
    """Multi-head latent attention's cache (DeepSeek-V2/V3): per token and layer one
    latent of ``kv_lora_rank + qk_rope_head_dim`` numbers, ``[c | k_rope]``: the
    normalised compressed key/value ``c`` and the rotated key part shared by all heads.

    MHA caches ``2 * H * d`` numbers per token; MLA's keys and values are rebuilt from
    ``c`` (``k_nope = c W_UK``, ``v = c W_UV``), or never built at all in the absorbed
    form (see :class:`attnkit.layers.MultiHeadLatentAttention`). Latents are stored as
    one (B, 1, S, r + dr) tensor, a single "key head" that every query head reads, so the
    absorbed attention reads them where they lie: keys ``z``, and values ``c = z[..., :r]``
    (passed as all of ``z``, the last dr output columns dropped).

    ``update(z)`` appends this step's (B, 1, n, r + dr) latents in place (storage grows by
    doubling) and returns all of them so far; under autograd it concatenates instead.
    One cache per layer, as :class:`KVCache`.
    """

    def __init__(self):
        self._z: Tensor | None = None
        self.length = 0
        self._owned = False

    def __len__(self) -> int:
        return self.length

    @property
    def lengths(self) -> Tensor | None:
        """(B,) cached tokens per batch row (all equal here), or None when empty."""
        z = self.latents
        return None if z is None else torch.full((z.shape[0],), self.length, dtype=torch.long,
                                                  device=z.device)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens; no copy (later tokens overwrite the rest)."""
        self.length = _crop_length(length, self.length, "LatentCache")

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search)."""
        if self._z is None:
            return
        idx = _batch_indices(indices, self._z.shape[0], self._z.device, "LatentCache")
        self._z = self.latents.index_select(0, idx)
        self._owned = not self._z.requires_grad

    @property
    def latents(self) -> Tensor | None:
        """(B, 1, S, r + dr): every cached token's ``[c | k_rope]``."""
        return None if self._z is None else self._z[:, :, :self.length]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached latents (not the spare capacity)."""
        return 0 if self._z is None else self.latents.numel() * self._z.element_size()

    def reset(self) -> None:
        self._z = None
        self.length = 0
        self._owned = False

    def update(self, latent: Tensor) -> Tensor:
        """Append (B, 1, n, r + dr) latents; return all so far, (B, 1, S, r + dr)."""
        if not isinstance(latent, Tensor):
            raise TypeError(f"LatentCache.update takes a tensor, got {type(latent).__name__}")
        if latent.dim() != 4 or latent.shape[1] != 1:
            raise ValueError(f"LatentCache.update takes latents (B, 1, n, kv_lora_rank + "
                             f"qk_rope_head_dim), got {tuple(latent.shape)}")
        old = self.latents
        if old is not None and (latent.shape[0] != old.shape[0] or latent.shape[3] != old.shape[3]
                                or latent.dtype != old.dtype):
            raise ValueError(f"LatentCache holds latents {tuple(old.shape)} ({old.dtype}); "
                             f"cannot append {tuple(latent.shape)} ({latent.dtype})")
        if old is None:
            self._z, self._owned = latent, False
        elif torch.is_grad_enabled() and (latent.requires_grad or old.requires_grad):
            self._z, self._owned = torch.cat([old, latent], 2), False
        else:
            self._z, self._owned = _append(self._z, self.length, latent, self._owned), True
        self.length += latent.shape[2]
        return self.latents

    def __repr__(self) -> str:
        width = None if self._z is None else self._z.shape[-1]
        return f"LatentCache(length={self.length}, width={width})"


def _append(buf: Tensor, length: int, x: Tensor, owned: bool) -> Tensor:
    """Write x (B, h, n, D) after the first ``length`` positions (dim 2) of ``buf``; return
    the buffer, a new one twice as large (at least) when ``buf`` has no room or is not
    ``owned`` (the caller's own tensor, or one an autograd graph holds)."""
    need = length + x.shape[2]
    if need > buf.shape[2] or not owned:
        grown = x.new_empty(*x.shape[:2], max(need, 2 * buf.shape[2], 16), x.shape[3])
        grown[:, :, :length] = buf[:, :, :length]
        buf = grown
    buf[:, :, length:need] = x
    return buf


def _crop_length(length, current: int, who: str) -> int:
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"{who}.crop takes an int, got {type(length).__name__}")
    if not 0 <= length <= current:
        raise ValueError(f"{who}.crop({length}): the cache holds {current} tokens; "
                         f"length must be in [0, {current}]")
    return length


def _batch_indices(indices, batch: int, device, who: str) -> Tensor:
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.is_floating_point():
        raise TypeError(f"{who}.reorder takes a 1-D integer tensor of batch rows, got "
                        f"{tuple(indices.shape) if isinstance(indices, Tensor) else indices!r}")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < batch):
        raise ValueError(f"{who}.reorder: indices must be in [0, {batch}), got "
                         f"{indices.tolist()}")
    return indices.to(device=device, dtype=torch.long)


def _check_update(key, value, old_k, old_v, who: str) -> None:
    if not isinstance(key, Tensor) or not isinstance(value, Tensor):
        raise TypeError(f"{who}.update takes key and value tensors")
    if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"{who}.update takes key (B, Hkv, n, D) and value (B, Hkv, n, Dv), "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if old_k is not None and (key.shape[:2] != old_k.shape[:2] or key.shape[3] != old_k.shape[3]
                              or value.shape[3] != old_v.shape[3] or key.dtype != old_k.dtype):
        raise ValueError(f"{who} holds keys {tuple(old_k.shape)} ({old_k.dtype}); cannot add "
                         f"{tuple(key.shape)} ({key.dtype})")
