"""Which backend runs a call: each backend declares what it cannot do, and ``auto``
chooses among the ones left, saying why.

A call is described once, as a :class:`Problem` (shapes, dtype, the normalised mask and
bias, what is asked back). Each backend module declares ``not_supported_reasons(problem)``
(xFormers' convention): an empty list means it can run the call exactly. ``auto``
considers torch SDPA and the tiled engine (the reference is the teacher, FlexAttention
compiles on first use: both only when asked by name) and weighs what each would pay:

* torch SDPA computes every score entry, plus building a dense mask from a mask object;
* the tiled engine computes the tiles the mask allows (:func:`chunked.planned_entries`,
  read from the mask's block states), at a higher cost per entry.

:func:`choose` returns a :class:`Choice` whose ``str`` is the explanation
(``attnkit.explain`` prints it for a call without running it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..bias import Bias, TensorBias
from ..dtypes import matmul_dtype
from ..masks import EMPTY, AndMask, CausalMask, Grid, Mask, OrMask, PaddingMask, TensorMask
from . import chunked, flex, reference, torch_sdpa

__all__ = ["Problem", "Choice", "choose", "not_supported_reasons", "allowed_fraction",
           "AUTO_CANDIDATES"]

#: the largest dense (mask or bias) tensor ``auto`` builds to hand an object to torch SDPA
DENSE_MASK_LIMIT = 1 << 24
#: below this many score entries a dense mask or bias is always cheap enough for torch
SMALL_GRID = 1 << 18
#: what one score entry costs, in units of an entry of torch's dense kernel (float32, CPU;
#: medians over the sparse cases of benchmarks/auto_bench.py): torch SDPA given a dense
#: mask, and the tiled engine evaluating a mask object on the tiles it computes
TORCH_MASKED_ENTRY = 1.4
ENGINE_ENTRY = 2.6
#: the block size :func:`allowed_fraction` reads the mask at
DENSITY_TILE = 128
#: the backends ``auto`` chooses from
AUTO_CANDIDATES = ("torch", "chunked")


@dataclass(frozen=True)
class Problem:
    """One call, as the backends see it: (B, Hq, L, D) queries against (B, Hkv, S, D)
    keys and (B, Hkv, S, Dv) values, one mask and one bias object (or None)."""
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    Dv: int
    dtype: torch.dtype
    device: torch.device
    mask: Mask | None
    bias: Bias | None
    grid: Grid
    dropout_p: float = 0.0
    softcap: float | None = None
    sinks: bool = False
    return_weights: bool = False
    return_lse: bool = False
    needs_grad: bool = False


def not_supported_reasons(backend: str, p: Problem) -> list[str]:
    """Why ``backend`` cannot run this call exactly (empty: it can)."""
    module = {"reference": reference, "chunked": chunked, "torch": torch_sdpa,
              "flex": flex}[backend]
    return module.not_supported_reasons(p)


@dataclass
class Choice:
    """The backend a call runs on, why, and why the others were not taken."""
    backend: str
    reason: str
    asked: str = "auto"
    rejected: dict = field(default_factory=dict)

    def __str__(self):
        how = "chosen by auto" if self.asked == "auto" else "asked for"
        lines = [f"backend: {self.backend} ({how}): {self.reason}"]
        for name, reasons in self.rejected.items():
            lines.append(f"  {name}: cannot run this call: {'; '.join(reasons)}")
        return "\n".join(lines)


def choose(p: Problem, backend: str = "auto") -> Choice:
    """The backend for ``p``; a named one that cannot run it raises NotImplementedError
    with its reasons."""
    if backend != "auto":
        reasons = not_supported_reasons(backend, p)
        if reasons:
            raise NotImplementedError(f"backend={backend!r} cannot honour {reasons[0]}; "
                                      f"use backend='auto' or 'chunked'")
        return Choice(backend, "named by the caller", backend)
    rejected = {}
    for name in AUTO_CANDIDATES:
        reasons = not_supported_reasons(name, p)
        if reasons:
            rejected[name] = reasons
    if "torch" in rejected:
        name, reason = "chunked", "the only candidate that can run it"
    else:
        name, reason = _weigh(p)
    if matmul_dtype(p.dtype, p.device) != p.dtype:
        reason += (f"; computed on float32 copies: this CPU multiplies {str(p.dtype)[6:]} "
                   f"slowly")
    return Choice(name, reason, rejected=rejected)


def _weigh(p: Problem) -> tuple[str, str]:
    """torch SDPA or the tiled engine, for a call both can run, with the reason."""
    mask, bias, L, S = p.mask, p.bias, p.L, p.S
    dense_bias = bias is None or isinstance(bias, TensorBias)
    if p.needs_grad and torch_sdpa.saturated_rows(bias):
        return "chunked", ("rows masked with finfo.min: torch's fused backward cannot "
                           "recompute them, the tiled engine can (in linear memory)")
    if dense_bias and (mask is None or isinstance(mask, TensorMask)):
        return "torch", "dense inputs: torch's fused kernel computes every entry anyway"
    if isinstance(mask, CausalMask) and L == S and bias is None:
        return "torch", "square causal: torch's own causal kernel skips the upper triangle"
    if dense_bias and _only_dense_leaves(mask):
        return "torch", "the mask is dense or padding: torch gets it as one tensor"
    if bias is None and mask.residue_classes() is not None and p.grid.affine:
        return "chunked", ("a dilated mask runs as sliding windows on strided views; "
                           "its dense form costs more to build than to skip")
    size = max(_dense_size(mask, p.B, p.Hq, L, S), _bias_size(bias, p.B, p.Hq, L, S))
    if size > DENSE_MASK_LIMIT:
        return "chunked", f"its dense form would hold {size} entries (> {DENSE_MASK_LIMIT})"
    if L * S <= SMALL_GRID:
        return "torch", f"{L} x {S} is small: building the dense form is cheap"
    if not dense_bias:
        return "chunked", (f"{type(bias).__name__} is evaluated tile by tile (equal tiles "
                           f"once); torch would need it as a dense (L, S) tensor")
    share = chunked.planned_entries(mask, p.grid) / (L * S)
    engine = share * ENGINE_ENTRY
    verdict = "chunked" if engine < TORCH_MASKED_ENTRY else "torch"
    return verdict, (f"the tiled engine computes {share:.0%} of the entries: estimated "
                     f"cost {engine:.2f} against torch with the dense mask "
                     f"{TORCH_MASKED_ENTRY:.2f} (dense-kernel units)")


def allowed_fraction(mask: Mask, L: int, S: int, tile: int = DENSITY_TILE,
                     grid: Grid | None = None) -> float:
    """Share of the (tile x tile) blocks of the (L, S) score grid that ``mask`` does not
    rule out (in any batch element or head), read from ``block_states`` without drawing
    the mask."""
    grid = Grid(L, S) if grid is None else grid
    r = torch.arange(0, L, tile)
    k = torch.arange(0, S, tile)
    states = mask.block_states(grid, r.view(-1, 1), (r + tile).clamp(max=L).view(-1, 1),
                               k.view(1, -1), (k + tile).clamp(max=S).view(1, -1))
    states = states.reshape(-1, *states.shape[-2:]).amax(0)
    return float((states != EMPTY).float().mean())


def _dense_size(mask: Mask | None, B: int, H: int, L: int, S: int) -> int:
    """Number of entries torch SDPA would receive if this mask were materialised."""
    if mask is None:
        return 0
    if isinstance(mask, PaddingMask):
        return (B if mask.batch_size else 1) * L * S
    if isinstance(mask, TensorMask):
        return mask.mask.numel()
    if isinstance(mask, (AndMask, OrMask)):
        return max(_dense_size(mask.a, B, H, L, S), _dense_size(mask.b, B, H, L, S),
                   (B if mask.batch_size else 1) * L * S)
    return (B if mask.batch_size else 1) * (H if mask.num_heads else 1) * L * S


def _bias_size(bias: Bias | None, B: int, H: int, L: int, S: int) -> int:
    """Number of entries of the dense bias torch SDPA would receive."""
    if bias is None or isinstance(bias, TensorBias):
        return 0
    return (B if bias.batch_size else 1) * (H if bias.num_heads else 1) * L * S


def _only_dense_leaves(mask) -> bool:
    if isinstance(mask, (AndMask, OrMask)):
        return _only_dense_leaves(mask.a) and _only_dense_leaves(mask.b)
    return isinstance(mask, (TensorMask, PaddingMask))
