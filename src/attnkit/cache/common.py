"""What every cache shares: argument checks and the in-place append that grows storage
by doubling."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["append", "crop_length", "crop_lengths", "batch_indices", "check_update",
           "step_counts", "write_rows", "tail_rows"]


def append(buf: Tensor, length: int, x: Tensor, owned: bool) -> Tensor:
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


def crop_length(length, current: int, who: str) -> int:
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"{who}.crop takes an int, got {type(length).__name__}")
    if not 0 <= length <= current:
        raise ValueError(f"{who}.crop({length}): the cache holds {current} tokens; "
                         f"length must be in [0, {current}]")
    return length


def batch_indices(indices, batch: int, device, who: str) -> Tensor:
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.is_floating_point():
        raise TypeError(f"{who}.reorder takes a 1-D integer tensor of batch rows, got "
                        f"{tuple(indices.shape) if isinstance(indices, Tensor) else indices!r}")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < batch):
        raise ValueError(f"{who}.reorder: indices must be in [0, {batch}), got "
                         f"{indices.tolist()}")
    return indices.to(device=device, dtype=torch.long)


def check_update(key, value, old_k, old_v, who: str) -> None:
    if not isinstance(key, Tensor) or not isinstance(value, Tensor):
        raise TypeError(f"{who}.update takes key and value tensors")
    if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"{who}.update takes key (B, Hkv, n, D) and value (B, Hkv, n, Dv), "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if old_k is not None and (key.shape[:2] != old_k.shape[:2] or key.shape[3] != old_k.shape[3]
                              or value.shape[3] != old_v.shape[3] or key.dtype != old_k.dtype):
        raise ValueError(f"{who} holds keys {tuple(old_k.shape)} ({old_k.dtype}); cannot add "
                         f"{tuple(key.shape)} ({key.dtype})")


def step_counts(lengths, batch: int, n: int, who: str) -> Tensor | None:
    """``update``'s ``lengths``: None (every row adds all n tokens) or (B,) ints in [0, n],
    the real tokens of each row (the rest of the n are right padding). A CPU long tensor."""
    if lengths is None:
        return None
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"{who}.update: lengths must be integers, got {lengths.dtype}")
        counts = lengths.detach().to("cpu", torch.long)
    else:
        try:
            counts = torch.as_tensor(lengths, dtype=torch.long)
        except (TypeError, ValueError):
            raise TypeError(f"{who}.update: lengths must be a (B,) tensor or sequence of ints, "
                            f"got {lengths!r}") from None
    if counts.shape != (batch,):
        raise ValueError(f"{who}.update: lengths must be (B,) = ({batch},), one count per "
                         f"sequence, got shape {tuple(counts.shape)}")
    if (counts < 0).any() or (counts > n).any():
        raise ValueError(f"{who}.update: lengths must be in [0, {n}] (the tokens given), got "
                         f"{counts.tolist()}")
    return counts


def crop_lengths(length, current: Tensor, who: str) -> Tensor:
    """``crop``'s argument as (B,) lengths: an int (every row keeps at most that many) or a
    (B,) tensor (row b keeps ``length[b] <= current[b]``)."""
    if isinstance(length, Tensor) and length.dim() == 1:
        if length.is_floating_point() or length.dtype == torch.bool:
            raise TypeError(f"{who}.crop: per-sequence lengths must be integers, got "
                            f"{length.dtype}")
        new = length.detach().to("cpu", torch.long)
        if new.shape != current.shape:
            raise ValueError(f"{who}.crop: lengths must be (B,) = ({current.numel()},), got "
                             f"{tuple(new.shape)}")
        if (new < 0).any() or (new > current).any():
            raise ValueError(f"{who}.crop({new.tolist()}): each sequence holds "
                             f"{current.tolist()} tokens and can only shrink")
        return new
    longest = int(current.max()) if current.numel() else 0
    return current.clamp(max=crop_length(length, longest, who))


def write_rows(buf: Tensor, starts: Tensor, x: Tensor, counts: Tensor) -> None:
    """buf[b, :, starts[b] : starts[b] + counts[b]] = x[b, :, :counts[b]] for every row b,
    in one slice write when all rows start together and write all of x."""
    n = x.shape[2]
    if bool((starts == starts[0]).all()) and bool((counts == n).all()):
        s = int(starts[0])
        buf[:, :, s:s + n] = x
        return
    for b, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
        if c:
            buf[b, :, s:s + c] = x[b, :, :c]


def tail_rows(x: Tensor, lengths: Tensor, keep: Tensor) -> Tensor:
    """(B, h, max(keep), D): row b's last ``keep[b]`` of its first ``lengths[b]`` positions,
    left-aligned, zeros after."""
    out = x.new_zeros(x.shape[0], x.shape[1], int(keep.max()) if keep.numel() else 0, x.shape[3])
    for b, (n, k) in enumerate(zip(lengths.tolist(), keep.tolist())):
        if k:
            out[b, :, :k] = x[b, :, n - k:n]
    return out
