"""The full sweep behind the README's "Performance" section.

    python benchmarks/run_full.py                      # everything, ~15-20 min on 2 cores
    python benchmarks/run_full.py --cases sliding_window,bigbird
    python benchmarks/run_full.py --with-ring          # also benchmarks/ring_bench.py
    python benchmarks/run_full.py --quick --out /tmp/bench   # the smoke sizes
    python benchmarks/run_full.py --dtype bfloat16     # every case in bf16: full-bfloat16.*

It is ``attnkit bench`` (same cases, same measurement) with the outputs kept in
``benchmarks/results/``: ``full.json`` (every figure and the machine), ``full.png``
(time and memory versus length), ``full.txt`` (the terminal table), ``full.md`` (every
attnkit row as Markdown) and ``full-readme.md`` (4k and 16k only, for the README).
Methods: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

from attnkit.bench import run
from attnkit.bench.cases import CASES
from attnkit.bench.report import format_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
#: the lengths shown in the README's condensed table (full.md has them all)
README_LENGTHS = (4096, 16384)


class _Tee(io.TextIOBase):
    """Print to the terminal and keep a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        self.copy.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()


def ring_figures(out: dict, quick: bool) -> None:
    """The ring benchmark (its own processes, 4 gloo ranks), added under "ring", and its
    targets beside the others'."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ring.json")
        cmd = [sys.executable, os.path.join(HERE, "ring_bench.py"), "--json", path]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            out["ring"] = {"status": "failed", "note": proc.stderr.strip().splitlines()[-1:]}
            return
        with open(path) as f:
            ring = out["ring"] = json.load(f)
    n = ring["config"]["length"]
    checks = [("memory_forward", "ring rank peak RSS growth / single process (forward)", 0.35),
              ("memory_train", "ring rank peak RSS growth / single process (train)", 0.35),
              ("overlap_ratio", "ring time / same computations without communication", 1.3)]
    for key, text, limit in checks:
        value = _memory_ratio(ring.get(key)) if key.startswith("memory") else ring.get(key)
        status = "n/a" if value is None else ("met" if value <= limit else "missed")
        out.setdefault("targets", []).append(
            {"issue": 8, "case": "ring", "n": n, "variant": "ring rank", "peer": None,
             "kind": "within", "threshold": limit, "text": f"{text} <= {limit:g}",
             "measured": value, "status": status, "why": "not measured"})


def _memory_ratio(section) -> float | None:
    """Largest rank's peak RSS growth over the single process's (ring_bench.py's JSON)."""
    if not section:
        return None
    if "ratio" in section:
        return section["ratio"]
    single, ranks = section.get("single"), section.get("ranks")
    if isinstance(single, dict) and "rss" in single and ranks:
        return max(r["rss"] for r in ranks) / single["rss"]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None,
                   help="comma-separated case names (default: all): "
                        + ", ".join(c.name for c in CASES))
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for full.json, full.png, full.txt, full.md")
    p.add_argument("--with-ring", action="store_true",
                   help="also run benchmarks/ring_bench.py and add its figures and targets")
    p.add_argument("--quick", action="store_true", help="the --quick sizes (a smoke run)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the run's dtype; results other than float32 are named full-<dtype>.*")
    a = p.parse_args(argv)
    cases = None
    if a.cases:
        cases = [c.strip() for c in a.cases.split(",") if c.strip()]
        unknown = set(cases) - {c.name for c in CASES}
        if unknown:
            p.error(f"unknown cases: {', '.join(sorted(unknown))}")
    os.makedirs(a.out, exist_ok=True)
    stem = ("quick" if a.quick else "full") + ("" if a.dtype == "float32" else f"-{a.dtype}")
    json_path = os.path.join(a.out, f"{stem}.json")
    tee = _Tee(sys.stdout)
    code = run(quick=a.quick, json_path=json_path, plot_path=os.path.join(a.out, f"{stem}.png"),
               cases=cases, stream=tee, dtype=a.dtype)
    with open(json_path) as f:
        report = json.load(f)
    if a.with_ring:
        ring_figures(report, a.quick)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    with open(os.path.join(a.out, f"{stem}.txt"), "w") as f:
        f.write(tee.copy.getvalue())
    with open(os.path.join(a.out, f"{stem}.md"), "w") as f:
        f.write(format_markdown(report) + "\n")
    with open(os.path.join(a.out, f"{stem}-readme.md"), "w") as f:
        f.write(format_markdown(report, lengths=README_LENGTHS) + "\n")
    print(f"results in {a.out}/{stem}.{{json,png,txt,md}} and {stem}-readme.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
