"""attnkit's side of every case, and the inputs the cases are measured on.

A *setup* function takes a length n and returns a :class:`~attnkit.bench.spec.Setup`
(built inside the worker process); an attnkit *builder* takes that setup and returns the
zero-argument call that is timed. What a builder does before returning (building a layer,
a cache) is setup, timed and sized separately. The peers' builders are in
:mod:`attnkit.bench.peers`.
"""

from __future__ import annotations

import torch

from .. import masks as M
from ..bias import alibi
from ..cache import KVCache, PagedKVCache, SlidingWindowCache
from ..functional import scaled_dot_product_attention
from ..layers import BigBirdAttention, LongformerAttention
from ..positional import T5RelativeBias
from . import peers
from .spec import D, H, Setup

__all__ = ["attnkit_sdpa", "attnkit_train", "attnkit_decode", "attnkit_paged_decode", "attnkit_rolling_decode",
           "attnkit_longformer_layer", "attnkit_bigbird_layer", "attnkit_patched",
           "qkv", "plain_setup", "softcap_setup", "alibi_setup", "t5_setup", "decode_setup",
           "layer_setup",
           "model_input_setup"]


# --------------------------------------------------------------------------- attnkit calls

def attnkit_sdpa(backend: str = "auto"):
    """``attnkit.scaled_dot_product_attention`` with the case's mask/bias objects."""
    def build(s: Setup):
        def call():
            with torch.no_grad():
                return scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=s.mask,
                                                    is_causal=s.is_causal, bias=s.bias,
                                                    scale=s.scale, softcap=s.softcap,
                                                    backend=backend)
        return call
    build.__name__ = f"attnkit_{backend}"
    return build


def attnkit_train(backend: str = "auto"):
    """One forward + backward through ``attnkit.scaled_dot_product_attention``."""
    def build(s: Setup):
        return peers.train_step(s, lambda q, k, v: scaled_dot_product_attention(
            q, k, v, attn_mask=s.mask, is_causal=s.is_causal, backend=backend))
    return build


def attnkit_decode(s: Setup):
    """``KVCache.update`` then attention for the one new query, ``is_causal=True``
    (bottom-right: the new token sees the whole cache). The cache is rewound after each
    call so every call decodes at the same context length."""
    x = s.extra
    cache = KVCache()
    cache.update(x["k_context"], x["v_context"])
    n, steps = s.n, x["steps"]

    def call():
        with torch.no_grad():
            for t in range(steps):
                k, v = cache.update(x["k_new"][t], x["v_new"][t])
                out = scaled_dot_product_attention(x["q_new"][t], k, v, is_causal=True)
            call.cache_bytes = cache.nbytes * n // cache.length  # at context length n
            cache.crop(n)
            return out
    call.cache_bytes = cache.nbytes
    return call


def attnkit_paged_decode(block_size: int):
    """``PagedKVCache.update`` then :meth:`~attnkit.PagedKVCache.attention`, which reads
    the cache through its block table; rewound with ``crop`` after each call."""
    def build(s: Setup):
        x = s.extra
        k0 = x["k_context"]
        n, steps = s.n, x["steps"]
        blocks = -(-(n + steps) // block_size)
        cache = PagedKVCache(blocks, block_size, k0.shape[1], k0.shape[3], dtype=k0.dtype)
        cache.update(k0, x["v_context"])

        def call():
            with torch.no_grad():
                for t in range(steps):
                    cache.update(x["k_new"][t], x["v_new"][t])
                    out = cache.attention(x["q_new"][t], is_causal=True)
                cache.crop(n)
                return out
        call.cache_bytes = 2 * k0.numel() * k0.element_size()  # at context length n
        return call
    build.__name__ = f"attnkit_paged_decode_{block_size}"
    return build


def attnkit_rolling_decode(s: Setup):
    """The rolling sliding-window cache: keeps only the last ``window`` keys."""
    x = s.extra
    cache = SlidingWindowCache(x["window"])
    cache.update(x["k_context"], x["v_context"])
    steps = x["steps"]
    mask = M.sliding_window(x["window"] - 1, 0)

    def call():
        with torch.no_grad():
            for t in range(steps):
                k, v = cache.update(x["k_new"][t], x["v_new"][t])
                out = scaled_dot_product_attention(x["q_new"][t], k, v, attn_mask=mask)
            call.cache_bytes = cache.nbytes
            return out
    call.cache_bytes = cache.nbytes
    return call


def attnkit_longformer_layer(s: Setup):
    """``LongformerAttention`` (window 2w, the first ``num_global`` tokens global)."""
    x = s.extra
    torch.manual_seed(0)
    layer = LongformerAttention(x["d_model"], x["heads"], 2 * x["window"]).eval().to(s.q.dtype)
    is_global = torch.zeros(1, s.n, dtype=torch.bool)
    is_global[:, :x["num_global"]] = True

    def call():
        with torch.no_grad():
            return layer(x["hidden"], global_attention_mask=is_global)
    return call


def attnkit_bigbird_layer(pattern: str = "bigbird"):
    """``BigBirdAttention`` (block 64, 3 window, 2 global, 3 random blocks) with the
    generic seeded pattern ("bigbird") or HuggingFace's exact layout ("hf")."""
    def build(s: Setup):
        x = s.extra
        torch.manual_seed(0)
        layer = BigBirdAttention(x["d_model"], x["heads"], x["block"], x["random_blocks"],
                                 pattern=pattern).eval().to(s.q.dtype)

        def call():
            with torch.no_grad():
                return layer(x["hidden"])
        return call
    build.__name__ = f"attnkit_bigbird_layer_{pattern}"
    return build


def attnkit_patched(model_class: str, config, module_path: str, call_args=None):
    """A one-layer transformers model after ``attnkit.integrations.hf.patch``: the patched
    attention module, called with the arguments the model passes it."""
    def build(s: Setup):
        import transformers

        from ..integrations.hf import patch
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config(s)).eval().to(s.q.dtype)
        patch(model)
        module = peers.submodule(model, module_path)
        kwargs = call_args(s) if call_args else {}

        def call():
            with torch.no_grad():
                return module(s.extra["hidden"], **kwargs)
        return call
    return build


# --------------------------------------------------------------------------- setups

def qkv(n: int, batch: int = 1, kv_heads: int = H, seed: int = 0, heads: int = H):
    """Random float32 q (batch, heads, n, D), k and v (batch, kv_heads, n, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, D, generator=g)
    k = torch.randn(batch, kv_heads, n, D, generator=g)
    v = torch.randn(batch, kv_heads, n, D, generator=g)
    return q, k, v


def plain_setup(mask_fn=None, causal=False, batch=1, kv_heads=None, heads=H):
    """q, k, v with the mask ``mask_fn(n)`` (or none), ``is_causal`` as given."""
    def make(n):
        return Setup(n, *qkv(n, batch, heads if kv_heads is None else kv_heads, heads=heads),
                     mask=mask_fn(n) if mask_fn else None, is_causal=causal)
    return make


def softcap_setup(softcap: float = 30.0):
    """Causal attention with Gemma 2's logit softcap: softcap * tanh(s / softcap)."""
    def make(n):
        return Setup(n, *qkv(n), is_causal=True, softcap=softcap)
    return make


def alibi_setup(causal: bool = True):
    """ALiBi (8 heads) as a bias object, causal or bidirectional."""
    def make(n):
        return Setup(n, *qkv(n), is_causal=causal, bias=alibi(H))
    return make


def t5_setup(n):
    """T5's relative bias (8 heads, weights ~ N(0, 1)) as a bias object, scale 1."""
    torch.manual_seed(0)
    t5 = T5RelativeBias(H)
    with torch.no_grad():
        t5.embedding.weight.normal_(0, 1.0)
    s = Setup(n, *qkv(n), bias=t5.bias(n, n), scale=1.0)
    s.extra["module"] = t5
    return s


def decode_setup(kv_heads, window=None, steps=8):
    """A KV cache of n tokens and ``steps`` new tokens to decode (8 query heads)."""
    def make(n):
        g = torch.Generator().manual_seed(0)
        x = {"k_context": torch.randn(1, kv_heads, n, D, generator=g),
             "v_context": torch.randn(1, kv_heads, n, D, generator=g),
             "q_new": torch.randn(steps, 1, H, 1, D, generator=g),
             "k_new": torch.randn(steps, 1, kv_heads, 1, D, generator=g),
             "v_new": torch.randn(steps, 1, kv_heads, 1, D, generator=g),
             "steps": steps, "window": window}
        return Setup(n, x["q_new"][0], x["k_context"], x["v_context"], extra=x)
    return make


def layer_setup(**cfg):
    """Hidden states (1, n, d_model) for a layer; ``cfg`` goes to ``extra``."""
    def make(n):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, n, cfg["d_model"], generator=g)
        return Setup(n, hidden, hidden, hidden, extra=dict(cfg, hidden=hidden))
    return make


def model_input_setup(vocab_size: int, d_model: int):
    """Token ids (1, n) below ``vocab_size`` and hidden states (1, n, d_model), for a whole
    model (``extra["ids"]``) or one of its modules (``extra["hidden"]``)."""
    def make(n):
        ids = torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(1, n, d_model, generator=torch.Generator().manual_seed(0))
        return Setup(n, hidden, hidden, hidden, extra={"ids": ids, "hidden": hidden})
    return make
