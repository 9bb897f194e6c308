"""``attnkit tour``: attention step by step, every number computed at run time.

Seven sections, each a function ``section_*(tour)`` that computes with attnkit's own code
(``scaled_dot_product_attention(..., return_weights=True)``, ``MultiHeadAttention``,
``KVCache``, the mask and bias objects, ``attnkit.positional``, the Transformer-XL
layer), prints small rounded tensors and writes pictures to the output folder. Texts live
in :mod:`attnkit.tour_text` (English and Chinese); pictures are drawn by :mod:`attnkit.viz`.

    attnkit tour [--lang zh|en] [--out DIR] [--seed N]
"""

from __future__ import annotations

import json
import locale
import math
import os
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import torch
from torch import Tensor

from . import KVCache, MultiHeadAttention, bias as B, masks, scaled_dot_product_attention
from . import viz
from .tour_text import TEXT

__all__ = ["run", "default_lang", "PICTURES", "SECTIONS", "qkv_example", "REAL_MODELS"]

#: every picture the tour writes, by section
PICTURES = [
    "01_why_attention.png", "02_qkv_scores.png", "02_scaling.png", "03_self_cross.png",
    "04_heads.png", "04_kv_cache.png", "05_padding.png", "06_t5_buckets.png",
    "06_alibi.png", "06_rope.png", "06_transformer_xl.png", "07_sparse_masks.png",
    "07_memory.png",
]

#: attention sizes from the models' public config.json files
REAL_MODELS = [
    # name, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
    ("Llama-2-7B (MHA)", 4096, 32, 32, 32),
    ("Llama-3-8B (GQA)", 4096, 32, 32, 8),
    ("MQA, same sizes", 4096, 32, 32, 1),
]
KV_CONTEXT = 8192  # Llama-3-8B's context length


def default_lang() -> str:
    """'zh' when the locale (LC_ALL, LC_MESSAGES or LANG, first one set) is Chinese."""
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    loc = locale.getlocale()[0] or ""
    return "zh" if loc.lower().startswith("zh") else "en"


# --------------------------------------------------------------------------- printing

def _width(s: str) -> int:
    """Terminal columns of ``s``: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _pad(s: str, n: int, right: bool = True) -> str:
    fill = " " * max(0, n - _width(s))
    return fill + s if right else s + fill


def _num(x: float, digits: int = 2) -> str:
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    s = f"{x:.{digits}f}"
    return s if s.strip("-0.") else s.replace("-", "")  # no "-0.00"


_NUMBER = re.compile(r"^(-|[-+]?(\d[\d.]*(e[-+]?\d+)?|inf)( ?(%|x|[KMG]?i?B|M|B))?)$")


def table(headers, rows, indent: int = 4) -> str:
    """Aligned columns (display-width aware): numbers right, text left."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [i > 0 and all(_NUMBER.match(r[i]) for r in cells[1:])
               for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [_pad(c, w, right=numeric[i]) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(" " * indent + "  ".join(parts).rstrip())
        if k == 0:
            lines.append(" " * indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def matrix(m: Tensor, rows, cols=None, digits: int = 2, corner: str = "") -> str:
    """A small matrix with row (and column) labels, rounded to ``digits``."""
    m = m.detach().double()
    cols = cols if cols is not None else [str(j) for j in range(m.shape[1])]
    return table([corner] + list(cols),
                 [[r] + [_num(float(x), digits) for x in row] for r, row in zip(rows, m)])


class Tour:
    """Shared state of one run: language, output folder, seed, pictures written."""

    def __init__(self, lang: str, out: Path, seed: int):
        self.lang, self.out, self.seed = lang, out, seed
        self.T = TEXT[lang]
        self.pictures: list[Path] = []
        self.memory: MemoryProbe | None = None
        self.t0 = time.perf_counter()

    def t(self, key: str, **kw) -> str:
        return self.T[key].format(**kw)

    def say(self, key: str, **kw) -> None:
        print("\n".join("  " + line if line else "" for line in self.t(key, **kw).split("\n")))

    def show(self, text: str) -> None:
        print(text)

    def gen(self, offset: int) -> torch.Generator:
        """A generator seeded by (seed, section offset): sections do not disturb each other."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def picture(self, fig, name: str) -> None:
        path = viz.save(fig, self.out / name)
        self.pictures.append(path)
        print(f"  -> {self.t('picture', path=path)}", flush=True)


def _randn(g, *shape) -> Tensor:
    return torch.randn(*shape, generator=g)


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _attend(q, k, v, **kw):
    """attnkit's attention on (L, d) / (H, L, d) tensors, with the weights."""
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    return out, w


# --------------------------------------------------------------------------- 1. why

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
    W = torch.linalg.qr(_randn(g, d_rnn, d_rnn))[0]  # orthogonal: no growth or decay by
    U = _randn(g, d_rnn, d_rnn) / math.sqrt(d_rnn)    # itself; tanh does the rest
    Wq, Wk, Wv = (_randn(g, d_rnn, d_rnn) / math.sqrt(d_rnn) for _ in range(3))
    res = []
    for n in lengths:
        acc = {"summary_cos": 0.0, "attn_cos": 0.0, "weight": 0.0, "rnn_grad": 0.0,
               "attn_grad": 0.0}
        for _ in range(trials):
            x = _randn(g, n, d)
            out, w = _attend(x[None, :1], x[None], x[None])   # q = x_1: "find token 1"
            acc["summary_cos"] += _cos(x.mean(0), x[0]) / trials
            acc["attn_cos"] += _cos(out[0, 0], x[0]) / trials
            acc["weight"] += float(w[0, 0, 0]) / trials
            xs = _randn(g, n, d_rnn)

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


def section_why(tour: Tour) -> None:
    d, trials = 64, 8
    tour.say("why_intro", d=d, trials=trials)
    res = why_measurements(tour.seed, d=d, trials=trials)
    rows = [[r["n"], f"{r['summary_cos']:.3f}", f"{r['attn_cos']:.3f}", f"{r['weight']:.3f}",
             f"{r['rnn_grad']:.1e}", f"{r['attn_grad']:.1e}"] for r in res]
    tour.show(table(tour.T["why_headers"], rows))
    tour.say("why_outro")
    lengths = [r["n"] for r in res]
    series = {"summary": [r["summary_cos"] for r in res], "attn": [r["attn_cos"] for r in res],
              "rnn": [r["rnn_grad"] for r in res], "attn_grad": [r["attn_grad"] for r in res]}

    fig = viz.new_figure(11, 4.3)
    a, b = fig.subplots(1, 2)
    a.plot(lengths, series["summary"], "o-", label=tour.t("fig_why_summary"))
    a.plot(lengths, series["attn"], "s-", label=tour.t("fig_why_attn"))
    a.set_xscale("log", base=2)
    a.set_ylim(0, 1.05)
    a.set_xlabel(tour.t("fig_why_n"))
    a.set_ylabel(tour.t("fig_why_cos"))
    a.set_title(tour.t("fig_why_title1"))
    a.legend()
    a.grid(alpha=0.3)
    b.plot(lengths, series["rnn"], "o-", label="RNN")
    b.plot(lengths, series["attn_grad"], "s-", label=tour.t("fig_why_attn_layer"))
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel(tour.t("fig_why_n"))
    b.set_ylabel(tour.t("fig_why_grad"))
    b.set_title(tour.t("fig_why_title2"))
    b.legend()
    b.grid(alpha=0.3)
    tour.picture(fig, "01_why_attention.png")


# --------------------------------------------------------------------------- 2. Q, K, V

def qkv_example(seed: int, lang: str = "en") -> dict:
    """The tensors of section 2: embeddings E (3, 8), positions P, X = E + P, the
    projections W_Q/W_K/W_V (8, 4) and Q, K, V (3, 4)."""
    from .positional import sinusoidal_encoding
    g = torch.Generator().manual_seed(seed * 1000 + 2)
    d_model, d_k = 8, 4
    E = _randn(g, 3, d_model)
    P = sinusoidal_encoding(3, d_model)
    X = E + P
    Wq, Wk, Wv = (_randn(g, d_model, d_k) / math.sqrt(d_model) for _ in range(3))
    return dict(tokens=TEXT[lang]["tokens"], E=E, P=P, X=X, Wq=Wq, Wk=Wk, Wv=Wv,
                Q=X @ Wq, K=X @ Wk, V=X @ Wv, d_model=d_model, d_k=d_k)


def section_qkv(tour: Tour) -> None:
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
    out, w = _attend(Q[None], K[None], V[None])
    out, w = out[0], w[0]
    tour.say("qkv_weights")
    print(matrix(w, tok, tok, digits=3, corner="Q \\ K"))
    tour.say("qkv_check", e=float((scaled.softmax(-1) - w).abs().max()))
    tour.say("qkv_out")
    terms = " + ".join(f"{float(w[0, j]):.3f}·V[{tok[j]}]" for j in range(3))
    mixed = (w[0, :, None] * V).sum(0)
    vec = "[" + ", ".join(_num(float(x)) for x in mixed) + "]"
    print(f"    out[{tok[0]}] = {terms}")
    print(f"    {' ' * (_width(tok[0]) + 6)}= {vec}")
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
    tour.picture(fig, "02_qkv_scores.png")
    _scaling(tour)


def scaling_measurements(seed: int, dims=(4, 16, 64, 256, 1024), pairs: int = 4096,
                         rows: int = 256, keys: int = 32) -> list[dict]:
    """Var(q.k) with and without 1/sqrt(d_k), and the entropy / largest weight of the
    softmax over ``keys`` keys with and without scaling, for each d_k."""
    g = torch.Generator().manual_seed(seed * 1000 + 22)
    res = []
    for d in dims:
        q, k = _randn(g, pairs, d), _randn(g, pairs, d)
        dots = (q * k).sum(-1)
        Q, Kx = _randn(g, 1, rows, d), _randn(g, 1, keys, d)
        V = torch.zeros(1, keys, 1)
        entry = {"d_k": d, "var": float(dots.var()), "var_scaled": float((dots / d ** 0.5).var())}
        for tag, scale in (("raw", 1.0), ("scaled", None)):
            _, w = _attend(Q, Kx, V, scale=scale)
            ent = -(w * w.clamp_min(1e-30).log()).sum(-1)
            entry[f"entropy_{tag}"] = float(ent.mean())
            entry[f"max_{tag}"] = float(w.amax(-1).mean())
        res.append(entry)
    return res


def _scaling(tour: Tour) -> None:
    keys, pairs = 32, 4096
    tour.say("scale_intro", n=pairs, keys=keys, hmax=math.log(keys))
    res = scaling_measurements(tour.seed, pairs=pairs, keys=keys)
    rows = [[r["d_k"], f"{r['var']:.1f}", f"{r['var_scaled']:.2f}", f"{r['entropy_raw']:.2f}",
             f"{r['entropy_scaled']:.2f}", f"{r['max_raw']:.2f}", f"{r['max_scaled']:.2f}"]
            for r in res]
    tour.show(table(tour.T["scale_headers"], rows))
    tour.say("scale_outro")

    dims = [r["d_k"] for r in res]
    fig = viz.new_figure(11, 4.3)
    a, b = fig.subplots(1, 2)
    a.plot(dims, [r["var"] for r in res], "o-", label="Var(q·k)")
    a.plot(dims, [r["var_scaled"] for r in res], "s-", label="Var(q·k / √d_k)")
    a.plot(dims, dims, "k:", lw=1, label="d_k")
    a.set_xscale("log", base=2)
    a.set_yscale("log", base=2)
    a.set_xlabel("d_k")
    a.set_ylabel(tour.t("fig_variance"))
    a.set_title(tour.t("fig_scale_title1"))
    a.legend()
    a.grid(alpha=0.3)
    b.plot(dims, [r["entropy_raw"] for r in res], "o-", label=tour.t("fig_unscaled"))
    b.plot(dims, [r["entropy_scaled"] for r in res], "s-", label=tour.t("fig_scaled"))
    b.axhline(math.log(keys), color="k", ls=":", lw=1, label=tour.t("fig_uniform", n=keys))
    b.set_xscale("log", base=2)
    b.set_ylim(0, math.log(keys) * 1.1)
    b.set_xlabel("d_k")
    b.set_ylabel(tour.t("fig_entropy"))
    b.set_title(tour.t("fig_scale_title2", n=keys))
    b.legend()
    b.grid(alpha=0.3)
    tour.picture(fig, "02_scaling.png")


# --------------------------------------------------------------------------- 3. self/cross

#: the translation pair: Chinese tokens, English tokens, and which Chinese word each
#: English word means (-1: none)
ZH_SENT = ["猫", "在", "树上"]
EN_SENT = ["the", "cat", "is", "on", "the", "tree"]
EN_MEANS = [-1, 0, 1, 1, -1, 2]


def _translation_pair(g, E: int):
    """Embeddings where words that mean the same are close in both languages: each
    meaning is one of a set of orthogonal directions (norm sqrt(E)), plus 30% noise;
    words without a counterpart get directions of their own."""
    basis = torch.linalg.qr(_randn(g, E, E))[0].T * math.sqrt(E)
    zh = basis[:3] + 0.3 * _randn(g, 3, E)
    own = iter(basis[3:])
    en = torch.stack([(basis[m] if m >= 0 else next(own)) + 0.3 * _randn(g, E)
                      for m in EN_MEANS])
    return zh, en


def section_self_cross(tour: Tour) -> None:
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
        R = torch.linalg.qr(_randn(g, E, E))[0] * 1.3
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
        print(f"    {_pad(tokn, 6, right=False)} -> {src_tok[int(best.indices[i])]} "
              f"({float(best.values[i]):.2f})")
    tour.say("cross_same", e=float((y - y_ref).abs().max()))
    tour.say("cross_outro")

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
    tour.picture(fig, "03_self_cross.png")


# --------------------------------------------------------------------------- 4. heads

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
    q, k, v = _randn(g, 1, hq, 5, 4), _randn(g, 1, hkv, 5, 4), _randn(g, 1, hkv, 5, 4)
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
    tour.show(table(tour.T["heads_headers"], rows))
    ratio = bars[0][1] / bars[1][1], bars[0][1] / bars[2][1]
    tour.say("heads_outro", r_gqa=ratio[0], r_mqa=ratio[1])

    fig = viz.new_figure(9.5, 4.2)
    axes = fig.subplots(1, H)
    for h in range(H):
        viz.heatmap(axes[h], w[0, h], tok, tok, title=tour.t("head", h=h + 1), vmin=0,
                    vmax=1, digits=3, xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                    cbar_label=tour.t("fig_weight"))
    fig.suptitle(tour.t("fig_heads_suptitle", E=E, H=H))
    tour.picture(fig, "04_heads.png")

    fig = viz.new_figure(11, 4.4)
    a, b = fig.subplots(1, 2)
    names = [n for n, _, _ in bars]
    colors = ["#4c72b0", "#55a868", "#c44e52"]
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
    tour.picture(fig, "04_kv_cache.png")


# --------------------------------------------------------------------------- 5. padding

def section_padding(tour: Tour) -> None:
    g = tour.gen(5)
    d = 8
    s1, s2 = tour.T["pad_sentences"]
    lengths = [len(s1), len(s2)]
    S = max(lengths)
    pad = "[PAD]"
    tok2 = s2 + [pad] * (S - len(s2))
    x = _randn(g, 2, S, d)
    x[1, len(s2):] = 0.0                            # the pad embedding
    Wq, Wk, Wv = (_randn(g, d, d) / math.sqrt(d) * 1.5 for _ in range(3))

    def attend(x, mask):
        return _attend((x @ Wq)[:, None], (x @ Wk)[:, None], (x @ Wv)[:, None],
                       attn_mask=mask)

    mask = masks.padding(lengths)
    out_m, w_m = attend(x, mask)
    out_n, w_n = attend(x, None)
    q2, k2 = x[1] @ Wq, x[1] @ Wk
    scores = (q2 @ k2.T) / math.sqrt(d)
    scores = scores.masked_fill(~mask.materialize(S, S)[1, 0], float("-inf"))
    tour.say("pad_intro", s1=" ".join(s1), s2=" ".join(s2), l1=lengths[0], l2=lengths[1])
    print(matrix(scores, tok2, tok2, corner="Q \\ K"))
    w2 = w_m[1, 0]
    on_pad = w2[:, len(s2):]
    tour.say("pad_weights", m=_num(float(on_pad.max()), 1) if on_pad.max() == 0
             else f"{float(on_pad.max()):.2e}")
    print(matrix(w2, tok2, tok2, digits=3, corner="Q \\ K"))
    tour.say("pad_rows")
    tour.say("pad_nomask")
    print(matrix(w_n[1, 0], tok2, tok2, digits=3, corner="Q \\ K"))
    # what goes wrong: outputs depend on the pad vectors
    x_other = x.clone()
    x_other[1, len(s2):] = _randn(g, S - len(s2), d)
    out_m2, _ = attend(x_other, mask)
    out_n2, _ = attend(x_other, None)
    real = slice(0, len(s2))
    d_nomask = float((out_n2[1, 0, real] - out_n[1, 0, real]).abs().max())
    d_mask = float((out_m2[1, 0, real] - out_m[1, 0, real]).abs().max())
    alone, _ = attend(x[1:, :len(s2)], None)
    e_alone = float((alone[0, 0] - out_m[1, 0, real]).abs().max())
    tour.say("pad_wrong", tok=s2[0], d_nomask=d_nomask, d_mask=_num(d_mask, 1)
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
    tour.picture(fig, "05_padding.png")


# --------------------------------------------------------------------------- 6. positions

T5_OFFSETS = [-200, -128, -64, -32, -16, -8, -7, -1, 0, 1, 7, 8, 16, 32, 64, 128, 200]


def section_positions(tour: Tour) -> None:
    from .positional import RotaryEmbedding, T5RelativeBias, relative_position_bucket
    g = tour.gen(6)
    # permutation invariance
    q, k, v = _randn(g, 1, 1, 6, 8), _randn(g, 1, 1, 6, 8), _randn(g, 1, 1, 6, 8)
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
    tour.picture(fig, "06_t5_buckets.png")

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
    for ax, h in zip(axes, (0, 3, 7)):
        viz.heatmap(ax, full[h], title=tour.t("fig_alibi_head", h=h + 1, s=float(s8[h])),
                    annotate=False, cmap="magma", xlabel=tour.t("fig_key"),
                    ylabel=tour.t("fig_query"), cbar_label=tour.t("fig_bias"))
    fig.suptitle(tour.t("fig_alibi_suptitle"))
    tour.picture(fig, "06_alibi.png")

    # RoPE
    d, P = 8, 32
    rope = RotaryEmbedding(d)
    qv, kv = _randn(g, d), _randn(g, d)
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
    tour.picture(fig, "06_rope.png")
    _transformer_xl(tour, g)


def _transformer_xl(tour: Tour, g) -> None:
    from .layers.transformer_xl import TransformerXLAttention
    from .positional import relative_sinusoidal_encoding
    d_model, H, dh, L, M = 8, 1, 8, 4, 4
    torch.manual_seed(tour.seed * 1000 + 66)
    layer = TransformerXLAttention(d_model, H, dh)
    with torch.no_grad():
        layer.r_w_bias.normal_(0, 0.5)
        layer.r_r_bias.normal_(0, 0.5)
        layer.qkv_net.weight.mul_(2.0)
        layer.r_net.weight.mul_(2.0)
    seg1, seg2 = _randn(g, 1, L, d_model), _randn(g, 1, L, d_model)
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
    rows = [[keys[jj]] + [_num(float(t[i, jj])) if allowed[i, jj] else "-"
                          for t in (A, Bt, C, D)]
            + [_num(float(total[i, jj])), _num(float(weights[i, jj]), 3)] for jj in range(S)]
    print(table(tour.T["txl_headers"], rows))
    tour.say("txl_check", e=float((y_ref - y[0]).abs().max()))
    tour.say("txl_memory", w=float(weights[0, :M].sum()), M=M)

    fig = viz.new_figure(11.5, 4.2)
    a, b = fig.subplots(1, 2)
    viz.mask_panel(a, allowed, tour.t("fig_txl_mask", L=L, M=M), tour.lang, show_density=False)
    a.axvline(M - 0.5, color="#c44e52", lw=2)
    a.set_xticks(range(S), labels=keys)
    a.set_yticks(range(L), labels=[f"x{t}" for t in range(L)])
    viz.heatmap(b, weights.masked_fill(~allowed, float("nan")), [f"x{t}" for t in range(L)],
                keys, title=tour.t("fig_txl_weights"), vmin=0, vmax=1, digits=2,
                xlabel=tour.t("fig_key"), ylabel=tour.t("fig_query"),
                cbar_label=tour.t("fig_weight"))
    b.axvline(M - 0.5, color="#c44e52", lw=2)
    tour.picture(fig, "06_transformer_xl.png")


# --------------------------------------------------------------------------- 7. long

MEMORY_LENGTHS = [512, 1024, 2048, 4096]
MEMORY_HEAD_DIM = 64
MEMORY_WINDOW = 128


def peak_allocated(fn) -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated
    before: the running sum of torch.profiler's memory events (+ on every allocation,
    - on every free), in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def _memory_child() -> None:
    """Runs in a fresh interpreter (argv[1]: JSON [lengths, head_dim, window]); prints
    one JSON object {case: [peak bytes per length]}."""
    import warnings
    warnings.filterwarnings("ignore")
    lengths, d, w = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparse = masks.sliding_window(w) | masks.global_tokens([0])
    cases = {"dense": dict(attn_mask=sparse, backend="reference"),
             "chunked_causal": dict(is_causal=True, backend="chunked"),
             "chunked_window": dict(attn_mask=sparse, backend="chunked")}
    res = {}
    for L in lengths:
        q, k, v = (torch.randn(1, 1, L, d) for _ in range(3))
        for name, kw in cases.items():
            scaled_dot_product_attention(q[..., :64, :], k[..., :64, :], v[..., :64, :], **kw)
            res.setdefault(name, []).append(
                peak_allocated(lambda: scaled_dot_product_attention(q, k, v, **kw)))
    print(json.dumps(res))


class MemoryProbe:
    """The memory measurement of section 7, started early in its own fresh interpreter
    (so the tour's own allocations cannot disturb it, and it runs while the other
    sections compute); ``result()`` waits for it."""

    def __init__(self, lengths=MEMORY_LENGTHS, head_dim=MEMORY_HEAD_DIM, window=MEMORY_WINDOW):
        code = "from attnkit.tour import _memory_child; _memory_child()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps([list(lengths), head_dim, window])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 300) -> dict[str, list[int]]:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"memory measurement failed: {err.strip()[-500:]}")
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def section_long(tour: Tour) -> None:
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
    viz.plot_masks([(f"{name}\n{spec}", m) for name, spec, m in patterns], n,
                   tour.out / "07_sparse_masks.png", lang=tour.lang,
                   suptitle=tour.t("fig_long_suptitle", n=n))
    tour.pictures.append(tour.out / "07_sparse_masks.png")
    print(f"  -> {tour.t('picture', path=tour.out / '07_sparse_masks.png')}", flush=True)

    tour.say("mem_intro", d=MEMORY_HEAD_DIM, w=MEMORY_WINDOW)
    print(f"  {tour.t('mem_running')}", flush=True)
    mem = (tour.memory or MemoryProbe()).result()
    mib = {k: [x / 2 ** 20 for x in v] for k, v in mem.items()}
    rows = [[L, f"{mib['dense'][i]:.1f}", f"{mib['chunked_causal'][i]:.1f}",
             f"{mib['chunked_window'][i]:.1f}",
             f"{mem['dense'][i] / max(mem['chunked_window'][i], 1):.0f}x"]
            for i, L in enumerate(MEMORY_LENGTHS)]
    print(table(tour.T["mem_headers"], rows))
    growth = mem["dense"][-1] / mem["dense"][-2]
    growth_c = mem["chunked_window"][-1] / max(mem["chunked_window"][-2], 1)
    tour.say("mem_outro", g=growth, gc=growth_c)

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
    tour.picture(fig, "07_memory.png")


# --------------------------------------------------------------------------- driver

SECTIONS = [("sec_why", section_why), ("sec_qkv", section_qkv),
            ("sec_cross", section_self_cross), ("sec_heads", section_heads),
            ("sec_padding", section_padding), ("sec_positions", section_positions),
            ("sec_long", section_long)]


def _utf8_stdout() -> None:
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "猫√·".encode(enc)
    except (UnicodeEncodeError, LookupError):
        try:
            sys.stdout.reconfigure(errors="replace")
        except AttributeError:
            pass


def run(lang: str | None = None, out: str = "attnkit-tour", seed: int = 0) -> int:
    """Run the whole tour; returns the exit code (0)."""
    lang = lang or default_lang()
    if lang not in TEXT:
        raise ValueError(f"--lang must be one of {', '.join(TEXT)}, got {lang!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _utf8_stdout()
    tour = Tour(lang, out_dir, seed)
    tour.memory = MemoryProbe()
    threads = torch.get_num_threads()
    # every tensor here is tiny: one thread avoids thread start-up and spinning, which
    # costs far more than these computations (10x or more on a busy machine)
    torch.set_num_threads(1)
    try:
        return _run(tour)
    finally:
        torch.set_num_threads(threads)
        tour.memory.stop()


def _run(tour: Tour) -> int:
    seed, out_dir = tour.seed, tour.out
    torch.manual_seed(seed)
    print(tour.t("title"))
    tour.say("header", seed=seed, out=out_dir)
    if not viz.cjk_font_available():
        print(f"  {tour.t('no_cjk_font')}", file=sys.stderr)
    with viz.style():  # fonts that can draw Chinese, for every artist of every picture
        for i, (key, section) in enumerate(SECTIONS, 1):
            start = time.perf_counter()
            title = f"[{i}/{len(SECTIONS)}] {tour.t(key)}"
            print(f"\n{title}\n{'=' * _width(title)}", flush=True)
            section(tour)
            print(f"  {tour.t('elapsed', s=time.perf_counter() - start)}", flush=True)
    tour.say("done", s=time.perf_counter() - tour.t0, n=len(tour.pictures), out=out_dir)
    for p in tour.pictures:
        print(f"    {p}")
    return 0

