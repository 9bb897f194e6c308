"""What additive attention costs: Bahdanau's score against dot-product attention at the
same sizes, in one run.

    python benchmarks/additive_bench.py            # 512, 1024, 2048 tokens
    python benchmarks/additive_bench.py --quick    # 256, one thread

One sentence (batch 1) of n queries over n keys, width 64, values = keys, forward only:

* ``additive``: :class:`attnkit.layers.AdditiveAttention` (64, 64, hidden 64), scores
  ``v^T tanh(W_q q_i + W_k k_j)``, weights returned;
* ``luong general``: :class:`attnkit.layers.LuongAttention` ("general": ``q^T W k``),
  weights returned: one matrix multiply for the scores;
* ``torch sdpa``: torch's fused scaled dot-product kernel (no weights), the kernel
  additive attention cannot use.

Additive needs an (n, n, hidden) tanh tensor (in blocks of 256 queries); the
dot-product scores are one GEMM. Measured by ``attnkit.bench`` (benchmarks/README.md).
"""

from __future__ import annotations

import torch

from attnkit.bench import script
from attnkit.bench.spec import Case, Setup, Variant
from attnkit.layers import AdditiveAttention, LuongAttention

WIDTH = 64


def _setup(n: int) -> Setup:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, WIDTH, generator=g)
    k = torch.randn(1, n, WIDTH, generator=g)
    return Setup(n, q[:, None], k[:, None], k[:, None], extra={"q": q, "k": k})


def _module_call(make):
    def build(s: Setup):
        torch.manual_seed(0)
        layer = make().eval().to(s.q.dtype)
        q, k = s.extra["q"], s.extra["k"]

        def call():
            with torch.no_grad():
                return layer(q, k)[0]
        return call
    return build


def torch_sdpa(s: Setup):
    def call():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(s.q, s.k, s.v, scale=1.0)
    return call


CASES = (
    Case("additive", "additive (Bahdanau) vs dot-product scores, width 64", _setup,
         lengths=(512, 1024, 2048), quick_lengths=(256,), heads=1, head_dim=WIDTH,
         variants=(Variant("additive", "attnkit",
                           _module_call(lambda: AdditiveAttention(WIDTH, WIDTH, WIDTH)),
                           work="dense", mem=lambda n: 256 * n * WIDTH * 4 * 2),
                   Variant("luong general", "attnkit",
                           _module_call(lambda: LuongAttention(WIDTH, WIDTH, "general")),
                           work="dense", mem=lambda n: n * n * 4 * 3),
                   Variant("torch sdpa", "peer", torch_sdpa, work="dense"))),
)
TARGETS = ()

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
