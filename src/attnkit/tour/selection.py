"""Section 8, part 2 of the tour: learned selection (DSA, NSA) measured on random inputs:
how much of the softmax weight a query's top-k keys hold, against a window of as many
recent keys, and how far each output lands from full attention."""

from __future__ import annotations

import torch

from .. import masks, scaled_dot_product_attention as sdpa
from .session import Tour
from .terminal import table

#: the measurement: L causal tokens of width D, each query keeps K keys
L, D, K = 512, 32, 64


def selection_figures(seed: int, sharpness: float) -> dict:
    """Weight share and output error of top-K vs the last K keys, queries scaled by
    ``sharpness`` (1: random q . k / sqrt(D); larger: peaked attention)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    q = q * sharpness
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    top = s.masked_fill(~causal, float("-inf")).topk(K, -1)
    idx = top.indices.masked_fill(torch.isinf(top.values), -1)
    window = masks.sliding_window(K - 1, 0)
    full = sdpa(q, k, v, is_causal=True)
    chosen = sdpa(q, k, v, attn_mask=masks.selected(idx), is_causal=True)
    local = sdpa(q, k, v, attn_mask=window, is_causal=True)
    rows = slice(K, L)  # rows that have more than K keys to choose from
    kept_top = p.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0).sum(-1)[..., rows]
    kept_win = (p * window.materialize(L, L)).sum(-1)[..., rows]

    def err(o):
        return float((o - full)[..., rows, :].norm() / full[..., rows, :].norm())
    return {"share_top": float(kept_top.mean()), "share_window": float(kept_win.mean()),
            "err_top": err(chosen), "err_window": err(local),
            "key_share": float((K / torch.arange(K + 1, L + 1, dtype=torch.float64)).mean())}


def section_selection(tour: Tour) -> None:
    """Top-k against a window on random inputs, at two sharpnesses."""
    flat, peaked = selection_figures(tour.seed, 1.0), selection_figures(tour.seed, 4.0)
    tour.say("sel_intro", L=L, k=K, d=D)
    rows = [[tour.t(name), f"{f['share_top']:.0%}", f"{f['share_window']:.0%}",
             f"{f['err_top']:.2f}", f"{f['err_window']:.2f}"]
            for name, f in (("sel_flat", flat), ("sel_peaked", peaked))]
    print(table(tour.T["sel_headers"], rows))
    tour.say("sel_outro", st=peaked["share_top"], sw=peaked["share_window"],
             et=peaked["err_top"], ew=peaked["err_window"], ft=flat["share_top"],
             fw=flat["share_window"], eft=flat["err_top"], efw=flat["err_window"], k=K,
             kw=flat["key_share"])
