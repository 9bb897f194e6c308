"""Section 2 of the tour: Q, K and V of a three-word sentence, scores, softmax weights
and outputs, and why the scores are divided by sqrt(d_k)."""

from __future__ import annotations

import math

import torch

from .. import viz
from .session import TEXT, Tour, attend, randn
from .terminal import display_width, fmt_number, matrix, table


def qkv_example(seed: int, lang: str = "en") -> dict:
    """The tensors of section 2: embeddings E (3, 8), positions P, X = E + P, the
    projections W_Q/W_K/W_V (8, 4) and Q, K, V (3, 4)."""
    from ..positional import sinusoidal_encoding
    g = torch.Generator().manual_seed(seed * 1000 + 2)
    d_model, d_k = 8, 4
    E = randn(g, 3, d_model)
    P = sinusoidal_encoding(3, d_model)
    X = E + P
    Wq, Wk, Wv = (randn(g, d_model, d_k) / math.sqrt(d_model) for _ in range(3))
    return dict(tokens=TEXT[lang]["tokens"], E=E, P=P, X=X, Wq=Wq, Wk=Wk, Wv=Wv,
                Q=X @ Wq, K=X @ Wk, V=X @ Wv, d_model=d_model, d_k=d_k)


def section_qkv(tour: Tour) -> None:
    """Compute Q, K, V, scores, weights and outputs for one sentence, step by step."""
    ex = qkv_example(tour.seed, tour.lang)
    tok, dk = ex["tokens"], ex["d_k"]
    dims = [f"d{j}" for j in range(ex["d_model"])]
    tour.say("qkv_embed", d=ex["d_model"])
    for name in ("E", "P", "X"):
        print(f"  {tour.t('qkv_name_' + name)}")
        print(matrix(ex[name], tok, dims))
    tour.say("qkv_proj", dk=dk)
    for name in ("Q", "K", "V"):
        print(f"  {name} = X W_{name}")
        print(matrix(ex[name], tok, [f"d{j}" for j in range(dk)]))
    Q, K, V = ex["Q"], ex["K"], ex["V"]
    raw = Q @ K.T
    scaled = raw / math.sqrt(dk)
    tour.say("qkv_scores")
    print(matrix(raw, tok, tok, corner="Q \\ K"))
    tour.say("qkv_scaled", s=math.sqrt(dk))
    print(matrix(scaled, tok, tok, corner="Q \\ K"))
    out, w = attend(Q[None], K[None], V[None])
    out, w = out[0], w[0]
    tour.say("qkv_weights")
    print(matrix(w, tok, tok, digits=3, corner="Q \\ K"))
    tour.say("qkv_check", e=float((scaled.softmax(-1) - w).abs().max()))
    tour.say("qkv_out")
    terms = " + ".join(f"{float(w[0, j]):.3f}·V[{tok[j]}]" for j in range(3))
    mixed = (w[0, :, None] * V).sum(0)
    vec = "[" + ", ".join(fmt_number(float(x)) for x in mixed) + "]"
    print(f"    out[{tok[0]}] = {terms}")
    print(f"    {' ' * (display_width(tok[0]) + 6)}= {vec}")
    print(matrix(out, tok, [f"d{j}" for j in range(dk)]))
    tour.say("qkv_out_check", e=float((w @ V - out).abs().max()))
    tour.say("qkv_analogy")

    fig = viz.new_figure(14, 4.2)
    axes = fig.subplots(1, 3)
    lab = dict(xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"))
    viz.heatmap(axes[0], raw, tok, tok, title="Q Kᵀ", signed=True,
                cbar_label=tour.t("fig_score"), **lab)
    viz.heatmap(axes[1], scaled, tok, tok, title=f"Q Kᵀ / √{dk}", signed=True,
                cbar_label=tour.t("fig_score"), **lab)
    viz.heatmap(axes[2], w, tok, tok, title=tour.t("fig_weights_title"), vmin=0, vmax=1,
                digits=3, cbar_label=tour.t("fig_weight"), **lab)
    fig.suptitle(tour.t("fig_qkv_suptitle"))
    tour.picture(fig, "03_qkv_scores.png")
    _scaling(tour)


def scaling_measurements(seed: int, dims=(4, 16, 64, 256, 1024), pairs: int = 4096,
                         rows: int = 256, keys: int = 32) -> list[dict]:
    """Var(q.k) with and without 1/sqrt(d_k), and the entropy / largest weight of the
    softmax over ``keys`` keys with and without scaling, for each d_k."""
    g = torch.Generator().manual_seed(seed * 1000 + 22)
    res = []
    for d in dims:
        q, k = randn(g, pairs, d), randn(g, pairs, d)
        dots = (q * k).sum(-1)
        Q, Kx = randn(g, 1, rows, d), randn(g, 1, keys, d)
        V = torch.zeros(1, keys, 1)
        entry = {"d_k": d, "var": float(dots.var()), "var_scaled": float((dots / d ** 0.5).var())}
        for tag, scale in (("raw", 1.0), ("scaled", None)):
            _, w = attend(Q, Kx, V, scale=scale)
            ent = -(w * w.clamp_min(1e-30).log()).sum(-1)
            entry[f"entropy_{tag}"] = float(ent.mean())
            entry[f"max_{tag}"] = float(w.amax(-1).mean())
        res.append(entry)
    return res


def _scaling(tour: Tour) -> None:
    """Show why scores are divided by sqrt(d_k): variance and softmax saturation."""
    keys, pairs = 32, 4096
    tour.say("scale_intro", n=pairs, keys=keys, hmax=math.log(keys))
    res = scaling_measurements(tour.seed, pairs=pairs, keys=keys)
    rows = [[r["d_k"], f"{r['var']:.1f}", f"{r['var_scaled']:.2f}", f"{r['entropy_raw']:.2f}",
             f"{r['entropy_scaled']:.2f}", f"{r['max_raw']:.2f}", f"{r['max_scaled']:.2f}"]
            for r in res]
    tour.show(table(tour.T["scale_headers"], rows))
    first, last = res[0], res[-1]
    scaled = [r["entropy_scaled"] for r in res]
    tour.say("scale_outro" if last["entropy_raw"] < first["entropy_raw"] else "scale_outro_flat",
             v0=first["var"], v1=last["var"], d0=first["d_k"], d1=last["d_k"],
             h0=first["entropy_raw"], h1=last["entropy_raw"], m1=last["max_raw"],
             lo=min(scaled), hi=max(scaled))

    dims = [r["d_k"] for r in res]
    fig = viz.new_figure(11, 4.3)
    a, b = fig.subplots(1, 2)
    a.plot(dims, [r["var"] for r in res], "o-", label="Var(q·k)")
    a.plot(dims, [r["var_scaled"] for r in res], "s-", label="Var(q·k / √d_k)")
    a.plot(dims, dims, "k:", lw=1, label="d_k")
    a.set_xscale("log", base=2)
    a.set_yscale("log", base=2)
    a.set_xticks(dims, [str(x) for x in dims])  # plain numbers, as in the table
    from matplotlib.ticker import FuncFormatter
    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_xlabel("d_k")
    a.set_ylabel(tour.t("fig_variance"))
    a.set_title(tour.t("fig_scale_title1"))
    a.legend()
    a.grid(alpha=0.3)
    b.plot(dims, [r["entropy_raw"] for r in res], "o-", label=tour.t("fig_unscaled"))
    b.plot(dims, [r["entropy_scaled"] for r in res], "s-", label=tour.t("fig_scaled"))
    b.axhline(math.log(keys), color="k", ls=":", lw=1, label=tour.t("fig_uniform", n=keys))
    b.set_xscale("log", base=2)
    b.set_xticks(dims, [str(x) for x in dims])
    b.set_ylim(0, math.log(keys) * 1.1)
    b.set_xlabel("d_k")
    b.set_ylabel(tour.t("fig_entropy"))
    b.set_title(tour.t("fig_scale_title2", n=keys))
    b.legend()
    b.grid(alpha=0.3)
    tour.picture(fig, "03_scaling.png")
