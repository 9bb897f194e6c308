"""What a benchmark case is: a :class:`Case` (inputs at each length, the implementations to
compare) made of :class:`Variant` s, each turning a :class:`Setup` into a zero-argument call.

Useful work: a forward pass does ``4 * head_dim`` flops for each *allowed* score entry
(two multiply-adds in Q K^T and in P V); a training step (forward + backward) counts three
times that. Allowed entries are counted from the mask's block structure — whole blocks
the mask allows or rules out are counted from their area, and only boundary blocks are
evaluated — so a 32k x 32k mask is never materialised.

Optional packages. A variant (or case) may name third-party modules it needs in
``needs``: transformers, or torch's FlexAttention. When one is not installed the row is
reported as skipped with the reason. attnkit's own modules are never gated: they are
imported directly, so a broken import is an error, not a skipped row.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import masks as M
from ..masks import EMPTY, FULL, Grid
from ..masks.grid import as_4d

__all__ = ["Setup", "Variant", "Case", "Suite", "count_allowed", "missing_optional", "OPTIONAL",
           "scores_bytes", "mask_bytes", "H", "D", "FULL_LENGTHS", "QUICK_LENGTHS", "DTYPES",
           "cast"]

#: heads and head dim of the cases unless a case says otherwise
H, D = 8, 64
FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (512,)

#: the dtypes a run measures in (``--dtype``): inputs, modules and peers all in it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: the optional third-party modules a variant may need (module name prefixes), and how
#: a user gets each
OPTIONAL = {
    "transformers": "transformers not installed (pip install attnkit[hf])",
    "torch.nn.attention.flex_attention": "FlexAttention not in this torch",
}


def _check_needs(owner: str, needs) -> None:
    for need in needs:
        module = need.partition(":")[0]
        if not any(module == p or module.startswith(p + ".") for p in OPTIONAL):
            raise ValueError(f"{owner}: needs={need!r} is not an optional package "
                             f"({', '.join(OPTIONAL)}); import attnkit's own modules "
                             f"directly so that a broken import fails loudly")


@dataclass
class Setup:
    """One case at one length: query (B, H, n, D), key/value (B, Hkv, n, D), the mask
    and bias objects, and anything else the case's variants need (``extra``)."""
    n: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: M.Mask | None = None
    is_causal: bool = False
    bias: object = None
    scale: float | None = None
    extra: dict = field(default_factory=dict)
    softcap: float | None = None


@dataclass(frozen=True)
class Variant:
    """One way of computing a case.

    ``work``: "dense" when its cost is the full L x S whatever the mask ("causal" when it
    skips the upper triangle), "sparse" when it follows the allowed entries; used with
    ``mem`` (estimated bytes beyond the inputs) to skip sizes that cannot fit the budget.
    """
    label: str
    role: str                                   # "attnkit" or "peer"
    build: Callable[[Setup], Callable]
    needs: tuple = ()                           # optional packages: "module[:attribute]"
    work: str = "sparse"
    mem: Callable[[int], float] = lambda n: 0.0
    max_length: int | None = None               # longest length it is run at
    lengths: tuple | None = None                # full run: only these lengths
    quick_lengths: tuple | None = None          # --quick: only these lengths
    quick: bool = True                          # run in --quick
    compiled: bool = False
    #: imported (or, for "module:function", called) once per worker before the first
    #: measurement, so one-off imports are not counted as setup time and memory
    preload: tuple = ()

    def __post_init__(self):
        _check_needs(f"variant {self.label!r}", self.needs)

    def runs_at(self, n: int, quick: bool) -> bool:
        """Whether the plan includes this variant at length n (before any budget)."""
        if quick:
            return self.quick and (self.quick_lengths is None or n in self.quick_lengths)
        return self.lengths is None or n in self.lengths


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, torch.nn.Module):
        return x.to(dtype)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def cast(setup: Setup, dtype: torch.dtype) -> Setup:
    """The setup with its float tensors and modules in ``dtype`` (the builders then make
    layers and models in the dtype of the inputs they are given)."""
    if dtype == torch.float32:
        return setup
    return Setup(setup.n, _cast(setup.q, dtype), _cast(setup.k, dtype), _cast(setup.v, dtype),
                 setup.mask, setup.is_causal, setup.bias, setup.scale,
                 _cast(setup.extra, dtype), setup.softcap)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    make: Callable[[int], Setup]
    variants: tuple
    lengths: tuple = FULL_LENGTHS
    quick_lengths: tuple = QUICK_LENGTHS
    batch: int = 1
    heads: int = H
    head_dim: int = D
    layers: int = 1              # attention layers per call (a whole model: its depth)
    mask: Callable[[int], M.Mask | None] = lambda n: None   # for counting allowed entries
    causal: bool = False
    kind: str = "forward"        # forward | train | decode | layer
    steps: int = 1               # decoding: tokens per call
    needs: tuple = ()
    note: str = ""

    def __post_init__(self):
        _check_needs(f"case {self.name!r}", self.needs)

    def entries(self, n: int) -> int:
        """Allowed score entries of one call (decoding: of one token), all layers."""
        return _entries(self, n) * self.layers

    def useful_flops(self, n: int) -> float:
        factor = 12 if self.kind == "train" else 4
        return factor * self.head_dim * self.entries(n)

    def pick(self, *labels: str) -> tuple:
        """The variants with these labels, in that order (KeyError if one is absent)."""
        by_label = {v.label: v for v in self.variants}
        return tuple(by_label[label] for label in labels)


@dataclass(frozen=True)
class Suite:
    """What one run measures: its cases, the targets checked after it, and where a
    worker process finds the cases again (``source``: ``"module:attribute"`` or
    ``"/path/to/script.py:attribute"``). ``cpu_time``: the table notes each row's CPU
    time and the speedups in CPU time (steadier than wall time on a loaded machine when
    torch runs one thread)."""
    name: str
    cases: tuple
    targets: tuple = ()
    source: str = "attnkit.bench.cases:CASES"
    cpu_time: bool = False

    def __post_init__(self):
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: case names repeat: {names}")


@functools.lru_cache(maxsize=None)
def _entries(case: Case, n: int) -> int:
    if case.kind == "decode":
        return case.batch * case.heads * n
    mask = case.mask(n)
    if case.causal:
        mask = M.causal() if mask is None else M.causal() & mask
    return count_allowed(mask, n, n, case.batch, case.heads)


def _count_band(mask, L: int, S: int, heads: int) -> int:
    """Rows of a band (causal, sliding or dilated window) counted in closed form: row p
    sees keys p + t * d for t in [-left, right] that fall inside [0, S)."""
    p = torch.arange(S - L, S, dtype=torch.long).view(1, -1)
    if isinstance(mask, M.CausalMask):
        return heads * int((p + 1).clamp(0, S).sum())
    if isinstance(mask, M.SlidingWindowMask):
        d = torch.ones(1, 1, dtype=torch.long)
    else:
        d = mask.dilation.view(-1, 1)
    t_lo = torch.maximum(torch.full_like(p, -mask.left), -torch.div(p, d, rounding_mode="floor"))
    t_hi = torch.minimum(torch.full_like(p, mask.right),
                         torch.div(S - 1 - p, d, rounding_mode="floor"))
    per_head = (t_hi - t_lo + 1).clamp(min=0).sum(-1)
    return int(per_head.sum()) * (heads // per_head.numel())


def count_allowed(mask: M.Mask | None, L: int, S: int, batch: int, heads: int,
                  block: int | None = None) -> int:
    """Entries (b, h, i, j) the mask allows: bands in closed form, anything else from
    block states (whole blocks by area) plus the exact count of boundary blocks."""
    if mask is None:
        return batch * heads * L * S
    if type(mask) in (M.CausalMask, M.SlidingWindowMask, M.DilatedMask):
        return batch * _count_band(mask, L, S, heads)
    if type(mask) is M.PaddingMask:
        return int(mask.lengths.clamp(0, S).sum()) * (batch // mask.batch_size) * heads * L
    if block is None:  # a block-sparse mask's own blocks are never partial
        bs = mask.tile_hint
        block = bs if bs and 16 <= bs <= 512 else 128
    grid = Grid(L, S)
    off = grid.q_offset
    # row blocks cut where positions cross multiples of the block (the mask's own blocks)
    cuts = (m * block - off for m in range(off // block + 1, (off + L - 1) // block + 1))
    qb = [0] + [r for r in cuts if 0 < r < L] + [L]
    kb = list(range(0, S, block)) + [S]
    q_lo = torch.tensor(qb[:-1]).view(-1, 1)
    q_hi = torch.tensor(qb[1:]).view(-1, 1)
    k_lo = torch.tensor(kb[:-1]).view(1, -1)
    k_hi = torch.tensor(kb[1:]).view(1, -1)
    st = as_4d(mask.block_states(grid, q_lo, q_hi, k_lo, k_hi))
    bm = mask.batch_size or 1
    hm = mask.num_heads or 1
    st = st.expand(bm, hm, len(qb) - 1, len(kb) - 1)
    area = (q_hi - q_lo) * (k_hi - k_lo)
    total = int(((st == FULL).long() * area).sum())
    partial = ((st != FULL) & (st != EMPTY))
    for i, j in partial.any(0).any(0).nonzero().tolist():
        t = as_4d(mask.tile(grid, qb[i], qb[i + 1], kb[j], kb[j + 1]))
        t = t.expand(bm, hm, qb[i + 1] - qb[i], kb[j + 1] - kb[j])
        total += int((t.sum((-1, -2)) * partial[:, :, i, j]).sum())
    return total * (batch // bm) * (heads // hm)


def missing_optional(needs, *, import_transformers: bool = True) -> str | None:
    """Why an optional package the variant needs is missing (the note of its skipped
    row), or None when all are there. With ``import_transformers=False`` transformers'
    modules are only looked up, not imported (the parent process stays light)."""
    for need in needs:
        module, _, attr = need.partition(":")
        root = next(p for p in OPTIONAL if module == p or module.startswith(p + "."))
        if importlib.util.find_spec(root.split(".")[0]) is None:
            return OPTIONAL[root]
        if root == "transformers" and not import_transformers:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            return f"{OPTIONAL[root]} ({module}: {e.__class__.__name__})"
        if attr and not hasattr(mod, attr):
            return f"{OPTIONAL[root]} ({module}.{attr} missing)"
    return None


# --------------------------------------------------------------------------- memory estimates

def scores_bytes(copies: float, batch: int = 1, heads: int = H):
    """A dense implementation holding ``copies`` float32 (B, H, n, n) tensors."""
    return lambda n: copies * 4 * batch * heads * n * n


def mask_bytes(per_head: bool = False):
    """A materialised mask (1 byte) that torch converts to float (4 bytes) per call."""
    return lambda n: (H if per_head else 1) * n * n * (4 + (4 if per_head else 5))
