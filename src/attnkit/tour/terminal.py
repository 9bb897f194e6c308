"""Terminal output of the tour: display-width aware tables and small matrices."""

from __future__ import annotations

import math
import re
import sys
import unicodedata

from torch import Tensor


def display_width(s: str) -> int:
    """Terminal columns of ``s``: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def pad(s: str, n: int, right: bool = True) -> str:
    """``s`` padded with spaces to ``n`` columns, aligned right (or left)."""
    fill = " " * max(0, n - display_width(s))
    return fill + s if right else s + fill


def fmt_number(x: float, digits: int = 2) -> str:
    """``x`` rounded to ``digits`` decimals, never as "-0.00"; infinities as "inf"."""
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    s = f"{x:.{digits}f}"
    return s if s.strip("-0.") else s.replace("-", "")  # no "-0.00"


_NUMBER = re.compile(r"^(-|[-+]?(\d[\d.]*(e[-+]?\d+)?|inf)( ?(%|x|[KMG]?i?B|M|B))?)$")


def table(headers, rows, indent: int = 4) -> str:
    """Aligned columns (display-width aware): numbers right, text left."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [i > 0 and all(_NUMBER.match(r[i]) for r in cells[1:])
               for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [pad(c, w, right=numeric[i]) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(" " * indent + "  ".join(parts).rstrip())
        if k == 0:
            lines.append(" " * indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def matrix(m: Tensor, rows, cols=None, digits: int = 2, corner: str = "") -> str:
    """A small matrix with row (and column) labels, rounded to ``digits``."""
    m = m.detach().double()
    cols = cols if cols is not None else [str(j) for j in range(m.shape[1])]
    return table([corner] + list(cols),
                 [[r] + [fmt_number(float(x), digits) for x in row] for r, row in zip(rows, m)])


def utf8_stdout() -> None:
    """Make printing CJK text safe: unencodable characters are replaced, not fatal."""
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "猫√·".encode(enc)
    except (UnicodeEncodeError, LookupError):
        try:
            sys.stdout.reconfigure(errors="replace")
        except AttributeError:
            pass
