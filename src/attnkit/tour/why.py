"""Section 1 of the tour: why attention. A fixed-size summary and an RNN lose token 1
as the sequence grows; one attention layer keeps it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import scaled_dot_product_attention, viz
from .session import Tour, attend, randn
from .terminal import table


def _cos(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors, flattened."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def why_measurements(seed: int, lengths=(4, 8, 16, 32, 64), d: int = 64, d_rnn: int = 16,
                     trials: int = 8) -> list[dict]:
    """For each length n, averaged over ``trials`` random sentences of n token vectors:

    * ``summary_cos``: cosine between the mean of the n vectors (a fixed-size summary)
      and token 1; ``attn_cos``: cosine between token 1 and the attention output of a
      query q = x_1 over all n tokens (keys = values = the tokens); ``weight``: that
      query's weight on token 1;
    * ``rnn_grad``: ||d h_n / d x_1|| (Frobenius) for h_t = tanh(W h_(t-1) + U x_t);
      ``attn_grad``: ||d y_n / d x_1|| for one attention layer y_n = attn(x_n W_q, X W_k,
      X W_v) (geometric means over the trials).
    """
    g = torch.Generator().manual_seed(seed * 1000 + 1)
    W = torch.linalg.qr(randn(g, d_rnn, d_rnn))[0]  # orthogonal: no growth or decay by
    U = randn(g, d_rnn, d_rnn) / math.sqrt(d_rnn)    # itself; tanh does the rest
    Wq, Wk, Wv = (randn(g, d_rnn, d_rnn) / math.sqrt(d_rnn) for _ in range(3))
    res = []
    for n in lengths:
        acc = {"summary_cos": 0.0, "attn_cos": 0.0, "weight": 0.0, "rnn_grad": 0.0,
               "attn_grad": 0.0}
        for _ in range(trials):
            x = randn(g, n, d)
            out, w = attend(x[None, :1], x[None], x[None])   # q = x_1: "find token 1"
            acc["summary_cos"] += _cos(x.mean(0), x[0]) / trials
            acc["attn_cos"] += _cos(out[0, 0], x[0]) / trials
            acc["weight"] += float(w[0, 0, 0]) / trials
            xs = randn(g, n, d_rnn)

            # RNN: by the chain rule, d h_n / d x_1 = D_n W ... D_2 W D_1 U with
            # D_t = diag(1 - h_t^2): one factor per step between token 1 and position n
            h, J = torch.zeros(d_rnn), None
            for t in range(n):
                h = torch.tanh(W @ h + U @ xs[t])
                J = U if J is None else W @ J
                J = (1 - h ** 2)[:, None] * J
            acc["rnn_grad"] += math.log(max(float(J.norm()), 1e-300)) / trials

            def attn_last(x1, xs=xs):
                X = torch.cat([x1[None], xs[1:]])
                return scaled_dot_product_attention((X[-1:] @ Wq)[None], (X @ Wk)[None],
                                                    (X @ Wv)[None], backend="torch")[0, 0]

            j = torch.autograd.functional.jacobian(attn_last, xs[0], vectorize=True)
            acc["attn_grad"] += math.log(float(j.norm())) / trials
        acc["rnn_grad"], acc["attn_grad"] = math.exp(acc["rnn_grad"]), math.exp(acc["attn_grad"])
        res.append({"n": n, **acc})
    return res


def _falls_every_step(xs) -> bool:
    return all(b < a for a, b in zip(xs, xs[1:]))


def why_words(tour: Tour, res: list[dict], trials: int) -> str:
    """The section's conclusions, each computed from the table: a trend is called steady
    only when every step of it is, and a fall is stated with its own size."""
    first, last = res[0], res[-1]
    n0, n1 = first["n"], last["n"]
    summary = [r["summary_cos"] for r in res]
    kw = dict(n0=n0, n1=n1, s0=summary[0], s1=summary[-1], e0=n0 ** -0.5, e1=n1 ** -0.5)
    if _falls_every_step(summary):
        near = 0.67 <= summary[-1] / kw["e1"] <= 1.5
        lines = [tour.t("why_summary_steady", rel=tour.t("why_near" if near else "why_far"),
                        **kw)]
    elif summary[-1] < summary[0]:
        up = next(i for i in range(1, len(res)) if summary[i] >= summary[i - 1])
        lines = [tour.t("why_summary_noisy", trials=trials, na=res[up - 1]["n"],
                        sa=summary[up - 1], nb=res[up]["n"], sb=summary[up], **kw)]
    else:
        lines = [tour.t("why_summary_flat", **kw)]
    lines.append(tour.t("why_attn_keeps", low=min(r["attn_cos"] for r in res)))
    lines.append(tour.t("why_rnn", n0=n0, n1=n1, f=first["rnn_grad"] / last["rnn_grad"]))
    grads = [r["attn_grad"] for r in res]
    steady = "" if _falls_every_step(grads) else tour.t("why_not_every_step")
    lines.append(tour.t("why_attn_grad", f=grads[0] / grads[-1], steady=steady,
                        nf=n1 / n0, n0=n0, n1=n1))
    return "\n".join("  " + line for text in lines for line in text.split("\n"))


def section_why(tour: Tour) -> None:
    """Print and plot what a summary, an RNN and attention keep of token 1."""
    d, trials = 64, 8
    tour.say("why_intro", d=d, trials=trials)
    res = why_measurements(tour.seed, d=d, trials=trials)
    rows = [[r["n"], f"{r['summary_cos']:.3f}", f"{r['attn_cos']:.3f}", f"{r['weight']:.3f}",
             f"{r['rnn_grad']:.1e}", f"{r['attn_grad']:.1e}"] for r in res]
    tour.show(table(tour.T["why_headers"], rows))
    tour.show(why_words(tour, res, trials))
    lengths = [r["n"] for r in res]
    series = {"summary": [r["summary_cos"] for r in res], "attn": [r["attn_cos"] for r in res],
              "rnn": [r["rnn_grad"] for r in res], "attn_grad": [r["attn_grad"] for r in res]}

    fig = viz.new_figure(11, 4.3)
    a, b = fig.subplots(1, 2)
    a.plot(lengths, series["summary"], "o-", label=tour.t("fig_why_summary"))
    a.plot(lengths, series["attn"], "s-", label=tour.t("fig_why_attn"))
    a.set_xscale("log", base=2)
    a.set_xticks(lengths, [str(n) for n in lengths])  # 4, 8, ... as the table says
    a.set_ylim(0, 1.05)
    a.set_xlabel(tour.t("fig_why_n"))
    a.set_ylabel(tour.t("fig_why_cos"))
    a.set_title(tour.t("fig_why_title1"))
    a.legend()
    a.grid(alpha=0.3)
    b.plot(lengths, series["rnn"], "o-", label="RNN")
    b.plot(lengths, series["attn_grad"], "s-", label=tour.t("fig_why_attn_layer"))
    b.set_xscale("log", base=2)
    b.set_xticks(lengths, [str(n) for n in lengths])
    b.set_yscale("log")
    b.set_xlabel(tour.t("fig_why_n"))
    b.set_ylabel(tour.t("fig_why_grad"))
    b.set_title(tour.t("fig_why_title2"))
    b.legend()
    b.grid(alpha=0.3)
    tour.picture(fig, "01_why_attention.png")
