"""One picture on one axes: a labelled heatmap of a matrix, or a bool mask."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import LABELS, drawing

# colours: one sequential map for weights, a diverging one for signed scores/biases,
# and two flat colours for masks (readable in print and for colour-blind readers)
MASK_ON, MASK_OFF = "#1f4e79", "#f2f2f2"
WEIGHTS_CMAP, SIGNED_CMAP = "viridis", "RdBu_r"


def _fmt_cell(x: float, digits: int) -> str:
    """The text of one heatmap cell: rounded, '-∞' for masked, empty for NaN."""
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "-∞" if x < 0 else "∞"
    s = f"{x:.{digits}f}"
    return "0" if float(s) == 0 and x == 0 else s


@drawing
def heatmap(ax, matrix: Tensor, row_labels: Sequence[str] | None = None,
            col_labels: Sequence[str] | None = None, *, title: str = "", xlabel: str = "",
            ylabel: str = "", cmap: str = WEIGHTS_CMAP, vmin=None, vmax=None,
            annotate: bool | None = None, digits: int = 2, cbar_label: str = "",
            signed: bool = False, cell_fontsize: float | None = None):
    """Draw a 2-D matrix on ``ax`` with labels, optional cell values and a colour bar.

    ``-inf`` entries (masked scores) are drawn as hatched grey cells labelled ``-∞``.
    ``signed=True`` centres a diverging colour map on 0. ``cell_fontsize``: the size of
    the cell values (default 9, or 7 past 6 rows or columns).
    """
    import numpy as np
    m = matrix.detach().double().cpu().numpy()
    finite = np.isfinite(m)
    shown = np.where(finite, m, np.nan)
    if signed and finite.any():
        lim = float(np.nanmax(np.abs(shown))) or 1.0
        vmin, vmax = (-lim if vmin is None else vmin), (lim if vmax is None else vmax)
        cmap = SIGNED_CMAP if cmap == WEIGHTS_CMAP else cmap
    import matplotlib
    cm = matplotlib.colormaps[cmap].copy()
    cm.set_bad("#d9d9d9")
    im = ax.imshow(shown, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    rows, cols = m.shape
    if annotate is None:
        annotate = rows * cols <= 100
    if annotate:
        lo, hi = im.get_clim()
        for i in range(rows):
            for j in range(cols):
                x = m[i, j]
                if finite[i, j]:
                    frac = (x - lo) / (hi - lo) if hi > lo else 0.5
                    dark = frac < 0.55 if cmap == WEIGHTS_CMAP else abs(frac - 0.5) > 0.3
                    color = "white" if dark else "black"
                else:
                    color = "#555555"
                ax.text(j, i, _fmt_cell(float(x), digits), ha="center", va="center",
                        fontsize=cell_fontsize or (9 if max(rows, cols) <= 6 else 7),
                        color=color)
    if row_labels is not None:
        ax.set_yticks(range(rows), labels=list(row_labels))
    if col_labels is not None:
        ax.set_xticks(range(cols), labels=list(col_labels))
        if cols * max((len(str(c)) for c in col_labels), default=0) > 36:
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    cb = ax.figure.colorbar(im, ax=ax, shrink=0.85)
    if cbar_label:
        cb.set_label(cbar_label)
    return im


@drawing
def mask_panel(ax, dense: Tensor, title: str, lang: str = "en", *, colorbar: bool = True,
               show_density: bool = True):
    """Draw one bool (L, S) mask: dark = may attend, light = masked."""
    from matplotlib.colors import ListedColormap
    t = LABELS[lang]
    m = dense.to(torch.float32).cpu().numpy()
    im = ax.imshow(m, cmap=ListedColormap([MASK_OFF, MASK_ON]), vmin=0, vmax=1,
                   interpolation="nearest", aspect="equal")
    L, S = m.shape
    if show_density:
        title = f"{title}\n{t['density'].format(p=float(m.mean()) if m.size else 0.0)}"
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(t["key"])
    ax.set_ylabel(t["query"])
    _integer_ticks(ax, L, S)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, ticks=[0.25, 0.75], shrink=0.7)
        cb.ax.set_yticklabels([t["masked"], t["allowed"]])
        cb.ax.tick_params(length=0)
    return im


def _integer_ticks(ax, L: int, S: int) -> None:
    """At most six integer ticks per axis, with limits that fit an L x S mask."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(L - 0.5, -0.5)
