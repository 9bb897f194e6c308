"""Key/value caches for incremental decoding.

A decoder that generates token t needs the keys and values of tokens 0..t-1 again;
caching them turns each step from O(t^2) into O(t) work. Keys and values are stored as
(B, Hkv, S, D): with grouped-query attention the cache holds Hkv heads, not Hq, which is
the whole memory saving of GQA/MQA at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """A growing cache: ``update(k, v)`` appends this step's (B, Hkv, n, D) keys and
    values in place and returns all of them so far.

    Storage grows by doubling, so appending one token at a time costs amortised O(1)
    copies per token instead of re-concatenating the whole history every step. Under
    autograd (keys that require grad) it concatenates instead, so earlier graphs are never
    overwritten.
    """

    def __init__(self):
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

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
            self.length = n
            return key, value
        if torch.is_grad_enabled() and (key.requires_grad or old_k.requires_grad):
            self._k = torch.cat([old_k, key], 2)
            self._v = torch.cat([old_v, value], 2)
            self.length += n
            return self._k, self._v
        need = self.length + n
        if need > self._k.shape[2]:  # the first step stored the caller's tensor: never written into
            cap = max(need, 2 * self._k.shape[2], 16)
            k_new = key.new_empty(*key.shape[:2], cap, key.shape[3])
            v_new = value.new_empty(*value.shape[:2], cap, value.shape[3])
            k_new[:, :, :self.length] = old_k
            v_new[:, :, :self.length] = old_v
            self._k, self._v = k_new, v_new
        self._k[:, :, self.length:need] = key
        self._v[:, :, self.length:need] = value
        self.length = need
        return self.keys, self.values
