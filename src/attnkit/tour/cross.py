"""Section 3 of the tour: self-attention and cross-attention in a tiny translation
model."""

from __future__ import annotations

import math

import torch

from .. import MultiHeadAttention, masks, scaled_dot_product_attention, viz
from .session import Tour, randn
from .terminal import matrix, pad


#: the translation pair: Chinese tokens, English tokens, and which Chinese word each
#: English word means (-1: none)
ZH_SENT = ["猫", "在", "树上"]
EN_SENT = ["the", "cat", "is", "on", "the", "tree"]
EN_MEANS = [-1, 0, 1, 1, -1, 2]


def _translation_pair(g, E: int):
    """Embeddings where words that mean the same are close in both languages: each
    meaning is one of a set of orthogonal directions (norm sqrt(E)), plus 30% noise;
    words without a counterpart get directions of their own."""
    basis = torch.linalg.qr(randn(g, E, E))[0].T * math.sqrt(E)
    zh = basis[:3] + 0.3 * randn(g, 3, E)
    own = iter(basis[3:])
    en = torch.stack([(basis[m] if m >= 0 else next(own)) + 0.3 * randn(g, E)
                      for m in EN_MEANS])
    return zh, en


def cross_words(tour: Tour, w, src_tok, tgt_tok) -> str:
    """What the cross-attention weights w (decoder words x source words) show, computed:
    which decoder words find their counterpart, how 在 shares its weight between "is"
    and "on", and how much the words without a counterpart ("the") draw or give."""
    zh_decodes = tgt_tok == ZH_SENT
    # counterpart[i]: the source positions that mean what decoder word i means
    if zh_decodes:
        counterpart = [[j for j, m in enumerate(EN_MEANS) if m == i] for i in range(len(ZH_SENT))]
    else:
        counterpart = [[m] if m >= 0 else [] for m in EN_MEANS]
    best = w.argmax(-1)
    has = [i for i, c in enumerate(counterpart) if c]
    found = [i for i in has if int(best[i]) in counterpart[i]]
    lines = []
    if len(found) == len(has):
        lines.append(tour.t("cross_all_found", n=len(has)))
    else:
        miss = next(i for i in has if i not in found)
        lines.append(tour.t("cross_some_found", k=len(found), n=len(has), word=tgt_tok[miss],
                            got=src_tok[int(best[miss])], w=float(w[miss, best[miss]])))
    if zh_decodes:  # 在 (row 1) over "is" (2) and "on" (3)
        a, b = float(w[1, 2]), float(w[1, 3])
        lines.append(tour.t("cross_zai_split" if min(a, b) >= 0.25 else "cross_zai_one",
                            a=a, b=b))
        the = [j for j, m in enumerate(EN_MEANS) if m < 0]
        lines.append(tour.t("cross_the_source", m=float(w[:, the].max())))
    else:  # "is" (2) and "on" (3) over 在 (1); "the" rows have no counterpart
        lines.append(tour.t("cross_is_on", a=float(w[2, 1]), b=float(w[3, 1])))
        the = [i for i, m in enumerate(EN_MEANS) if m < 0]
        top_the = max(float(w[i].max()) for i in the)
        top_real = min(float(w[i, counterpart[i]].max()) for i in has)  # on their own
        lines.append(tour.t("cross_the_spread" if top_the < top_real else "cross_the_sharp",
                            m=top_the, r=top_real))
    lines.append(tour.t("cross_outro"))
    return "\n".join("  " + line for text in lines for line in text.split("\n"))


def section_self_cross(tour: Tour) -> None:
    """Compare encoder, decoder and cross-attention weights of a tiny translation model."""
    g = tour.gen(3)
    E = 16
    torch.manual_seed(tour.seed * 1000 + 3)
    zh, en = _translation_pair(g, E)
    if tour.lang == "zh":
        src_tok, tgt_tok, src, tgt = ZH_SENT, EN_SENT, zh, en
    else:
        src_tok, tgt_tok, src, tgt = EN_SENT, ZH_SENT, en, zh
    enc_self, dec_self, cross = (MultiHeadAttention(E, 1) for _ in range(3))
    with torch.no_grad():
        # cross-attention compares meanings: the same map for queries and keys
        R = torch.linalg.qr(randn(g, E, E))[0] * 1.3
        cross.q_proj.weight.copy_(R)
        cross.k_proj.weight.copy_(R)
        for lin in (cross.q_proj, cross.k_proj):
            lin.bias.zero_()
        for layer in (enc_self, dec_self):   # small updates on top of the residual
            layer.out_proj.weight.mul_(0.2)
        enc_h, w_enc = enc_self(src[None], need_weights=True)
        enc_out = src[None] + enc_h                                    # residual
        dec_h, w_dec = dec_self(tgt[None], is_causal=True, need_weights=True)
        dec_in = tgt[None] + dec_h
        y, w_cross = cross(dec_in, enc_out, need_weights=True)
        # the same call, by hand: project, then the functional core
        q = cross.q_proj(dec_in)[:, None]
        k, v = cross.k_proj(enc_out)[:, None], cross.v_proj(enc_out)[:, None]
        y_ref = cross.out_proj(scaled_dot_product_attention(q, k, v)[:, 0])
    S, L = len(src_tok), len(tgt_tok)
    tour.say("cross_intro", src=" ".join(src_tok), tgt=" ".join(tgt_tok))
    tour.say("cross_enc", S=S)
    print(matrix(w_enc[0, 0], src_tok, src_tok, corner="Q \\ K"))
    tour.say("cross_dec", L=L)
    print(matrix(w_dec[0, 0], tgt_tok, tgt_tok, corner="Q \\ K"))
    tour.say("cross_cross", L=L, S=S)
    print(matrix(w_cross[0, 0], tgt_tok, src_tok, corner="Q \\ K"))
    tour.say("cross_best")
    best = w_cross[0, 0].max(-1)
    for i, tokn in enumerate(tgt_tok):
        print(f"    {pad(tokn, 6, right=False)} -> {src_tok[int(best.indices[i])]} "
              f"({float(best.values[i]):.2f})")
    tour.say("cross_same", e=float((y - y_ref).abs().max()))
    tour.show(cross_words(tour, w_cross[0, 0], src_tok, tgt_tok))

    fig = viz.new_figure(15, 4.6)
    axes = fig.subplots(1, 3, width_ratios=[S, L, S + 1])
    viz.heatmap(axes[0], w_enc[0, 0], src_tok, src_tok, title=tour.t("fig_enc_self"),
                xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"), vmin=0, vmax=1,
                annotate=S <= 6)
    future = ~masks.causal().materialize(L, L)           # grey: masked, not just small
    viz.heatmap(axes[1], w_dec[0, 0].masked_fill(future, float("nan")), tgt_tok, tgt_tok,
                title=tour.t("fig_dec_self"),
                xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"), vmin=0, vmax=1)
    viz.heatmap(axes[2], w_cross[0, 0], tgt_tok, src_tok, title=tour.t("fig_cross"),
                xlabel=tour.t("fig_key_enc"), ylabel=tour.t("fig_query_dec"), vmin=0, vmax=1,
                cbar_label=tour.t("fig_weight"))
    fig.suptitle(tour.t("fig_cross_suptitle"))
    tour.picture(fig, "04_self_cross.png")
