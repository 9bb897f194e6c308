"""The ``attnkit`` command line: ``tour`` teaches, ``plot`` draws, ``bench`` measures.

Bad arguments exit with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"attnkit: error: {message}\n")


def _mask_help() -> str:
    """The epilog of ``attnkit plot --help``: every mask with its parameters and
    defaults, read from the same table the parser uses."""
    from .viz.specs import MASK_KINDS
    width = max(map(len, MASK_KINDS))
    lines = ["masks and their parameters (defaults scale with --length):"]
    for name, (_, _, text) in MASK_KINDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    lines += ["", "examples:",
              "  attnkit plot causal sliding_window:left=8,right=0 --out masks.png",
              "  attnkit plot 'global:indices=0+31|sliding_window:left=4' --length 128 "
              "--out longformer.png",
              "each panel is titled with its parameters written out, defaults included."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="attnkit", description="Attention mechanisms, computed for real.")
    p.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("tour", help="walk through attention step by step with real numbers")
    t.add_argument("--lang", choices=["zh", "en"], default=None,
                   help="language (default: from the locale)")
    t.add_argument("--out", default="attnkit-tour", help="folder for the pictures")
    t.add_argument("--seed", type=int, default=0, help="random seed")

    from .viz.specs import MASK_KINDS
    pl = sub.add_parser("plot", help="draw mask patterns side by side", epilog=_mask_help(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("masks", nargs="+", metavar="MASK",
                    help=f"NAME[:key=value,...] with NAME one of {', '.join(MASK_KINDS)}; "
                         f"lists of integers with + (indices=0+31); join terms with & and |, "
                         f"group with parentheses")
    pl.add_argument("--length", type=int, default=64, help="sequence length (default 64)")
    pl.add_argument("--out", required=True, help="output PNG file")

    b = sub.add_parser("bench", help="time every variant against its peers")
    b.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="what inputs, modules and peers run in; %%peak is of this dtype's "
                        "GEMM peak (default: float32)")
    b.add_argument("--json", default=None, metavar="FILE", help="write every figure as JSON")
    b.add_argument("--plot", default=None, metavar="FILE.png",
                   help="time and memory versus length")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "tour":
            from .tour import run
            return run(lang=args.lang, out=args.out, seed=args.seed)
        if args.command == "plot":
            from .viz import plot_command
            return plot_command(args.masks, length=args.length, out=args.out)
        if args.command == "bench":
            from .bench import run as bench
            return bench(quick=args.quick, json_path=args.json, plot_path=args.plot,
                         dtype=args.dtype)
    except (ValueError, TypeError, OSError) as e:
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
