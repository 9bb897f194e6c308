"""The ``attnkit`` command line: ``tour`` teaches, ``plot`` draws, ``bench`` measures.

Bad arguments exit with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"attnkit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnkit", description="Attention mechanisms, computed for real.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("tour", help="walk through attention step by step with real numbers")
    t.add_argument("--lang", choices=["zh", "en"], default=None,
                   help="language (default: from the locale)")
    t.add_argument("--out", default="attnkit-tour", help="folder for the pictures")
    t.add_argument("--seed", type=int, default=0, help="random seed")
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
    except (ValueError, TypeError, OSError) as e:
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
