"""The command line of the focused benchmarks in ``benchmarks/``.

Each script there is a case list (module attribute ``CASES``) and the targets about it,
run through :func:`attnkit.bench.run`: the same worker processes, interleaved timing,
peak-memory measurement, table and JSON as ``attnkit bench``. The worker finds the cases
again by loading the script file. Options, the same for every script::

    --quick              the cases' quick lengths, one torch thread: a smoke run
    --cases A B | A,B    only these cases
    --repeats N          exactly N timed calls per implementation (alias --rounds)
    --threads N          torch threads per worker (1 steadies ratios on a busy machine)
    --dtype D            float32 (default), bfloat16 or float16: inputs, modules, peers
    --profile            also print where attnkit's time goes (torch.profiler), at each
                         case's first length
    --json FILE          every figure
    --plot FILE.png      time and memory versus length

    # benchmarks/example_bench.py
    from attnkit.bench import script
    CASES = (...)
    TARGETS = (...)
    if __name__ == "__main__":
        raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["parser", "main", "OPTIONS"]

#: the options :func:`parser` can add
OPTIONS = ("quick", "cases", "repeats", "threads", "dtype", "profile", "json", "plot")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser(doc: str, case_names=(), options=OPTIONS, quick_help: str | None = None
           ) -> argparse.ArgumentParser:
    """An argument parser with the shared options (those in ``options``); the first
    paragraph of ``doc`` is its description, the rest its epilog."""
    first, _, rest = (doc or "").strip().partition("\n\n")
    p = argparse.ArgumentParser(description=first, epilog=rest or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if "quick" in options:
        p.add_argument("--quick", action="store_true",
                       help=quick_help or "the quick lengths, one torch thread: a smoke run")
    if "cases" in options:
        p.add_argument("--cases", nargs="+", metavar="CASE",
                       help="only these cases (space- or comma-separated): "
                            + ", ".join(case_names))
    if "repeats" in options:
        p.add_argument("--repeats", "--rounds", type=_positive, metavar="N",
                       help="exactly N timed calls per implementation (default: until "
                            "each has its time budget of calls)")
    if "threads" in options:
        p.add_argument("--threads", type=_positive, metavar="N",
                       help="torch threads per worker (default: torch's choice, 1 with "
                            "--quick); 1 gives steadier ratios when other jobs share the cores")
    if "dtype" in options:
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="what inputs, modules and peers run in; GEMM shares are of this "
                            "dtype's peak (default: float32)")
    if "profile" in options:
        p.add_argument("--profile", action="store_true",
                       help="also print where attnkit's time goes (torch.profiler)")
    if "json" in options:
        p.add_argument("--json", metavar="FILE", help="write every figure to this file")
    if "plot" in options:
        p.add_argument("--plot", metavar="FILE.png", help="draw time and memory vs length")
    return p


def _case_list(values, known) -> list | None:
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown cases: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def main(script: str, cases, targets=(), *, doc: str = "", argv=None,
         cpu_time: bool = False, attribute: str = "CASES") -> int:
    """Parse the shared options and run ``cases`` (the script's module attribute
    ``attribute``) with ``targets``; returns the exit code."""
    from . import run
    from .spec import Suite

    names = [c.name for c in cases]
    args = parser(doc, names).parse_args(argv)
    path = os.path.abspath(script)
    name = f"benchmarks/{os.path.basename(path)}"
    suite = Suite(name, tuple(cases), tuple(targets), f"{path}:{attribute}", cpu_time)
    command = " ".join(["python", name, *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(quick=args.quick, json_path=args.json, plot_path=args.plot,
                   cases=_case_list(args.cases, names), suite=suite, threads=args.threads,
                   repeats=args.repeats, profile=args.profile, command=command,
                   dtype=args.dtype)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
