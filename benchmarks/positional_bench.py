"""Positional biases' targets: ALiBi and T5 relative bias through the chunked engine at
L = S = 8192, H = 8, D = 64, float32, B = 1, forward.

    python benchmarks/positional_bench.py            # the targets (L = 8192)
    python benchmarks/positional_bench.py --quick    # L = 2048, a smoke run
    python benchmarks/positional_bench.py --profile  # also: where the chunked time goes

Cases: ``alibi`` (bidirectional), ``alibi_causal``, ``t5`` (bidirectional, scale 1), each
attnkit's tiled engine (``backend="chunked"``, the bias object evaluated per tile)
against torch SDPA given the precomputed dense float bias (-inf where causal masks).
Targets: peak memory growth < 400 MiB (a dense float32 bias alone is H * L * S * 4 bytes
= 2 GiB), and time within 1.5x of torch SDPA with the dense bias. Building the dense
bias is the peer's setup: not in its time, in its memory.

Measured by ``attnkit.bench`` (interleaved timing, peak RSS growth of one call in a
worker process; methods: benchmarks/README.md); options: ``--help``.
"""

from __future__ import annotations

from attnkit.bench import peers, script
from attnkit.bench.builders import alibi_setup, t5_setup
from attnkit.bench.cases import CHUNKED
from attnkit.bench.spec import Case, Variant, scores_bytes
from attnkit.bench.targets import Target

L, QUICK_L = 8192, 2048
DENSE_BIAS = Variant("sdpa+bias", "peer", peers.torch_sdpa_biased, work="dense",
                     mem=scores_bytes(1.05))


def _case(name, title, make, causal=False):
    return Case(name, title, make, variants=(CHUNKED, DENSE_BIAS), causal=causal,
                lengths=(L,), quick_lengths=(QUICK_L,))


CASES = (
    _case("alibi", "ALiBi bias, bidirectional", alibi_setup(causal=False)),
    _case("alibi_causal", "ALiBi bias, causal", alibi_setup(causal=True), causal=True),
    _case("t5", "T5 relative bias, bidirectional (scale 1)", t5_setup),
)
TARGETS = tuple(t for c in CASES for t in (
    Target(3, c.name, L, "attnkit chunked", "growth_mib", 400),
    Target(3, c.name, L, "attnkit chunked", "within", 1.5, "sdpa+bias")))

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
