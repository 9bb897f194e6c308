"""The core engine's targets, measured in one run against torch SDPA (float32, B=1, H=8, D=64).

    python benchmarks/core_bench.py            # all targets
    python benchmarks/core_bench.py --quick    # smaller sizes, a smoke run

* dense, n = 2048 and 4096: attnkit (auto) within 1.05x of torch SDPA's time, the tiled
  engine (``backend="chunked"``) within 1.6x and at >= 90 useful GFLOP/s;
* causal forward, n = 16384, chunked: peak memory growth < 600 MiB (also with 4 heads);
* causal forward + backward, n = 8192, chunked (and torch SDPA beside it): peak memory
  growth < 400 MiB.

--quick: dense at 1024 and 2048, causal at 4096, forward + backward at 2048. Measured by
``attnkit.bench`` (interleaved timing, peak RSS growth of one call in a worker process;
methods: benchmarks/README.md); options: ``--help``.
"""

from __future__ import annotations

from dataclasses import replace

from attnkit.bench import script
from attnkit.bench.builders import plain_setup
from attnkit.bench.cases import case_by_name
from attnkit.bench.targets import TARGETS

DENSE, CAUSAL, TRAIN = (case_by_name(name) for name in ("dense", "causal", "causal_train"))

CASES = (
    replace(DENSE, lengths=(2048, 4096), quick_lengths=(1024, 2048),
            variants=DENSE.pick("attnkit", "attnkit chunked", "torch sdpa")),
    replace(CAUSAL, lengths=(16384,), quick_lengths=(4096,),
            variants=CAUSAL.pick("attnkit chunked")),
    replace(CAUSAL, name="causal_h4", title="causal, 4 heads", heads=4,
            make=plain_setup(causal=True, heads=4), lengths=(16384,), quick_lengths=(4096,),
            variants=CAUSAL.pick("attnkit chunked")),
    replace(TRAIN, lengths=(8192,), quick_lengths=(2048,),
            variants=TRAIN.pick("attnkit chunked", "torch sdpa")),
)
TARGETS = tuple(t for t in TARGETS if t.case in {c.name for c in CASES})

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
