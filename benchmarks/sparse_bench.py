"""Sparse attention that chooses its own keys (#20): DeepSeek Sparse Attention's top-k
and Native Sparse Attention, in one run.

    python benchmarks/sparse_bench.py                 # 4096, 8192 and 16384 tokens
    python benchmarks/sparse_bench.py --quick         # 1024: a smoke run

* ``dsa``: attention of 8 query heads (d = 64) over one shared key/value head, the form
  DSA runs in (MLA absorbed: all heads read one latent), each query over its top 512
  keys (indices drawn from random causal scores in the setup, not timed).
  ``attnkit selected``: ``masks.selected(indices)`` with ``is_causal``, the kernel that
  gathers each row's keys. ``sdpa+dense mask``: what transformers' eager/SDPA path does,
  a (1, 1, n, n) bool mask scattered from the same indices (its build timed) and torch's
  SDPA (``enable_gqa``).
* ``nsa``: forward + backward of :class:`attnkit.layers.NativeSparseAttention` (hidden
  512, 8 heads, 2 kv heads of 64, block 64, stride 16, 16 blocks, window 512), against
  a causal :class:`attnkit.MultiHeadAttention` layer of the same width.

Measured by ``attnkit.bench`` (benchmarks/README.md); options: ``--help``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit import MultiHeadAttention, masks, scaled_dot_product_attention
from attnkit.bench import script
from attnkit.bench.spec import Case, Setup, Variant
from attnkit.bench.targets import Target
from attnkit.layers import NativeSparseAttention

TOPK, HEADS, DIM, HIDDEN = 512, 8, 64, 512


def _dsa_setup(n: int) -> Setup:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, DIM, generator=g)
    k, v = torch.randn(1, 1, n, DIM, generator=g), torch.randn(1, 1, n, DIM, generator=g)
    idx = torch.empty(1, 1, n, min(TOPK, n), dtype=torch.long)
    for r0 in range(0, n, 1024):  # top-k of random causal scores, 1024 rows at a time
        r1 = min(n, r0 + 1024)
        s = torch.rand(r1 - r0, n, generator=g)
        s = s.masked_fill(torch.arange(n) > torch.arange(r0, r1).view(-1, 1), -1.0)
        top = s.topk(idx.shape[-1], -1)
        idx[0, 0, r0:r1] = top.indices.masked_fill(top.values < 0, -1)
    return Setup(n, q, k, v, extra={"indices": idx})


def attnkit_selected(s: Setup):
    m = masks.selected(s.extra["indices"])

    def call():
        with torch.no_grad():
            return scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=m, is_causal=True)
    return call


def sdpa_dense_mask(s: Setup):
    idx, n = s.extra["indices"], s.n

    def call():
        with torch.no_grad():
            dense = torch.zeros(1, 1, n, n + 1, dtype=torch.bool)
            dense.scatter_(-1, torch.where(idx < 0, n, idx), True)
            return F.scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=dense[..., :n],
                                                  enable_gqa=True)
    return call


def _nsa_setup(n: int) -> Setup:
    x = torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(0))
    return Setup(n, x, x, x, extra={"x": x})


def _train(layer_of):
    def build(s: Setup):
        torch.manual_seed(0)
        layer = layer_of().to(s.extra["x"].dtype)
        x = s.extra["x"].clone().requires_grad_(True)

        def call():
            out = layer(x)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            return out
        return call
    return build


def _nsa():
    return NativeSparseAttention(HIDDEN, HEADS, 2, DIM)


class _CausalLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = MultiHeadAttention(HIDDEN, HEADS, 2)

    def forward(self, x):
        return self.inner(x, is_causal=True)[0]


CASES = (
    Case("dsa", f"DSA top-{TOPK}: 8 query heads over one latent head (d = {DIM}), causal",
         _dsa_setup, lengths=(4096, 8192, 16384), quick_lengths=(1024,), heads=HEADS,
         head_dim=DIM, mask=lambda n: masks.sliding_window(TOPK - 1, 0), causal=True,
         variants=(Variant("attnkit selected", "attnkit", attnkit_selected),
                   Variant("sdpa+dense mask", "peer", sdpa_dense_mask, work="dense",
                           mem=lambda n: 1.5 * n * n))),
    Case("nsa", "NSA layer forward + backward (hidden 512, 8 heads, 2 kv heads of 64)",
         _nsa_setup, kind="train", lengths=(4096, 8192, 16384), quick_lengths=(1024,),
         heads=HEADS, head_dim=DIM, causal=True,
         mask=lambda n: masks.sliding_window(16 * 64 + 512, 0),
         variants=(Variant("attnkit NSA", "attnkit", _train(_nsa)),
                   Variant("causal layer", "peer", _train(_CausalLayer)))),
)
TARGETS = (
    Target(20, "dsa", 8192, "attnkit selected", "mem_share", 0.10, "sdpa+dense mask"),
    Target(20, "dsa", 16384, "attnkit selected", "speedup", 1.5, "sdpa+dense mask"),
    Target(20, "nsa", 16384, "attnkit NSA", "per_token", 1.5, peer_n=4096),
    Target(20, "nsa", 16384, "attnkit NSA", "mem_linear", 2.6),
)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
