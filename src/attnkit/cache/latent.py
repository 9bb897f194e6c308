"""Multi-head latent attention's compressed cache."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import append, batch_indices, crop_length

__all__ = ["LatentCache"]


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
        self.length = crop_length(length, self.length, "LatentCache")

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (B',) in that order (beam search)."""
        if self._z is None:
            return
        idx = batch_indices(indices, self._z.shape[0], self._z.device, "LatentCache")
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
            self._z, self._owned = append(self._z, self.length, latent, self._owned), True
        self.length += latent.shape[2]
        return self.latents

    def __repr__(self) -> str:
        width = None if self._z is None else self._z.shape[-1]
        return f"LatentCache(length={self.length}, width={width})"
