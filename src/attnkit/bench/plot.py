"""Time and memory versus sequence length, one pair of log-log panels per case."""

from __future__ import annotations

import math

__all__ = ["plot_report"]

MiB = 1 << 20


def _series(case: dict, key: str, scale: float):
    by_variant: dict = {}
    for row in case["results"]:
        if row["status"] == "ok" and row.get(key):
            by_variant.setdefault((row["variant"], row["role"]), []).append(
                (row["n"], row[key] * scale))
    return by_variant


def plot_report(report: dict, path: str) -> None:
    """Write a PNG: for every measured case, median time (left) and peak memory (right,
    KV-cache bytes for decoding) against n, both on log axes; attnkit solid, peers dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")
    labels = sorted({r["variant"] for c in report["cases"] for r in c.get("results", [])},
                    key=lambda x: (not x.startswith("attnkit"), x))
    palette = plt.get_cmap("tab20").colors
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels)}

    cases = [c for c in report["cases"]
             if any(r["status"] == "ok" for r in c.get("results", []))]
    per_row = 2
    rows = max(1, math.ceil(len(cases) / per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(6.0 * per_row * 2 / 1.3, 3.1 * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, case in enumerate(cases):
        r, c = divmod(i, per_row)
        decode = case["kind"] == "decode"
        panels = ((axes[r][2 * c], "median_s", 1e3,
                   "ms per token" if decode else "median ms"),
                  (axes[r][2 * c + 1], "mem_bytes", 1 / MiB,
                   "KV cache MiB" if decode else "peak MiB"))
        for ax, key, scale, ylabel in panels:
            ax.set_visible(True)
            for (label, role), pts in sorted(_series(case, key, scale).items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        linestyle="-" if role == "attnkit" else "--", label=label,
                        color=color[label])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.set_xlabel("context length n" if decode else "sequence length n")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"{case['name']}: {'time' if key == 'median_s' else 'memory'}",
                         fontsize=9)
            if ax.lines:
                ax.legend(fontsize=6, loc="best")
    m = report["machine"]
    fig.suptitle(f"attnkit bench ({report['mode']}): {m['cpu_model']}, {m['cores']} cores, "
                 f"torch {m['torch_version']}, float32 GEMM peak "
                 f"{report['gemm_peak_gflops']:.0f} GFLOP/s", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=70)
    plt.close(fig)
