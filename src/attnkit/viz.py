"""Pictures of attention: mask patterns, score and weight heatmaps, and the command
``attnkit plot``. Shared by :mod:`attnkit.tour`.

Everything draws on :class:`matplotlib.figure.Figure` objects rendered with Agg: no
pyplot, no window, no change to the caller's global matplotlib state (fonts and styles
are applied inside ``matplotlib.rc_context``).

Fonts: Chinese labels need a CJK font. attnkit ships a subset of Noto Sans CJK SC
(SIL Open Font License, ``attnkit/fonts/``) holding every character its own texts use,
and registers it with ``font_manager.addfont``; installed CJK fonts (Noto Sans CJK,
Source Han Sans, WenQuanYi, ...) follow as per-glyph fallbacks, then DejaVu Sans.

Mask specs for ``attnkit plot`` (see :func:`parse_mask_spec`)::

    SPEC := TERM ('|' TERM)*          '&' binds tighter than '|', as in Python;
    TERM := ATOM ('&' ATOM)*          parentheses group: (causal|global)&sliding_window
    ATOM := NAME[:key=value,...] | '(' SPEC ')'

Values are integers; a list of integers is written with ``+`` (``indices=0+31``).
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import masks as M

__all__ = ["MASK_KINDS", "parse_mask_spec", "plot_command", "plot_masks", "heatmap",
           "mask_panel", "new_figure", "save", "style", "font_family", "cjk_font_available",
           "LABELS"]

FONT_DIR = Path(__file__).with_name("fonts")
#: the family name of the shipped subset (renamed so it never shadows a full Noto install)
SHIPPED_FAMILY = "attnkit Sans CJK SC"
#: installed CJK fonts tried after the shipped one, best first
SYSTEM_CJK_FAMILIES = ["Noto Sans CJK SC", "Source Han Sans SC", "Source Han Sans CN",
                       "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei",
                       "PingFang SC", "SimHei", "Noto Sans CJK JP", "Droid Sans Fallback"]

# colours: one sequential map for weights, a diverging one for signed scores/biases,
# and two flat colours for masks (readable in print and for colour-blind readers)
MASK_ON, MASK_OFF = "#1f4e79", "#f2f2f2"
WEIGHTS_CMAP, SIGNED_CMAP = "viridis", "RdBu_r"

LABELS = {
    "en": {"query": "query position i", "key": "key position j", "allowed": "may attend",
           "masked": "masked", "density": "{p:.0%} of entries allowed",
           "batch": "batch {b}", "head": "head {h}", "shown": "(first {n} of {total} panels)"},
    "zh": {"query": "查询位置 i", "key": "键位置 j", "allowed": "可以关注", "masked": "被屏蔽",
           "density": "放行 {p:.0%} 的位置", "batch": "第 {b} 条样本", "head": "第 {h} 个头",
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


# --------------------------------------------------------------------------- heatmaps

def _fmt_cell(x: float, digits: int) -> str:
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
            signed: bool = False):
    """Draw a 2-D matrix on ``ax`` with labels, optional cell values and a colour bar.

    ``-inf`` entries (masked scores) are drawn as hatched grey cells labelled ``-∞``.
    ``signed=True`` centres a diverging colour map on 0.
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
                        fontsize=9 if max(rows, cols) <= 6 else 7, color=color)
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
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(L - 0.5, -0.5)


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
    cb = fig.colorbar(im, ax=axes, ticks=[0.25, 0.75], shrink=0.6, aspect=25)
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


# --------------------------------------------------------------------------- mask specs

def _default_window(L: int) -> int:
    return max(1, L // 16)


def _ints(value) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


def _one(value, key: str, name: str) -> int:
    if isinstance(value, list):
        raise ValueError(f"{key} takes one integer, got {'+'.join(map(str, value))}")
    return value


def _make_causal(p, L):
    return M.causal()


def _make_padding(p, L):
    return M.padding(_ints(p.get("lengths", L - L // 4)))


def _make_sliding_window(p, L):
    left = _one(p.get("left", _default_window(L)), "left", "sliding_window")
    return M.sliding_window(left, _one(p.get("right", left), "right", "sliding_window"))


def _make_dilated(p, L):
    left = _one(p.get("left", _default_window(L)), "left", "dilated")
    right = _one(p.get("right", left), "right", "dilated")
    d = p.get("dilation", 2)
    return M.dilated(left, right, d if isinstance(d, list) else int(d))


def _make_global(p, L):
    return M.global_tokens(_ints(p.get("indices", 0)))


def _make_bigbird(p, L):
    one = lambda k, default: _one(p.get(k, default), k, "bigbird")  # noqa: E731
    heads = p.get("heads")
    return M.bigbird(one("block_size", max(1, L // 16)), one("window", 3), one("global", 2),
                     one("random", 3), one("seed", 0),
                     None if heads is None else _one(heads, "heads", "bigbird"))


def _make_document(p, L):
    sizes = _ints(p.get("sizes", [L // 4, L // 2]))
    if any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be >= 1, got {'+'.join(map(str, sizes))}")
    if sum(sizes) > L:
        raise ValueError(f"sizes add up to {sum(sizes)}, more than the length {L}")
    if sum(sizes) < L:
        sizes = sizes + [L - sum(sizes)]  # the rest is one more document
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return M.document(ids)


#: NAME -> (constructor from (params, length), accepted keys, help text)
MASK_KINDS: dict[str, tuple[Callable, tuple[str, ...], str]] = {
    "causal": (_make_causal, (), "query i sees keys 0..i"),
    "padding": (_make_padding, ("lengths",),
                "lengths=N+N+...: keys >= lengths[b] are padding (default 3/4 of the "
                "length); several lengths = a batch, one panel each"),
    "sliding_window": (_make_sliding_window, ("left", "right"),
                       "left=, right=: keys i-left..i+right (default left=length/16, "
                       "right=left)"),
    "dilated": (_make_dilated, ("left", "right", "dilation"),
                "left=, right=, dilation=: keys i+t*dilation, t in [-left, right] "
                "(default length/16, length/16, 2); dilation=1+2+4 gives one per head"),
    "global": (_make_global, ("indices",),
               "indices=0+31: those tokens see and are seen by all (default 0)"),
    "bigbird": (_make_bigbird, ("block_size", "window", "global", "random", "seed", "heads"),
                "block_size= (default length/16), window=3, global=2, random=3, seed=0, "
                "heads= (one random draw per head)"),
    "document": (_make_document, ("sizes",),
                 "sizes=16+32: packed documents of those lengths, the rest one more "
                 "(default length/4, length/2, rest)"),
}

_TOKEN = re.compile(r"\s*(?:([()&|])|([^()&|\s]+))")


def _tokens(spec: str) -> list[str]:
    out, pos = [], 0
    spec = spec.strip()
    while pos < len(spec):
        m = _TOKEN.match(spec, pos)
        if m is None or m.end() == pos:
            break
        out.append(m.group(1) or m.group(2))
        pos = m.end()
        while pos < len(spec) and spec[pos].isspace():
            pos += 1
    return out


def _atom(text: str, length: int, spec: str) -> M.Mask:
    name, _, rest = text.partition(":")
    if name not in MASK_KINDS:
        raise ValueError(f"unknown mask {name!r} in {spec!r}; choose from "
                         f"{', '.join(MASK_KINDS)}")
    make, keys, _ = MASK_KINDS[name]
    params: dict[str, int | list[int]] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"{name}: expected key=value, got {item!r} in {spec!r}")
            if key not in keys:
                allowed = ", ".join(keys) if keys else "no parameters"
                raise ValueError(f"{name}: unknown parameter {key!r} in {spec!r} "
                                 f"(takes {allowed})")
            if key in params:
                raise ValueError(f"{name}: {key} given twice in {spec!r}")
            try:
                nums = [int(v) for v in value.split("+")]
            except ValueError:
                raise ValueError(f"{name}: {key} must be an integer or integers joined "
                                 f"with + (like 0+31), got {value!r}") from None
            params[key] = nums if len(nums) > 1 else nums[0]
    elif text.endswith(":"):
        raise ValueError(f"{name}: nothing after ':' in {spec!r}")
    try:
        return make(params, length)
    except (ValueError, TypeError) as e:
        where = f"{spec!r}" if text == spec else f"{text!r} in MASK spec {spec!r}"
        raise ValueError(f"{where}: {e}") from None


def parse_mask_spec(spec: str, length: int = 64) -> M.Mask:
    """Turn ``"sliding_window:left=4|global:indices=0+31"`` into a mask object.

    Grammar (``&`` binds tighter than ``|``; parentheses group)::

        SPEC := TERM ('|' TERM)* ;  TERM := ATOM ('&' ATOM)* ;
        ATOM := NAME[:key=value,...] | '(' SPEC ')'

    ``length`` sets the defaults that scale with it (window sizes, block size, padding
    and document lengths). Raises ValueError with a one-line message on a bad spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty MASK spec; expected NAME[:key=value,...] with NAME one of "
                         + ", ".join(MASK_KINDS))
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"--length must be a positive integer, got {length!r}")
    toks = _tokens(spec)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def expr():
        m = term()
        while peek() == "|":
            take()
            m = m | term()
        return m

    def term():
        m = atom()
        while peek() == "&":
            take()
            m = m & atom()
        return m

    def atom():
        tok = peek()
        if tok is None:
            raise ValueError(f"MASK spec {spec!r} ends where a mask name was expected")
        if tok in "&|)":
            raise ValueError(f"unexpected {tok!r} in MASK spec {spec!r}; expected a mask "
                             f"name or '('")
        take()
        if tok == "(":
            m = expr()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in MASK spec {spec!r}")
            take()
            return m
        return _atom(tok, length, spec)

    mask = expr()
    if pos != len(toks):
        if toks[pos] == ")":
            raise ValueError(f"unbalanced parentheses in MASK spec {spec!r}")
        raise ValueError(f"unexpected {toks[pos]!r} in MASK spec {spec!r}; join masks "
                         f"with & or |")
    return mask


def plot_command(mask_specs: list[str], length: int = 64, out: str = "masks.png", *,
                 lang: str | None = None) -> int:
    """``attnkit plot``: parse every spec, draw them side by side into ``out``.

    Returns 0; bad specs raise ValueError (the command line turns it into exit code 2).
    """
    from .tour import default_lang
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
        items.append((spec, mask))
    suffix = Path(out).suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--out must end in .png (or .svg, .pdf), got {out!r}")
    with style():
        path = plot_masks(items, length, out, lang=lang or default_lang())
    print(path)
    return 0
