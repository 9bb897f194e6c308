"""Does ``backend="auto"`` pick well? Every functional case of ``attnkit bench``, run on
each backend ``auto`` could have chosen, in one run (float32, B=1 unless the case says,
H=8, D=64, forward).

    python benchmarks/auto_bench.py            # n = 512 ... 4096
    python benchmarks/auto_bench.py --quick    # n = 512 and 1024, one thread

Rows per case and length: ``attnkit`` (auto), ``reference`` (the textbook formula, up to
n = 2048), ``chunked`` (the tiled engine) and ``torch`` (torch SDPA, a mask or bias object
made dense first: building it is part of the call, as it is when auto picks it). Target:
auto's time within 1.25x of the fastest of the three. ``attnkit.explain(q, k, v, ...)``
prints auto's choice and reasons for one call.

Measured by ``attnkit.bench`` (interleaved timing, peak RSS growth of one call in a
worker process; methods: benchmarks/README.md); options: ``--help``.
"""

from __future__ import annotations

from dataclasses import replace

from attnkit.bench import script
from attnkit.bench.builders import attnkit_sdpa
from attnkit.bench.cases import AUTO, case_by_name
from attnkit.bench.spec import Variant, scores_bytes
from attnkit.bench.targets import Target

LENGTHS, QUICK_LENGTHS = (512, 1024, 2048, 4096), (512, 1024)
NAMES = ("dense", "causal", "padding", "gqa", "mqa", "alibi", "t5", "sliding_window",
         "dilated", "longformer", "bigbird")
#: auto's candidates and the teacher, each run by name
BACKENDS = (
    Variant("reference", "attnkit", attnkit_sdpa("reference"), work="dense",
            mem=scores_bytes(3, batch=2), max_length=2048),
    Variant("chunked", "attnkit", attnkit_sdpa("chunked")),
    Variant("torch", "attnkit", attnkit_sdpa("torch"), work="dense",
            mem=scores_bytes(1.05, batch=2)),
)
WITHIN = 1.25

CASES = tuple(replace(case_by_name(name), lengths=LENGTHS, quick_lengths=QUICK_LENGTHS,
                      variants=(AUTO, *BACKENDS)) for name in NAMES)
TARGETS = tuple(Target(14, case.name, n, "attnkit", "within_best", WITHIN,
                       "|".join(v.label for v in BACKENDS))
                for case in CASES for n in LENGTHS)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
