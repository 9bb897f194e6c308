"""Masks side by side in one picture, and the command ``attnkit plot``."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Sequence

from .. import masks as M
from ..lang import default_lang
from . import LABELS, drawing, new_figure, save, style
from .heatmaps import mask_panel
from .specs import parse_mask_spec, resolve_mask_spec


def _panels(mask: M.Mask, length: int, title: str, lang: str, limit: int = 4):
    """(title, (L, L) bool) pairs: one per batch element / head for masks that vary."""
    dense = mask.materialize(length, length)
    if dense.dim() == 2:
        return [(title, dense)]
    t = LABELS[lang]
    B, H = dense.shape[:2]
    out = []
    for b in range(B):
        for h in range(H):
            tag = ", ".join(x for x in (t["batch"].format(b=b) if B > 1 else "",
                                        t["head"].format(h=h) if H > 1 else "") if x)
            out.append((f"{title}\n[{tag}]" if tag else title, dense[b, h]))
    if len(out) > limit:
        out = out[:limit]
        out[-1] = (out[-1][0] + "\n" + t["shown"].format(n=limit, total=B * H), out[-1][1])
    return out


@drawing
def plot_masks(items: Sequence[tuple[str, M.Mask]], length: int, out, *, lang: str = "en",
               suptitle: str | None = None, per_row: int = 4):
    """Draw masks side by side, titled with their spec, and save to ``out``.

    A mask that differs per batch element or per head (``padding`` with several lengths,
    per-head ``dilated`` or ``bigbird``) gets one panel per element/head, at most four.
    """
    panels = []
    for title, mask in items:
        panels += _panels(mask, length, _wrap(title), lang)
    n = len(panels)
    cols = min(per_row, n)
    rows = -(-n // cols)
    fig = new_figure(3.9 * cols + 0.9, 4.3 * rows + (0.5 if suptitle else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, (title, dense) in zip(axes.flat, panels):
        im = mask_panel(ax, dense, title, lang, colorbar=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    t = LABELS[lang]
    # beside the last column, not at the edge of the figure's grid: square panels leave
    # room to their right that would otherwise open a gap before the colour bar
    cb = fig.colorbar(im, ax=list(axes[:, -1]), ticks=[0.25, 0.75], shrink=0.6, aspect=25)
    cb.ax.set_yticklabels([t["masked"], t["allowed"]])
    cb.ax.tick_params(length=0)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, out)


def _wrap(spec: str, width: int = 30) -> str:
    """Break a long spec at operators and commas so titles stay inside their panel."""
    out = []
    for part in spec.split("\n"):
        spaced = re.sub(r"\s*([&|])\s*", r" \1 ", part).replace(",", ", ")
        lines = textwrap.wrap(spaced, width=width, break_long_words=True,
                              break_on_hyphens=False) or [""]
        out += [line.replace(", ", ",") for line in lines]
    return "\n".join(out)


def plot_command(mask_specs: list[str], length: int = 64, out: str = "masks.png", *,
                 lang: str | None = None) -> int:
    """``attnkit plot``: parse every spec, draw them side by side into ``out``.

    Returns 0; bad specs raise ValueError (the command line turns it into exit code 2).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"--length must be a positive integer, got {length!r}")
    if length > 4096:
        raise ValueError(f"--length {length} is too large to draw (at most 4096)")
    if not mask_specs:
        raise ValueError("give at least one MASK")
    items = []
    for spec in mask_specs:
        mask = parse_mask_spec(spec, length)
        try:
            mask.materialize(length, length)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{spec!r} at length {length}: {e}") from None
        items.append((resolve_mask_spec(spec, length), mask))
    suffix = Path(out).suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--out must end in .png (or .svg, .pdf), got {out!r}")
    with style():
        path = plot_masks(items, length, out, lang=lang or default_lang())
    for spec, (resolved, _) in zip(mask_specs, items):
        if resolved != spec.replace(" ", ""):  # say what the defaults filled in
            print(f"{spec} = {resolved}")
    print(path)
    return 0
