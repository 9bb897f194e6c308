"""The targets of ``attnkit.integrations.hf.patch(model)``, attention module against
attention module, measured in one run.

    python benchmarks/hf_patch_bench.py            # the targets below
    python benchmarks/hf_patch_bench.py --quick    # shorter inputs (1024 / 512 tokens)
    python benchmarks/hf_patch_bench.py --cases t5 t5-long

Each case builds one-layer transformers models (float32, batch 1, d_model 512, 8 heads of
64, random weights with initializer_range=0.2, eval mode), patches one of them, and calls
the attention module of layer 0 with exactly the arguments the model passes it:

* ``longformer``: ``LongformerSelfAttention`` (window 512, i.e. 256 each side, 16 global
  tokens) vs the patched ``AttnkitLongformerSelfAttention``, 4096 tokens.
  Target: >= 4x faster, lower peak memory.
* ``bigbird``: ``BigBirdBlockSparseAttention`` (block 64, 3 random blocks, eval plan) vs
  the patched ``AttnkitBigBirdBlockSparseAttention``, 4096 tokens.
  Target: >= 3x faster, lower peak memory.
* ``t5``: the first encoder layer's ``T5Attention`` (relative position bias + attention,
  no padding) under "sdpa" vs the patched ``AttnkitT5Attention``, 1024 tokens.
  Target: not slower. ``t5-long`` repeats it at 4096 tokens, where T5's dense
  (1, 8, L, L) bias alone is 512 MiB.

--quick: 1024 tokens (``t5``: 512). Measured by ``attnkit.bench`` (interleaved timing
with CPU time beside wall time, peak RSS growth of one call in a worker process; the
load average is in every row; methods: benchmarks/README.md); options: ``--help``.
Needs transformers (otherwise every row is skipped).
"""

from __future__ import annotations

from dataclasses import replace

from attnkit.bench import script
from attnkit.bench.cases import case_by_name
from attnkit.bench.targets import Target

LONGFORMER, BIGBIRD, T5 = (case_by_name(name) for name in
                           ("longformer_layer", "bigbird_layer", "t5_layer"))

CASES = (
    replace(LONGFORMER, name="longformer", lengths=(4096,), quick_lengths=(1024,),
            variants=LONGFORMER.pick("attnkit patched", "hf Longformer")),
    replace(BIGBIRD, name="bigbird", lengths=(4096,), quick_lengths=(1024,),
            variants=BIGBIRD.pick("attnkit patched", "hf BigBird")),
    replace(T5, name="t5", lengths=(1024,), quick_lengths=(512,),
            variants=T5.pick("attnkit patched", "hf t5 sdpa")),
    replace(T5, name="t5-long", lengths=(4096,), quick_lengths=(1024,),
            variants=T5.pick("attnkit patched", "hf t5 sdpa")),
)
TARGETS = (
    Target(5, "longformer", 4096, "attnkit patched", "speedup", 4, "hf Longformer"),
    Target(5, "longformer", 4096, "attnkit patched", "mem_below", 0, "hf Longformer"),
    Target(5, "bigbird", 4096, "attnkit patched", "speedup", 3, "hf BigBird"),
    Target(5, "bigbird", 4096, "attnkit patched", "mem_below", 0, "hf BigBird"),
    Target(5, "t5", 1024, "attnkit patched", "within", 1.0, "hf t5 sdpa"),
    Target(5, "t5-long", 4096, "attnkit patched", "within", 1.0, "hf t5 sdpa"),
)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__, cpu_time=True))
