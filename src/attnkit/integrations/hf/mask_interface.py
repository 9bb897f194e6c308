"""transformers' attention-mask interface, answered with attnkit mask objects.

Once per forward pass (and per layer type), a transformers model asks the function
registered under its ``attn_implementation`` in ``AttentionMaskInterface`` for a mask,
describing the pattern instead of drawing it:

* ``mask_function(batch_idx, head_idx, q_idx, kv_idx) -> bool``, built from a handful of
  factories in ``transformers.masking_utils`` (causal, sliding window, bidirectional,
  packed sequences, combined with ``and_masks`` / ``or_masks``);
* ``attention_mask``: the 2-D padding mask (B, N), True = a real token;
* ``q_length, kv_length, q_offset, kv_offset``: query row i is the token at position
  ``q_offset + i``, key j the token at ``kv_offset + j``.

"sdpa" and "eager" draw that as a dense (B, 1, L, S) tensor. :func:`build_mask` reads
the pattern back into attnkit mask objects - ``causal()``, ``sliding_window(W - 1, 0)``,
``document(ids)``, :class:`KeyPadding` - which the tiled engine asks block by block, so
memory stays linear in the sequence length and blocks outside a window are skipped.
A pattern it does not recognise is still honoured exactly: :class:`HFMaskFunction`
evaluates transformers' own function on each tile.

Positions. attnkit puts query row i at ``p = i + (S - L)`` (bottom-right). transformers
puts it at ``q_offset + i`` and key j at ``kv_offset + j``. The two agree on every
difference ``query - key`` exactly when ``q_offset - kv_offset == S - L``, which holds for
dynamic caches (growing or sliding); a static cache (S = its capacity) does not, and
position-relative masks are then moved by the difference (:class:`Shifted`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import masking_utils as hf_masks

from ...masks import (CausalMask, KeyPaddingMask, Mask, SlidingWindowMask, causal, document,
                      sliding_window)

__all__ = ["PreparedMask", "KeyPadding", "Shifted", "HFMaskFunction", "build_mask",
           "translate_mask_function"]

#: the right reach of a window that has no right bound (transformers' sliding overlay
#: alone); large enough for any sequence, small enough for int64 arithmetic
_UNBOUNDED = 1 << 40


@dataclass(frozen=True)
class PreparedMask:
    """The mask a model hands unchanged to every attention call of one layer type.

    ``mask`` is an attnkit mask object, a dense bool tensor (B, 1, L, S) for patterns
    that can only be drawn, or None when every key may be seen. ``q_length`` and
    ``kv_length`` are the (L, S) it was built for; the attention function checks them.
    """

    mask: Mask | Tensor | None
    q_length: int
    kv_length: int

    # generate() builds masks ahead for static caches, calls .contiguous() on them and
    # hands them back to the model, whose mask preprocessing checks ``.ndim == 2`` (a
    # padding mask) before passing anything else on to :func:`build_mask`.
    ndim = 4

    def contiguous(self) -> "PreparedMask":
        return self


KeyPadding = KeyPaddingMask  # per-key padding anywhere (left, right, holes)


class Shifted(Mask):
    """``inner`` evaluated with every query position moved by ``delta``: query row i
    asks ``inner`` about position ``i + (S - L) + delta``."""

    def __init__(self, inner: Mask, delta: int):
        self.inner, self.delta = inner, int(delta)
        self.batch_size, self.num_heads = inner.batch_size, inner.num_heads
        self.block_size = inner.block_size

    def validate(self, grid):
        self.inner.validate(grid)

    def mask_mod(self, grid, b, h, q, k):
        return self.inner.mask_mod(grid, b, h, q + self.delta, k)

    def block_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return self.inner.block_states(grid, q_lo + self.delta, q_hi + self.delta, k_lo, k_hi)

    def __repr__(self):
        return f"Shifted({self.inner!r}, {self.delta})"


class HFMaskFunction(Mask):
    """A transformers ``mask_function(batch_idx, head_idx, q_idx, kv_idx)`` evaluated tile
    by tile on broadcasting index tensors: exact for any index-based pattern, linear in
    memory, but with no block skipping (every block is PARTIAL)."""

    def __init__(self, fn, batch_size: int, q_offset: int, kv_offset: int):
        self.fn = fn
        self.batch_size = batch_size
        self.q_offset, self.kv_offset = q_offset, kv_offset

    def mask_mod(self, grid, b, h, q, k):
        q_idx = q - grid.q_offset + self.q_offset  # query row i -> transformers' q_offset + i
        return self.fn(b, h, q_idx, k + self.kv_offset)

    def __repr__(self):
        return f"HFMaskFunction({getattr(self.fn, '__qualname__', self.fn)!r})"


# ------------------------------------------------------------------ reading patterns back

class _Unknown:
    """A mask function the translation does not recognise."""


UNKNOWN = _Unknown()


def _cells(fn) -> dict:
    """The variables a closure captured, by name."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def _and(a, b):
    """Intersection; None means 'every key' and is the identity."""
    if a is UNKNOWN or b is UNKNOWN:
        return UNKNOWN
    if a is None or b is None:
        return b if a is None else a
    for x, y in ((a, b), (b, a)):
        if isinstance(x, CausalMask) and isinstance(y, SlidingWindowMask):
            return sliding_window(y.left, min(y.right, 0))
    return a & b


def _or(a, b):
    """Union; None ('every key') absorbs."""
    if a is UNKNOWN or b is UNKNOWN:
        return UNKNOWN
    if a is None or b is None:
        return None
    return a | b


def translate_mask_function(fn):
    """The attnkit mask equivalent to a transformers ``mask_function`` (in key-index
    coordinates: query at key index p, key at key index j), None when it allows every
    key, or ``UNKNOWN``.

    transformers (``masking_utils``)             attnkit
    ``causal_mask_function``                     ``causal()``
    ``bidirectional_mask_function``              None
    ``sliding_window_causal_mask_function(W)``   ``sliding_window(W - 1, 0)``
    ``sliding_window_bidirectional_mask_function(W)``  ``sliding_window(W, W)``
    packed sequences (``position_ids`` restart)  ``document(ids) & <inner pattern>``
    ``and_masks`` / ``or_masks``                 ``&`` / ``|``
    """
    if fn is hf_masks.causal_mask_function:
        return causal()
    if fn is hf_masks.bidirectional_mask_function:
        return None
    if getattr(fn, "__module__", None) != hf_masks.__name__:
        return UNKNOWN
    name, cells = getattr(fn, "__qualname__", ""), _cells(fn)
    if name == "and_masks.<locals>.and_mask":
        out = None
        for part in cells["mask_functions"]:
            out = _and(out, translate_mask_function(part))
        return out
    if name == "or_masks.<locals>.or_mask":
        parts = [translate_mask_function(p) for p in cells["mask_functions"]]
        if not parts:  # transformers starts an or from False: nothing allowed
            return UNKNOWN
        out = parts[0]
        for part in parts[1:]:
            out = _or(out, part)
        return out
    if name == "sliding_window_overlay.<locals>.inner_mask":
        # kv_idx > q_idx - W: the W - 1 keys before the query and everything after
        return SlidingWindowMask(cells["sliding_window"] - 1, _UNBOUNDED)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        return sliding_window(cells["sliding_window"], cells["sliding_window"])
    if name == "packed_sequence_mask_function.<locals>.inner_mask":
        return document(cells["packed_sequence_mask"])
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        # transformers only builds this and-ed with the packed-sequence mask above, and
        # inside one packed sequence the remapped positions differ by the same amounts as
        # the indices (a sequence is a run of position ids increasing by 1)
        return translate_mask_function(cells["mask_function"])
    return UNKNOWN


def _key_padding(attention_mask: Tensor | None, kv_length: int, kv_offset: int):
    """The (B, kv_length) keep-mask of the keys this call sees, or None if all are kept.
    Like transformers' ``prepare_padding_mask``, a 2-D mask shorter than the keys counts
    the missing tail as padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a 2-D (batch, keys) padding mask here, got "
                         f"{type(attention_mask).__name__} of shape "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    keep = attention_mask.to(torch.bool)
    need = kv_offset + kv_length
    if keep.shape[-1] < need:
        keep = torch.nn.functional.pad(keep, (0, need - keep.shape[-1]), value=False)
    keep = keep[:, kv_offset:need]
    return None if bool(keep.all()) else keep


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
               mask_function=hf_masks.causal_mask_function, attention_mask=None,
               use_vmap: bool = False, device="cpu", **unused) -> PreparedMask:
    """``AttentionMaskInterface`` entry: the attnkit form of the mask transformers asks for.

    Same arguments as ``transformers.masking_utils.sdpa_mask``; the others it passes
    (``dtype``, ``config``, ``allow_is_causal_skip``, ``local_size``, ...) are not needed.
    Returns a :class:`PreparedMask` of an attnkit mask object, except for patterns built
    with ``use_vmap`` (custom, possibly not index-based functions), which are drawn densely
    by transformers' own ``sdpa_mask``.
    """
    if isinstance(attention_mask, PreparedMask):  # built ahead of time by generate()
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if use_vmap:
        dense = hf_masks.sdpa_mask(batch_size=batch_size, q_length=q_length,
                                   kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                   mask_function=mask_function, attention_mask=attention_mask,
                                   allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                                   use_vmap=True, device=device)
        return PreparedMask(dense, q_length, kv_length)
    pattern = translate_mask_function(mask_function)
    if pattern is UNKNOWN:
        pattern = HFMaskFunction(mask_function, batch_size, q_offset, kv_offset)
    else:
        delta = (q_offset - kv_offset) - (kv_length - q_length)
        if pattern is not None and delta != 0:
            pattern = Shifted(pattern, delta)
    keep = _key_padding(attention_mask, kv_length, kv_offset)
    if keep is not None:
        pad = KeyPadding(keep.to(device))
        pattern = pad if pattern is None else pattern & pad
    return PreparedMask(pattern, q_length, kv_length)
