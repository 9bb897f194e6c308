"""Pictures of attention: mask patterns, score and weight heatmaps, and the command
``attnkit plot``. Used by :mod:`attnkit.tour`; never imports it.

Everything draws on :class:`matplotlib.figure.Figure` objects rendered with Agg: no
pyplot, no window, no change to the caller's global matplotlib state (fonts and styles
are applied inside ``matplotlib.rc_context``).

Fonts: Chinese labels need a CJK font. attnkit ships a subset of Noto Sans CJK SC
(SIL Open Font License, ``attnkit/fonts/``) holding every character its own texts use,
and registers it with ``font_manager.addfont``; installed CJK fonts (Noto Sans CJK,
Source Han Sans, WenQuanYi, ...) follow as per-glyph fallbacks, then DejaVu Sans.

This module holds the fonts, the styles and the label texts; the drawing lives in
:mod:`attnkit.viz.heatmaps` (one matrix or mask on an axes), :mod:`attnkit.viz.specs`
(mask specs such as ``"sliding_window:left=4|global"``) and :mod:`attnkit.viz.plot`
(side-by-side mask pictures and ``attnkit plot``). Every public name of those modules
is also available here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

__all__ = ["MASK_KINDS", "parse_mask_spec", "plot_command", "plot_masks", "heatmap",
           "mask_panel", "new_figure", "save", "style", "font_family", "cjk_font_available",
           "LABELS"]

FONT_DIR = Path(__file__).parent.parent / "fonts"
#: the family name of the shipped subset (renamed so it never shadows a full Noto install)
SHIPPED_FAMILY = "attnkit Sans CJK SC"
#: installed CJK fonts tried after the shipped one, best first
SYSTEM_CJK_FAMILIES = ["Noto Sans CJK SC", "Source Han Sans SC", "Source Han Sans CN",
                       "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei",
                       "PingFang SC", "SimHei", "Noto Sans CJK JP", "Droid Sans Fallback"]

LABELS = {
    "en": {"query": "query position i", "key": "key position j", "allowed": "may attend",
           "masked": "masked", "density": "{p:.0%} of entries allowed",
           "batch": "batch {b}", "head": "head {h}", "shown": "(first {n} of {total} panels)"},
    "zh": {"query": "查询位置 i", "key": "键位置 j", "allowed": "可以关注", "masked": "被屏蔽",
           "density": "保留 {p:.0%} 的位置", "batch": "第 {b} 条样本", "head": "第 {h} 个头",
           "shown": "（只画前 {n} 个，共 {total} 个）"},
}


# --------------------------------------------------------------------------- fonts

_font_cache: list[str] | None = None


def font_family() -> list[str]:
    """The sans-serif family list used for every picture, CJK-capable fonts first.

    Registers the shipped font files once (``font_manager.addfont``); missing files or
    fonts that fail to load are skipped, so the worst case is DejaVu Sans alone.
    """
    global _font_cache
    if _font_cache is not None:
        return _font_cache
    from matplotlib import font_manager
    families = []
    for path in sorted(FONT_DIR.glob("*.otf")) + sorted(FONT_DIR.glob("*.ttf")):
        try:
            font_manager.fontManager.addfont(str(path))
            families.append(font_manager.FontProperties(fname=str(path)).get_name())
        except Exception as e:  # a damaged file must not break the pictures
            warnings.warn(f"attnkit: could not load font {path.name}: {e}")
    installed = {f.name for f in font_manager.fontManager.ttflist}
    system = [f for f in SYSTEM_CJK_FAMILIES if f in installed and f not in families]
    # DejaVu Sans before the installed CJK fonts: symbols the subset leaves out ("·",
    # "×", "√", "ᵀ") come out proportional, not as full-width CJK glyphs
    _font_cache = families + ["DejaVu Sans"] + system
    return _font_cache


def cjk_font_available() -> bool:
    """True when some font in :func:`font_family` can draw Chinese."""
    return font_family() != ["DejaVu Sans"]


# --------------------------------------------------------------------------- styles

def _rc() -> dict:
    # the list goes into font.family itself: only then does matplotlib fall back glyph by
    # glyph (CJK from the first font, "ᵀ" or "₁" from DejaVu Sans)
    return {"font.family": font_family(),
            "axes.unicode_minus": True, "font.size": 11, "axes.titlesize": 12,
            "axes.labelsize": 11, "figure.titlesize": 14, "savefig.dpi": 150,
            "savefig.facecolor": "white", "figure.facecolor": "white"}


def new_figure(width: float, height: float):
    """A Figure (constrained layout) to draw on; render it with :func:`save`."""
    from matplotlib.figure import Figure
    import matplotlib
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.12, h_pad=0.08, wspace=0.04)
    return fig


def save(fig, path) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix), creating parent folders."""
    import matplotlib
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_rc()):
        fig.savefig(path)
    return path


def style():
    """Context manager: attnkit's fonts and styles for every artist created inside."""
    import matplotlib
    return matplotlib.rc_context(_rc())


def drawing(fn: Callable) -> Callable:
    """Decorator: run a drawing function with attnkit's fonts and styles in force."""
    def wrapper(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context(_rc()):
            return fn(*args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


# the drawing modules build on the names above, so they are imported last
from .heatmaps import (MASK_OFF, MASK_ON, SIGNED_CMAP, WEIGHTS_CMAP,  # noqa: E402
                       heatmap, mask_panel)
from .specs import MASK_KINDS, parse_mask_spec  # noqa: E402
from .plot import plot_command, plot_masks  # noqa: E402
