"""Section 6 of the tour: positions inside attention - T5 relative buckets, ALiBi,
RoPE and Transformer-XL's relative scores with memory."""

from __future__ import annotations

import torch

from .. import bias as B, masks, scaled_dot_product_attention, viz
from .session import Tour, randn
from .terminal import fmt_number, matrix, table


T5_OFFSETS = [-200, -128, -64, -32, -16, -8, -7, -1, 0, 1, 7, 8, 16, 32, 64, 128, 200]


def section_positions(tour: Tour) -> None:
    """Show order blindness, then T5 buckets, ALiBi, RoPE and Transformer-XL."""
    from ..positional import RotaryEmbedding, T5RelativeBias, relative_position_bucket
    g = tour.gen(6)
    # permutation invariance
    q, k, v = randn(g, 1, 1, 6, 8), randn(g, 1, 1, 6, 8), randn(g, 1, 1, 6, 8)
    perm = torch.randperm(6, generator=g)
    e_perm = float((scaled_dot_product_attention(q, k, v)
                    - scaled_dot_product_attention(q, k[:, :, perm], v[:, :, perm])).abs().max())
    tour.say("pos_intro", e=e_perm)

    # T5 buckets
    nb, maxd = 32, 128
    rel = torch.tensor(T5_OFFSETS)
    buckets = relative_position_bucket(rel, True, nb, maxd)
    tour.say("t5_intro", exact=nb // 4, maxd=maxd, nb=nb)
    half = len(T5_OFFSETS) // 2 + 1
    for part in (slice(0, half), slice(half, None)):
        print(table([tour.t("t5_offset")] + [str(o) for o in T5_OFFSETS[part]],
                    [[tour.t("t5_bucket")] + [str(int(b)) for b in buckets[part]]]))
    t5 = T5RelativeBias(num_heads=2, num_buckets=nb, max_distance=maxd)
    with torch.no_grad():
        bias_t5 = t5.materialize(48, 48)
    spread = max(float((diag.amax(-1) - diag.amin(-1)).max())
                 for diag in (bias_t5.diagonal(o, 1, 2) for o in range(-47, 48)))
    tour.say("t5_toeplitz", e=spread)

    fig = viz.new_figure(11.5, 4.4)
    a, b = fig.subplots(1, 2)
    offs = torch.arange(-160, 161)
    a.step(offs, relative_position_bucket(offs, True, nb, maxd), where="mid")
    a.set_xlabel(tour.t("fig_t5_offset"))
    a.set_ylabel(tour.t("fig_t5_bucket"))
    a.set_title(tour.t("fig_t5_title1", nb=nb, maxd=maxd))
    a.grid(alpha=0.3)
    L = 48
    ii = torch.arange(L)
    grid_b = relative_position_bucket(ii[None, :] - ii[:, None], True, nb, maxd)
    viz.heatmap(b, grid_b.float(), title=tour.t("fig_t5_title2", L=L), cmap="viridis",
                annotate=False, xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                cbar_label=tour.t("fig_t5_bucket"))
    tour.picture(fig, "07_t5_buckets.png")

    # ALiBi
    s8, s12 = B.alibi_slopes(8), B.alibi_slopes(12)
    fmt = lambda s: ", ".join(f"{float(x):.4g}" for x in s)  # noqa: E731
    n = 6
    bias_al = B.alibi(8).materialize(n, n)[0]                     # (8, n, n)
    causal = masks.causal().materialize(n, n)
    tour.say("alibi_intro", s8=fmt(s8), s12=fmt(s12), s=float(s8[0]))
    print(matrix(bias_al[0].masked_fill(~causal, float("-inf")), range(n), range(n),
                 corner="i \\ j"))
    Lp = 16
    full = B.alibi(8).materialize(Lp, Lp)[0].masked_fill(~masks.causal().materialize(Lp, Lp),
                                                         float("nan"))
    fig = viz.new_figure(13.5, 4.3)
    axes = fig.subplots(1, 3)
    lowest = float(full[[0, 3, 7]].nan_to_num(0.0).min())  # one colour scale for all heads
    for ax, h in zip(axes, (0, 3, 7)):
        viz.heatmap(ax, full[h], title=tour.t("fig_alibi_head", h=h + 1, s=float(s8[h])),
                    annotate=False, cmap="magma", vmin=lowest, vmax=0.0, xlabel=tour.t("fig_key"),
                    ylabel=tour.t("fig_query"), cbar_label=tour.t("fig_bias"))
    fig.suptitle(tour.t("fig_alibi_suptitle"))
    tour.picture(fig, "07_alibi.png")

    # RoPE
    d, P = 8, 32
    rope = RotaryEmbedding(d)
    qv, kv = randn(g, d), randn(g, d)
    pos = torch.arange(P)
    qr, kr = rope.rope(qv.expand(1, 1, P, d).contiguous(), kv.expand(1, 1, P, d).contiguous(),
                       pos)
    score = (qr[0, 0] @ kr[0, 0].T)                                   # (m, n)
    tour.say("rope_intro", d=d)
    for m_, n_ in ((2, 0), (9, 7), (30, 28), (2, 1), (9, 1)):
        print(f"    (m, n) = ({m_:>2}, {n_:>2})   m - n = {m_ - n_:>2}   "
              f"q_m · k_n = {float(score[m_, n_]):+.4f}")
    spread = max(float(score.diagonal(o).max() - score.diagonal(o).min())
                 for o in range(-P + 1, P))
    tour.say("rope_outro", P=P, e=spread)
    ones = torch.ones(1, 1, 256, 64)
    r1, r2 = RotaryEmbedding(64).rope(ones, ones, torch.arange(256))
    decay = (r1[0, 0, :1] @ r2[0, 0].T)[0] / 64                       # q at 0, k at n
    tour.say("rope_decay", d16=float(decay[16]), d64=float(decay[64]), d255=float(decay[255]),
             low=float(decay.min()), at=int(decay.argmin()))

    fig = viz.new_figure(11.5, 4.4)
    a, b = fig.subplots(1, 2)
    viz.heatmap(a, score, title=tour.t("fig_rope_title1", d=d), signed=True, annotate=False,
                xlabel=tour.t("fig_key_pos_n"), ylabel=tour.t("fig_query_pos_m"),
                cbar_label="q_m · k_n")
    b.plot(torch.arange(256), decay)
    b.set_xlabel(tour.t("fig_rope_offset"))
    b.set_ylabel(tour.t("fig_rope_score"))
    b.set_title(tour.t("fig_rope_title2"))
    b.grid(alpha=0.3)
    tour.picture(fig, "07_rope.png")
    _transformer_xl(tour, g)


def _transformer_xl(tour: Tour, g) -> None:
    """Rebuild Transformer-XL's four score terms by hand and check them against the layer."""
    from ..layers.transformer_xl import TransformerXLAttention
    from ..positional import relative_sinusoidal_encoding
    d_model, H, dh, L, M = 8, 1, 8, 4, 4
    torch.manual_seed(tour.seed * 1000 + 66)
    layer = TransformerXLAttention(d_model, H, dh)
    with torch.no_grad():
        layer.r_w_bias.normal_(0, 0.5)
        layer.r_r_bias.normal_(0, 0.5)
        layer.qkv_net.weight.mul_(2.0)
        layer.r_net.weight.mul_(2.0)
    seg1, seg2 = randn(g, 1, L, d_model), randn(g, 1, L, d_model)
    with torch.no_grad():
        y = layer(seg2, mems=seg1)
        # the four terms by hand, from the layer's own parameters
        S = M + L
        w = layer.qkv_net.weight
        q = seg2[0] @ w[:dh].T                                       # (L, d)
        hcat = torch.cat([seg1[0], seg2[0]])                         # (S, d_model)
        k, v = hcat @ w[dh:2 * dh].T, hcat @ w[2 * dh:].T
        R = relative_sinusoidal_encoding(S, d_model)                 # rows: distance S-1..0
        WR = layer.r_net(R)                                          # (S, d)
        u, vb = layer.r_w_bias[0], layer.r_r_bias[0]
        p = torch.arange(L)[:, None] + M
        j = torch.arange(S)[None, :]
        rel = WR[(S - 1 - (p - j)).clamp(0, S - 1)]                 # (L, S, d): W_r R_(p-j)
        A = q @ k.T
        Bt = (q[:, None, :] * rel).sum(-1)
        C = (k @ u)[None, :].expand(L, S)
        D = (rel @ vb)
        allowed = masks.causal().materialize(L, S)
        total = ((A + Bt + C + D) * layer.scale).masked_fill(~allowed, float("-inf"))
        weights = total.softmax(-1)
        y_ref = layer.o_net(weights @ v)
    tour.say("txl_intro", L=L, M=M)
    keys = [f"m{t}" for t in range(M)] + [f"x{t}" for t in range(L)]
    i = 0
    rows = [[keys[jj]] + [fmt_number(float(t[i, jj])) if allowed[i, jj] else "-"
                          for t in (A, Bt, C, D)]
            + [fmt_number(float(total[i, jj])), fmt_number(float(weights[i, jj]), 3)]
            for jj in range(S)]
    print(table(tour.T["txl_headers"], rows))
    tour.say("txl_check", e=float((y_ref - y[0]).abs().max()))
    seen = int(allowed[0].sum())  # the keys x0 may attend to: the memory and itself
    w_mem, even = float(weights[0, :M].sum()), M / seen
    tour.say("txl_memory", w=w_mem, M=M, n=seen, u=even,
             cmp=tour.t("txl_more" if w_mem > even else "txl_less"))

    fig = viz.new_figure(12, 4.6)
    a, b = fig.subplots(1, 2)
    viz.mask_panel(a, allowed, tour.t("fig_txl_mask", L=L, M=M), tour.lang, show_density=False)
    a.set_aspect("auto")  # as tall as the weights beside it
    a.axvline(M - 0.5, color="#c44e52", lw=2)
    a.set_xticks(range(S), labels=keys)
    a.set_yticks(range(L), labels=[f"x{t}" for t in range(L)])
    viz.heatmap(b, weights.masked_fill(~allowed, float("nan")), [f"x{t}" for t in range(L)],
                keys, title=tour.t("fig_txl_weights"), vmin=0, vmax=1, digits=2,
                xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                cbar_label=tour.t("fig_weight"), cell_fontsize=10)
    b.axvline(M - 0.5, color="#c44e52", lw=2)
    tour.picture(fig, "07_transformer_xl.png")
