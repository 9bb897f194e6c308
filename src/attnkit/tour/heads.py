"""Section 4 of the tour: multi-head, multi-query, grouped-query and latent attention,
with parameter counts and KV-cache sizes of real models."""

from __future__ import annotations

import torch

from .. import KVCache, LatentCache, MultiHeadAttention, scaled_dot_product_attention, viz
from ..layers import MultiHeadLatentAttention
from .qkv import qkv_example
from .session import Tour, randn
from .terminal import matrix, table

#: attention sizes from the models' public config.json files
REAL_MODELS = [
    # name, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
    ("Llama-2-7B (MHA)", 4096, 32, 32, 32),
    ("Llama-3-8B (GQA)", 4096, 32, 32, 8),
    ("MQA, same sizes", 4096, 32, 32, 1),
]
#: multi-head latent attention (the cache holds kv_lora_rank + qk_rope_head_dim numbers)
LATENT_MODELS = [
    # name, hidden_size, num_hidden_layers, num_attention_heads, q_lora_rank,
    # kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    ("MLA, same sizes", 4096, 32, 32, None, 512, 128, 64, 128),
    ("DeepSeek-V3 (MLA)", 7168, 61, 128, 1536, 512, 128, 64, 128),
]
KV_CONTEXT = 8192  # Llama-3-8B's context length


def latent_cache_bytes_per_token(num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int,
                                 dtype=torch.float16) -> int:
    """Bytes one token adds to a whole MLA model's cache, measured with LatentCache."""
    cache = LatentCache()
    cache.update(torch.zeros(1, 1, 1, kv_lora_rank + qk_rope_head_dim, dtype=dtype))
    return cache.nbytes * num_layers


def latent_attention_params(hidden: int, heads: int, q_lora_rank, kv_lora_rank: int,
                            nope: int, rope: int, v: int) -> int:
    """Parameters of one MLA layer (projections and the two norms), on the meta device."""
    layer = MultiHeadLatentAttention(hidden, heads, q_lora_rank, kv_lora_rank, nope, rope, v,
                                     device="meta")
    return sum(p.numel() for p in layer.parameters())


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                             dtype=torch.float16) -> int:
    """Bytes one token adds to the KV cache of a whole model, measured with KVCache."""
    cache = KVCache()
    one = torch.zeros(1, num_kv_heads, 1, head_dim, dtype=dtype)
    cache.update(one, one.clone())
    return cache.nbytes * num_layers


def attention_params(hidden: int, heads: int, kv_heads: int) -> int:
    """Parameters of one attention layer (no biases, as in Llama), on the meta device."""
    layer = MultiHeadAttention(hidden, heads, kv_heads, bias=False, device="meta")
    return sum(p.numel() for p in layer.parameters())


def _bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 524288 -> '512 KiB' (one decimal below 10 of a unit)."""
    units = ["B", "KiB", "MiB", "GiB"]
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.1f} {units[k]}" if n < 10 and k > 0 else f"{n:.0f} {units[k]}"


def section_heads(tour: Tour) -> None:
    """Show per-head weights, GQA sharing, and parameters and KV cache of real models."""
    ex = qkv_example(tour.seed, tour.lang)
    tok = ex["tokens"]
    E, H = ex["d_model"], 2
    torch.manual_seed(tour.seed * 1000 + 4)
    mha = MultiHeadAttention(E, H)
    with torch.no_grad():
        for lin in (mha.q_proj, mha.k_proj):
            lin.weight.mul_(2.0)
        _, w = mha(ex["X"][None], need_weights=True)
    tour.say("heads_intro", E=E, H=H, d=E // H)
    for h in range(H):
        print(f"  {tour.t('head', h=h + 1)}")
        print(matrix(w[0, h], tok, tok, digits=3, corner="Q \\ K"))

    g = tour.gen(44)
    hq, hkv = 8, 2
    q, k, v = randn(g, 1, hq, 5, 4), randn(g, 1, hkv, 5, 4), randn(g, 1, hkv, 5, 4)
    shared = scaled_dot_product_attention(q, k, v)
    copied = scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1),
                                          v.repeat_interleave(hq // hkv, 1))
    tour.say("heads_gqa", hq=hq, hkv=hkv, g=hq // hkv, e=float((shared - copied).abs().max()))

    tour.say("heads_real", ctx=KV_CONTEXT)
    rows, bars = [], []
    for name, hidden, layers, heads, kv in REAL_MODELS:
        name = tour.t("mqa_name") if kv == 1 else name
        head_dim = hidden // heads
        p = attention_params(hidden, heads, kv)
        per_tok = kv_cache_bytes_per_token(layers, kv, head_dim)
        rows.append([name, heads, kv, head_dim, f"{p / 1e6:.1f} M", f"{p * layers / 1e9:.2f} B",
                     _bytes(per_tok), _bytes(per_tok * KV_CONTEXT)])
        bars.append((name, per_tok, p))
    for name, hidden, layers, heads, q_rank, r, nope, rope, v in LATENT_MODELS:
        p = latent_attention_params(hidden, heads, q_rank, r, nope, rope, v)
        per_tok = latent_cache_bytes_per_token(layers, r, rope)
        rows.append([tour.t("mla_name") if hidden == REAL_MODELS[0][1] else name, heads,
                     tour.t("latent_kv", n=r + rope), f"{nope}+{rope}", f"{p / 1e6:.1f} M",
                     f"{p * layers / 1e9:.2f} B", _bytes(per_tok), _bytes(per_tok * KV_CONTEXT)])
        if hidden == REAL_MODELS[0][1]:
            bars.append((tour.t("mla_name"), per_tok, p))
    tour.show(table(tour.T["heads_headers"], rows))
    ratio = bars[0][1] / bars[1][1], bars[0][1] / bars[2][1]
    tour.say("heads_outro", r_gqa=ratio[0], r_mqa=ratio[1])
    mla = bars[3][1]
    tour.say("heads_mla", r_mha=bars[0][1] / mla, r_gqa=bars[1][1] / mla,
             r_mqa=mla / bars[2][1], n=LATENT_MODELS[0][5] + LATENT_MODELS[0][7],
             kv=2 * REAL_MODELS[1][4] * REAL_MODELS[1][1] // REAL_MODELS[1][3])

    fig = viz.new_figure(9.5, 4.2)
    axes = fig.subplots(1, H)
    for h in range(H):
        viz.heatmap(axes[h], w[0, h], tok, tok, title=tour.t("head", h=h + 1), vmin=0,
                    vmax=1, digits=3, xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                    cbar_label=tour.t("fig_weight"))
    fig.suptitle(tour.t("fig_heads_suptitle", E=E, H=H))
    tour.picture(fig, "05_heads.png")

    fig = viz.new_figure(11, 4.4)
    a, b = fig.subplots(1, 2)
    names = [n for n, _, _ in bars]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
    kib = [x / 1024 for _, x, _ in bars]
    rects = a.bar(names, kib, color=colors)
    a.bar_label(rects, labels=[f"{x:.0f} KiB" for x in kib], padding=2)
    a.set_ylabel(tour.t("fig_kv_per_token"))
    a.set_title(tour.t("fig_kv_title"))
    a.set_ylim(0, max(kib) * 1.18)
    params = [p / 1e6 for _, _, p in bars]
    rects = b.bar(names, params, color=colors)
    b.bar_label(rects, labels=[f"{x:.1f} M" for x in params], padding=2)
    b.set_ylabel(tour.t("fig_params_layer"))
    b.set_title(tour.t("fig_params_title"))
    b.set_ylim(0, max(params) * 1.18)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    tour.picture(fig, "05_kv_cache.png")
