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

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import masking_utils as hf_masks

from ...masks import (CausalMask, DocumentMask, Grid, KeyPaddingMask, Mask, SlidingWindowMask,
                      causal, document, sliding_window)

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


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


class Shifted(Mask):
    """``inner`` evaluated with every query position moved by ``delta``: query row i
    asks ``inner`` about position ``i + (S - L) + delta``."""

    def __init__(self, inner: Mask, delta: int):
        self.inner, self.delta = inner, int(delta)
        self.batch_size, self.num_heads = inner.batch_size, inner.num_heads
        self.tile_hint = inner.tile_hint
        self.translation_invariant = inner.translation_invariant  # a constant shift keeps it

    def validate(self, grid):
        self.inner.validate(grid)

    def mask_mod(self, grid, b, h, q, k):
        return self.inner.mask_mod(grid, b, h, q + self.delta, k)

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        return self.inner.position_states(grid, q_lo + self.delta, q_hi + self.delta, k_lo,
                                          k_hi)

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

    def at(self, grid, b, h, i, k):
        # query row i -> transformers' q_offset + i, key j -> kv_offset + j
        return self.fn(b, h, i + self.q_offset, k + self.kv_offset)

    def mask_mod(self, grid, b, h, q, k):
        return self.at(grid, b, h, q - grid.q_offset, k)

    def __repr__(self):
        return f"HFMaskFunction({getattr(self.fn, '__qualname__', self.fn)!r})"


# ------------------------------------------------------------------ reading patterns back
#
# transformers describes a mask as a closure made by one of the public factories of
# ``masking_utils`` (``and_masks``, ``sliding_window_overlay``, ...). A closure is
# recognised by its code object, which every closure a factory makes shares: we call each
# public factory once on dummy arguments and remember the code of what it returns. Its
# parameters are the values the closure captured, told apart by type (the window is an
# int, the packed-sequence ids a tensor, the parts of ``and_masks`` a tuple of
# functions). Nothing depends on the names of transformers' private inner functions or
# variables, and a factory missing from an installed version is simply not recognised.
# Whatever is read back is then checked against transformers' own function on sample
# rows (:func:`_agrees`): a factory whose meaning changed falls back to evaluating
# transformers' function, exactly, instead of being misread.

class _Unknown:
    """A mask function the translation does not recognise."""

    def __repr__(self):
        return "UNKNOWN"


UNKNOWN = _Unknown()


class _NotRead(Exception):
    """A recognised closure whose captured values are not what its factory captures."""


@dataclass(frozen=True)
class _Remapped:
    """``remap_positions_for_packed_sequence(inner, position_ids)``: ``inner`` evaluated on
    positions inside each packed sequence. Only meaningful and-ed with that packing's
    document mask (see :func:`_and_all`)."""

    inner: object


def _captured(fn) -> list:
    """The values a closure captured."""
    return [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]


def _one(values: list, kind):
    """The only captured value of type ``kind``."""
    found = [v for v in values if isinstance(v, kind) and not isinstance(v, bool)]
    if len(found) != 1:
        raise _NotRead
    return found[0]


def _functions(values: list) -> tuple:
    """The mask functions ``and_masks`` / ``or_masks`` captured."""
    parts = _one(values, (tuple, list))
    if not all(callable(p) for p in parts):
        raise _NotRead
    return tuple(parts)


def _and_all(parts: list):
    """Intersection of translated parts; None means 'every key' and is the identity. A
    :class:`_Remapped` part is its inner pattern when a document mask is and-ed with it
    (inside one packed sequence, remapped positions differ by the same amounts as the
    indices, so a translation-invariant pattern is unchanged); otherwise unknown."""
    if any(p is UNKNOWN for p in parts):
        return UNKNOWN
    has_documents = any(isinstance(p, DocumentMask) for p in parts)
    out = None
    for p in parts:
        if isinstance(p, _Remapped):
            if not has_documents or not (p.inner is None or p.inner.translation_invariant):
                return UNKNOWN
            p = p.inner
        if p is None:
            continue
        if out is None:
            out = p
        elif isinstance(out, CausalMask) and isinstance(p, SlidingWindowMask):
            out = sliding_window(p.left, min(p.right, 0))
        elif isinstance(p, CausalMask) and isinstance(out, SlidingWindowMask):
            out = sliding_window(out.left, min(out.right, 0))
        else:
            out = out & p
    return out


def _or_all(parts: list):
    """Union; None ('every key') absorbs; an empty union allows nothing (unknown here)."""
    if not parts or any(p is UNKNOWN or isinstance(p, _Remapped) for p in parts):
        return UNKNOWN
    if any(p is None for p in parts):
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out


def _readers() -> dict:
    """code object of a public factory's closures -> reader(captured values)."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    f = hf_masks.causal_mask_function
    table = [
        ("and_masks", (f, f), lambda v: _and_all([_translate(p) for p in _functions(v)])),
        ("or_masks", (f, f), lambda v: _or_all([_translate(p) for p in _functions(v)])),
        # kv_idx > q_idx - W: the W - 1 keys before the query and everything after
        ("sliding_window_overlay", (2,),
         lambda v: SlidingWindowMask(_one(v, int) - 1, _UNBOUNDED)),
        ("sliding_window_bidirectional_overlay", (2,),
         lambda v: sliding_window(_one(v, int), _one(v, int))),
        ("packed_sequence_mask_function", (ids,), lambda v: document(_one(v, Tensor))),
        ("remap_positions_for_packed_sequence", (f, ids),
         lambda v: _Remapped(_translate(_one(v, type(f))))),
    ]
    readers = {}
    for name, args, reader in table:
        factory = getattr(hf_masks, name, None)
        try:
            code = factory(*args).__code__
        except Exception:  # pragma: no cover - a factory this version lacks or changed
            continue
        readers[code] = reader
    return readers


_READERS: dict = {}


def _translate(fn):
    if fn is hf_masks.causal_mask_function:
        return causal()
    if fn is hf_masks.bidirectional_mask_function:
        return None
    if not _READERS:
        _READERS.update(_readers())
    reader = _READERS.get(getattr(fn, "__code__", None))
    if reader is None:
        return UNKNOWN
    try:
        return reader(_captured(fn))
    except _NotRead:
        return UNKNOWN


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
    out = _translate(fn)
    return UNKNOWN if isinstance(out, _Remapped) else out


def _probe_rows(q_length: int) -> Tensor:
    """The query rows :func:`_agrees` compares: both ends, the middle, and rows spread
    evenly in between."""
    rows = torch.linspace(0, q_length - 1, min(q_length, 16)).round().long()
    extra = torch.tensor([0, 1, q_length // 2, q_length - 2, q_length - 1])
    return torch.cat([rows, extra]).clamp(0, q_length - 1).unique()


def _agrees(pattern, fn, batch_size: int, q_length: int, kv_length: int, q_offset: int,
            kv_offset: int, device) -> bool:
    """Whether the attnkit ``pattern`` allows the same keys as transformers' ``fn`` on
    sample query rows (every batch element, every key)."""
    rows = _probe_rows(q_length).to(device)
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    k = torch.arange(kv_length, device=device).view(1, 1, 1, -1)
    try:
        want = fn(b, h, rows.view(1, 1, -1, 1) + q_offset, k + kv_offset)
    except Exception:  # transformers' own function cannot be probed here: do not trust
        return False
    want = torch.as_tensor(want, device=device).to(torch.bool)
    want = want.expand(batch_size, 1, rows.numel(), kv_length)
    if pattern is None:
        return bool(want.all())
    grid = Grid(q_length, kv_length, device)
    got = pattern.at(grid, b, h, rows.view(1, 1, -1, 1), k).to(torch.bool)
    return bool((got == want).all())


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
    if pattern is not UNKNOWN:
        delta = (q_offset - kv_offset) - (kv_length - q_length)
        if pattern is not None and delta != 0:
            pattern = Shifted(pattern, delta)
        if not _agrees(pattern, mask_function, batch_size, q_length, kv_length, q_offset,
                       kv_offset, device):
            warnings.warn(f"attnkit read transformers' mask function as {pattern!r}, but the "
                          f"two disagree; evaluating transformers' function tile by tile "
                          f"instead (exact, without skipping blocks). Please report this "
                          f"with your transformers version ({_transformers_version()}).",
                          RuntimeWarning, stacklevel=2)
            pattern = UNKNOWN
    if pattern is UNKNOWN:
        pattern = HFMaskFunction(mask_function, batch_size, q_offset, kv_offset)
    keep = _key_padding(attention_mask, kv_length, kv_offset)
    if keep is not None:
        pad = KeyPadding(keep.to(device))
        pattern = pad if pattern is None else pattern & pad
    return PreparedMask(pattern, q_length, kv_length)
