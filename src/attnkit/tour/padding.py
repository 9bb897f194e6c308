"""Section 5 of the tour: padding masks, and what goes wrong without them."""

from __future__ import annotations

import math

from .. import masks, viz
from .session import Tour, attend, randn
from .terminal import fmt_number, matrix


def section_padding(tour: Tour) -> None:
    """Show that padded keys get zero weight with the mask, and what changes without it."""
    g = tour.gen(5)
    d = 8
    s1, s2 = tour.T["pad_sentences"]
    lengths = [len(s1), len(s2)]
    S = max(lengths)
    pad = "[PAD]"
    tok2 = s2 + [pad] * (S - len(s2))
    x = randn(g, 2, S, d)
    x[1, len(s2):] = 0.0                            # the pad embedding
    Wq, Wk, Wv = (randn(g, d, d) / math.sqrt(d) * 1.5 for _ in range(3))

    def self_attention(x, mask):
        return attend((x @ Wq)[:, None], (x @ Wk)[:, None], (x @ Wv)[:, None],
                      attn_mask=mask)

    mask = masks.padding(lengths)
    out_m, w_m = self_attention(x, mask)
    out_n, w_n = self_attention(x, None)
    q2, k2 = x[1] @ Wq, x[1] @ Wk
    scores = (q2 @ k2.T) / math.sqrt(d)
    scores = scores.masked_fill(~mask.materialize(S, S)[1, 0], float("-inf"))
    tour.say("pad_intro", s1=" ".join(s1), s2=" ".join(s2), l1=lengths[0], l2=lengths[1])
    print(matrix(scores, tok2, tok2, corner="Q \\ K"))
    w2 = w_m[1, 0]
    on_pad = w2[:, len(s2):]
    tour.say("pad_weights", m=fmt_number(float(on_pad.max()), 1) if on_pad.max() == 0
             else f"{float(on_pad.max()):.2e}")
    print(matrix(w2, tok2, tok2, digits=3, corner="Q \\ K"))
    tour.say("pad_rows")
    tour.say("pad_nomask")
    print(matrix(w_n[1, 0], tok2, tok2, digits=3, corner="Q \\ K"))
    # what goes wrong: outputs depend on the pad vectors
    x_other = x.clone()
    x_other[1, len(s2):] = randn(g, S - len(s2), d)
    out_m2, _ = self_attention(x_other, mask)
    out_n2, _ = self_attention(x_other, None)
    real = slice(0, len(s2))
    d_nomask = float((out_n2[1, 0, real] - out_n[1, 0, real]).abs().max())
    d_mask = float((out_m2[1, 0, real] - out_m[1, 0, real]).abs().max())
    alone, _ = self_attention(x[1:, :len(s2)], None)
    e_alone = float((alone[0, 0] - out_m[1, 0, real]).abs().max())
    tour.say("pad_wrong", tok=s2[0], d_nomask=d_nomask, d_mask=fmt_number(d_mask, 1)
             if d_mask == 0 else f"{d_mask:.1e}", e=e_alone)

    fig = viz.new_figure(15, 4.6)
    axes = fig.subplots(1, 3)
    viz.mask_panel(axes[0], mask.materialize(S, S)[1, 0], tour.t("fig_pad_mask", n=len(s2)),
                   tour.lang, show_density=False)
    axes[0].set_xticks(range(S), labels=tok2)
    axes[0].set_yticks(range(S), labels=tok2)
    viz.heatmap(axes[1], w2, tok2, tok2, title=tour.t("fig_pad_with"), vmin=0, vmax=1,
                digits=2, xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"))
    viz.heatmap(axes[2], w_n[1, 0], tok2, tok2, title=tour.t("fig_pad_without"), vmin=0,
                vmax=1, digits=2, xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                cbar_label=tour.t("fig_weight"))
    fig.suptitle(tour.t("fig_pad_suptitle"))
    tour.picture(fig, "06_padding.png")
