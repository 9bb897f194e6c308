"""Multi-head latent attention (DeepSeek's MLA) decoding: the absorbed form against the
decompressed one, against transformers' module, and against an MHA cache, in one run.

    python benchmarks/mla_bench.py                   # 4096 and 16384 cached tokens
    python benchmarks/mla_bench.py --quick           # 1024, one thread: a smoke run
    python benchmarks/mla_bench.py --dtype bfloat16

The layer is DeepSeek-V2-Lite's attention: hidden 2048, 16 heads, full-rank queries,
latent r = 512, rope part dr = 64, nope dn = 128, values dv = 128 (batch 1, random
weights, eval mode). The cache holds n tokens; each call decodes 8 tokens one at a time
(the cache is rewound after each call, so every step sees n + t cached tokens):

* ``absorbed``: :class:`attnkit.layers.MultiHeadLatentAttention` with a
  :class:`attnkit.LatentCache` (r + dr = 576 numbers per token), the absorbed form;
* ``decompressed``: the same layer and cache, ``absorb=False``: every step rebuilds the
  n cached tokens' keys and values (``kv_b_proj``) before attending;
* ``hf DeepseekV3 sdpa``: transformers' ``DeepseekV3Attention`` with a DynamicCache of
  the same latents (it rebuilds keys and values at every step, as ``decompressed``);
* ``mha cache``, ``gqa-4 cache``: a layer of the same width without the latent:
  :class:`attnkit.MultiHeadAttention` (2048, 16 query heads of 128) with 16 or 4 K/V
  heads, decoding from a :class:`attnkit.KVCache` (4096 or 1024 numbers per token).

The rows report the cache's bytes per token. Measured by ``attnkit.bench``
(benchmarks/README.md); options: ``--help``.
"""

from __future__ import annotations

import torch

from attnkit import KVCache, LatentCache, MultiHeadAttention
from attnkit.bench import script
from attnkit.bench.spec import Case, Setup, Variant
from attnkit.bench.targets import Target
from attnkit.layers import MultiHeadLatentAttention

#: DeepSeek-V2-Lite's attention
LITE = dict(hidden_size=2048, num_heads=16, q_lora_rank=None, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
STEPS = 8


def _setup(n: int) -> Setup:
    g = torch.Generator().manual_seed(0)
    r, dr = LITE["kv_lora_rank"], LITE["qk_rope_head_dim"]
    latents = torch.randn(1, 1, n, r + dr, generator=g)
    new = torch.randn(STEPS, 1, 1, LITE["hidden_size"], generator=g)
    return Setup(n, new[0], latents, latents, extra={"latents": latents, "new": new})


def _layer(s: Setup) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    return MultiHeadLatentAttention(**LITE).eval().to(s.extra["latents"].dtype)


def _latent_decoder(absorb: bool):
    def build(s: Setup):
        layer, x = _layer(s), s.extra
        cache = LatentCache()
        cache.update(x["latents"])
        n = s.n

        def call():
            with torch.no_grad():
                for t in range(STEPS):
                    out = layer(x["new"][t], cache=cache, absorb=absorb)
                cache.crop(n)  # rewind: every call decodes at context n
                return out
        call.cache_bytes = cache.nbytes
        return call
    build.__name__ = "absorbed" if absorb else "decompressed"
    return build


def hf_deepseek(s: Setup):
    """transformers' DeepseekV3Attention (sdpa) decoding from a DynamicCache holding the
    same latents, cropped back to n after each call."""
    import transformers
    from transformers.cache_utils import DynamicCache
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    x, r = s.extra, LITE["kv_lora_rank"]
    config = transformers.DeepseekV3Config(
        hidden_size=LITE["hidden_size"], num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=r, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_hidden_layers=1, max_position_embeddings=1 << 16)
    config._attn_implementation = "sdpa"
    dtype = x["latents"].dtype
    attn = ds.DeepseekV3Attention(config, layer_idx=0).eval().to(dtype)
    rotary = ds.DeepseekV3RotaryEmbedding(config)
    cache = DynamicCache()
    cache.update(x["latents"][..., :r], x["latents"][..., r:], 0)
    n = s.n

    def call():
        with torch.no_grad():
            for t in range(STEPS):
                h = x["new"][t]
                pe = rotary(h, torch.tensor([[n + t]]))
                pe = (pe[0].to(dtype), pe[1].to(dtype))
                out, _ = attn(h, pe, None, cache)
            cache.crop(-STEPS)
            return out
    call.cache_bytes = x["latents"].numel() * x["latents"].element_size()
    return call


def _mha_decoder(kv_heads: int):
    """An attention layer of the same width without the latent: attnkit's
    MultiHeadAttention(2048, 16 heads of 128, ``kv_heads`` K/V heads) decoding from a
    KVCache of n random tokens (MHA: 16 K/V heads, 4096 numbers per token; GQA: 4, 1024)."""
    def build(s: Setup):
        torch.manual_seed(0)
        dtype = s.extra["latents"].dtype
        layer = MultiHeadAttention(LITE["hidden_size"], LITE["num_heads"], kv_heads,
                                   bias=False).eval().to(dtype)
        g = torch.Generator().manual_seed(1)
        cache = KVCache()
        cache.update(torch.randn(1, kv_heads, s.n, 128, generator=g).to(dtype),
                     torch.randn(1, kv_heads, s.n, 128, generator=g).to(dtype))
        x, n = s.extra, s.n

        def call():
            with torch.no_grad():
                for t in range(STEPS):
                    out, _ = layer(x["new"][t], cache=cache, is_causal=True)
                cache.crop(n)
                return out
        call.cache_bytes = cache.nbytes
        return call
    build.__name__ = f"mha_{kv_heads}"
    return build


HF = ("transformers",)
CASES = (
    Case("mla_decode", "MLA decoding (DeepSeek-V2-Lite attention: 16 heads, r 512 + 64), "
         "8 tokens per call", _setup, kind="decode", steps=STEPS, lengths=(4096, 16384),
         quick_lengths=(1024,), heads=16, head_dim=544,
         variants=(Variant("absorbed", "attnkit", _latent_decoder(True)),
                   Variant("decompressed", "peer", _latent_decoder(False)),
                   Variant("hf DeepseekV3 sdpa", "peer", hf_deepseek, needs=HF,
                           preload=("transformers.models.deepseek_v3.modeling_deepseek_v3",)),
                   Variant("mha cache", "peer", _mha_decoder(16)),
                   Variant("gqa-4 cache", "peer", _mha_decoder(4)))),
)
TARGETS = (
    Target(17, "mla_decode", 4096, "absorbed", "speedup", 10, "decompressed"),
    Target(17, "mla_decode", 16384, "absorbed", "speedup", 10, "decompressed"),
    Target(17, "mla_decode", 16384, "absorbed", "speedup", 10, "hf DeepseekV3 sdpa"),
    Target(17, "mla_decode", 16384, "absorbed", "speedup", 1, "mha cache"),
)

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
