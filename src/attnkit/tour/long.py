"""Section 8 of the tour: sparse patterns for long sequences, and how the peak memory
of dense and chunked attention grows with the length."""

from __future__ import annotations

from .. import masks, viz
from .memory import MEMORY_HEAD_DIM, MEMORY_LENGTHS, MEMORY_WINDOW, MemoryProbe, window_mask
from .selection import section_selection
from .session import Tour, picture_name
from .terminal import table


def section_long(tour: Tour) -> None:
    """Show the density of sparse patterns and the peak memory of dense vs chunked attention."""
    n = 64
    patterns = [
        (tour.t("long_longformer"), "sliding_window:left=4|global:indices=0+32",
         masks.sliding_window(4) | masks.global_tokens([0, 32])),
        (tour.t("long_dilated"), "dilated:left=4,dilation=2|global:indices=0",
         masks.dilated(4, 4, 2) | masks.global_tokens([0])),
        ("BigBird", "bigbird:block_size=4", masks.bigbird(4)),
        (tour.t("long_mistral"), "sliding_window:left=7,right=0",
         masks.sliding_window(7, 0)),
    ]
    tour.say("long_intro")
    rows = []
    for name, spec, m in patterns:
        dens = [float(m.materialize(L, L).float().mean()) for L in (64, 256, 1024)]
        rows.append([name, spec] + [f"{x:.1%}" for x in dens])
    dense_row = [tour.t("long_dense"), "-", "100.0%", "100.0%", "100.0%"]
    print(table(tour.T["long_headers"], [dense_row] + rows))
    path = tour.out / picture_name("08_sparse_masks.png", tour.lang)
    viz.plot_masks([(f"{name}\n{spec}", m) for name, spec, m in patterns], n, path,
                   lang=tour.lang, suptitle=tour.t("fig_long_suptitle", n=n))
    tour.pictures.append(path)
    print(f"  -> {tour.t('picture', path=path)}", flush=True)
    section_selection(tour)

    tour.say("mem_intro", d=MEMORY_HEAD_DIM, w=MEMORY_WINDOW)
    print(f"  {tour.t('mem_running')}", flush=True)
    mem = (tour.memory or MemoryProbe()).result()
    mib = {k: [x / 2 ** 20 for x in v] for k, v in mem.items() if k != "seconds"}
    rows = [[L, f"{mib['dense'][i]:.1f}", f"{mib['chunked_causal'][i]:.1f}",
             f"{mib['chunked_window'][i]:.1f}",
             f"{mem['dense'][i] / max(mem['chunked_window'][i], 1):.0f}x"]
            for i, L in enumerate(MEMORY_LENGTHS)]
    print(table(tour.T["mem_headers"], rows))
    growth = mem["dense"][-1] / mem["dense"][-2]
    growth_c = mem["chunked_window"][-1] / max(mem["chunked_window"][-2], 1)
    ms = {k: v[-1] * 1e3 for k, v in mem["seconds"].items()}
    Lmax = MEMORY_LENGTHS[-1]
    share = float(window_mask().materialize(Lmax, Lmax).sum()) / (Lmax * (Lmax + 1) / 2)
    tour.say("mem_outro", g=growth, gc=growth_c)
    tour.say("mem_time_saved" if ms["chunked_window"] < ms["chunked_causal"] else
             "mem_time_not_saved", L=MEMORY_LENGTHS[-1], tw=ms["chunked_window"],
             tc=ms["chunked_causal"], td=ms["dense"], r=ms["chunked_causal"] / ms["chunked_window"],
             f=share, x=ms["chunked_window"] / ms["chunked_causal"] / share)

    fig = viz.new_figure(7.5, 4.8)
    ax = fig.subplots()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    for key, marker in (("dense", "o-"), ("chunked_causal", "s-"), ("chunked_window", "^-")):
        ax.plot(MEMORY_LENGTHS, mib[key], marker, label=tour.t("fig_mem_" + key))
        below = key == "chunked_causal"
        for x, y in zip(MEMORY_LENGTHS, mib[key]):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points",
                        xytext=(0, -13 if below else 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(MEMORY_LENGTHS))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.margins(y=0.12)                       # room for the value labels above and below
    ax.set_xlabel(tour.t("fig_mem_x"))
    ax.set_ylabel(tour.t("fig_mem_y"))
    ax.set_title(tour.t("fig_mem_title", d=MEMORY_HEAD_DIM))
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    tour.picture(fig, "08_memory.png")
