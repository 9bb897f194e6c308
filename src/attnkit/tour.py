"""``attnkit tour``: attention step by step, every number computed at run time."""

from __future__ import annotations

import locale
import os

import torch

from . import scaled_dot_product_attention

TEXT = {
    "en": {
        "title": "attnkit tour - attention, computed for real",
        "tokens": ["cat", "on", "tree"],
        "qkv": "Q, K, V: three projections of the token embeddings (d_k = {d})",
        "scores": "scores = Q K^T / sqrt(d_k)",
        "weights": "weights = softmax(scores): each row sums to 1",
        "out": "output = weights V",
        "check": "attnkit.scaled_dot_product_attention gives the same output: max |diff| = {e:.1e}",
    },
    "zh": {
        "title": "attnkit 导览：把注意力一步步真算出来",
        "tokens": ["猫", "在", "树上"],
        "qkv": "Q、K、V：词向量经过三个线性投影得到（d_k = {d}）",
        "scores": "打分 scores = Q K^T / sqrt(d_k)",
        "weights": "权重 weights = softmax(scores)：每一行加起来等于 1",
        "out": "输出 output = weights V",
        "check": "用 attnkit.scaled_dot_product_attention 算出的输出一致：最大误差 {e:.1e}",
    },
}


def default_lang() -> str:
    loc = (os.environ.get("LC_ALL") or os.environ.get("LANG") or locale.getlocale()[0] or "")
    return "zh" if loc.lower().startswith("zh") else "en"


def run(lang: str | None = None, out: str = "attnkit-tour", seed: int = 0) -> int:
    t = TEXT[lang or default_lang()]
    torch.manual_seed(seed)
    d = 4
    x = torch.randn(3, d)
    wq, wk, wv = (torch.randn(d, d) / d ** 0.5 for _ in range(3))
    q, k, v = x @ wq, x @ wk, x @ wv
    scores = q @ k.T / d ** 0.5
    weights = scores.softmax(-1)
    output = weights @ v
    print(t["title"])
    print(t["qkv"].format(d=d))
    for name, m in (("Q", q), ("K", k), ("V", v)):
        print(f"  {name} =\n{_fmt(m, t['tokens'])}")
    print(t["scores"])
    print(_fmt(scores, t["tokens"]))
    print(t["weights"])
    print(_fmt(weights, t["tokens"]))
    print(t["out"])
    print(_fmt(output, t["tokens"]))
    lib = scaled_dot_product_attention(q[None], k[None], v[None])[0]
    print(t["check"].format(e=(lib - output).abs().max().item()))
    return 0


def _fmt(m: torch.Tensor, names) -> str:
    return "\n".join(f"    {n:>4} [" + " ".join(f"{x:+.3f}" for x in row.tolist()) + "]"
                     for n, row in zip(names, m))
