"""The long-sequence layers' targets, measured in one run (float32, B=1, H=8, D=64,
d_model=512).

    python benchmarks/long_bench.py              # everything below
    python benchmarks/long_bench.py --quick      # n=2048 vs HF, memory at 4096/8192 only
    python benchmarks/long_bench.py --profile    # also: where the time goes (torch.profiler)

* ``longformer``: LongformerAttention vs HF LongformerSelfAttention at 4096 tokens
  (attention window 512, i.e. +-256, the first 16 tokens global): time and peak memory.
  Target >= 4x faster with lower peak memory.
* ``bigbird``: BigBirdAttention vs HF BigBirdBlockSparseAttention at 4096 tokens (block
  64, 3 random blocks, eval), both attnkit patterns: "attnkit layer" (the generic seeded
  per-head pattern) and "attnkit layer hf" (HF's exact layout). Target >= 3x faster.
* Both layers alone at n = 8192, 16384, 32768. Target: peak memory roughly doubling per
  step, < 1.5 GiB at 32768.

Measured by ``attnkit.bench`` (interleaved timing with CPU time beside wall time, peak
RSS growth of one call in a worker process; useful GFLOP/s count the entries the mask
allows; methods: benchmarks/README.md); options: ``--help``. The HF layers need
transformers (otherwise their rows are skipped).
"""

from __future__ import annotations

from dataclasses import replace

from attnkit.bench import script
from attnkit.bench.builders import attnkit_bigbird_layer
from attnkit.bench.cases import case_by_name
from attnkit.bench.spec import Variant
from attnkit.bench.targets import Target

COMPARE, QUICK_COMPARE = 4096, 2048
LENGTHS = (COMPARE, 8192, 16384, 32768)
QUICK_LENGTHS = (QUICK_COMPARE, 4096, 8192)
LONGFORMER, BIGBIRD = case_by_name("longformer_layer"), case_by_name("bigbird_layer")


def _peer(variant):
    """HF's layer at the comparison length only."""
    return replace(variant, lengths=(COMPARE,), quick_lengths=(QUICK_COMPARE,))


CASES = (
    replace(LONGFORMER, name="longformer", lengths=LENGTHS, quick_lengths=QUICK_LENGTHS,
            variants=(LONGFORMER.pick("attnkit layer")
                      + tuple(_peer(v) for v in LONGFORMER.pick("hf Longformer")))),
    replace(BIGBIRD, name="bigbird", lengths=LENGTHS, quick_lengths=QUICK_LENGTHS,
            variants=(BIGBIRD.pick("attnkit layer")
                      + (Variant("attnkit layer hf", "attnkit", attnkit_bigbird_layer("hf")),)
                      + tuple(_peer(v) for v in BIGBIRD.pick("hf BigBird")))),
)


def _memory_targets(case, variant):
    return (Target(4, case, 16384, variant, "mem_linear", 2.6),
            Target(4, case, 32768, variant, "mem_linear", 2.6),
            Target(4, case, 32768, variant, "mem_mib", 1536))


TARGETS = (
    Target(4, "longformer", COMPARE, "attnkit layer", "speedup", 4, "hf Longformer"),
    Target(4, "longformer", COMPARE, "attnkit layer", "mem_below", 0, "hf Longformer"),
    *_memory_targets("longformer", "attnkit layer"),
    Target(4, "bigbird", COMPARE, "attnkit layer", "speedup", 3, "hf BigBird"),
    Target(4, "bigbird", COMPARE, "attnkit layer hf", "speedup", 3, "hf BigBird"),
    *_memory_targets("bigbird", "attnkit layer"),
    *_memory_targets("bigbird", "attnkit layer hf"),
)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__, cpu_time=True))
