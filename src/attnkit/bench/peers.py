"""The implementations a user would otherwise pick, each built the way that user would.

Every builder takes a :class:`~attnkit.bench.cases.Setup` (one case at one length) and
returns a zero-argument callable that runs one forward pass (or one training step, or
one batch of decoding steps). What the builder does before returning — materialising a
mask, compiling, creating modules — is setup, timed and sized separately.

* ``torch SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` on dense inputs,
  with its own ``is_causal``/``enable_gqa`` where they apply, or with the mask / bias
  materialised once as a tensor (a bool mask when the mask is the same for every head —
  the form torch documents — and a float ``0/-inf`` mask when it differs per head,
  because torch's CPU kernels fall back to a slow path for a per-head bool mask).
* ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` made once from the
  mask's ``mask_mod`` and the bias's ``score_mod``; compilation is the warm-up call and
  is reported on its own, never in the timed calls.
* ``reference``: attnkit's textbook backend (materialises the scores).
* HuggingFace transformers' own attention modules, built from small random configs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import masks as M
from ..functional import scaled_dot_product_attention
from ..masks import Grid

__all__ = ["torch_sdpa", "torch_sdpa_masked", "torch_sdpa_biased", "torch_sdpa_repeat_kv",
           "flex", "preload_flex", "reference", "torch_sdpa_train", "reference_train",
           "softcap_eager", "train_step", "torch_cat_decode", "torch_cat_window_decode",
           "hf_longformer",
           "hf_bigbird", "hf_t5", "hf_mistral", "hf_model", "submodule", "longformer_config",
           "longformer_call_args", "bigbird_config", "bigbird_call_args", "t5_config"]


def _gqa(s) -> bool:
    return s.q.shape[1] != s.k.shape[1]


def _full_mask(s):
    """The case's mask with ``is_causal`` folded in (attnkit objects, never dense)."""
    if s.is_causal:
        return M.causal() if s.mask is None else M.causal() & s.mask
    return s.mask


# --------------------------------------------------------------------------- torch SDPA

def torch_sdpa(s):
    """torch SDPA with no mask, or its own ``is_causal`` (L == S here)."""
    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(s.q, s.k, s.v, is_causal=s.is_causal,
                                                  enable_gqa=_gqa(s))
    return call


def dense_mask(s) -> torch.Tensor:
    """The case's mask as the tensor a torch user would pass: (B, 1, 1, S) bool for key
    padding, (L, S) bool when the same for every head, (H, L, S) float 0/-inf per head."""
    mask = _full_mask(s)
    L, S = s.q.shape[2], s.k.shape[2]
    if isinstance(mask, M.PaddingMask):
        return (torch.arange(S).view(1, S) < mask.lengths.view(-1, 1)).view(-1, 1, 1, S)
    dense = mask.materialize(L, S)
    if dense.dim() == 4 and dense.shape[1] > 1:  # per head: torch's fast path wants float
        return torch.zeros(dense.shape, dtype=s.q.dtype).masked_fill_(~dense, float("-inf"))
    return dense


def torch_sdpa_masked(s):
    """torch SDPA with the mask materialised once (setup) and passed as ``attn_mask``."""
    attn_mask = dense_mask(s)

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=attn_mask,
                                                  enable_gqa=_gqa(s))
    return call


def torch_sdpa_biased(s):
    """torch SDPA given a precomputed dense float bias (1, H, L, S), -inf where masked."""
    L, S = s.q.shape[2], s.k.shape[2]
    bias = s.bias.materialize(L, S).to(s.q.dtype)
    mask = _full_mask(s)
    if mask is not None:
        bias.masked_fill_(~mask.materialize(L, S), float("-inf"))

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=bias, scale=s.scale,
                                                  enable_gqa=_gqa(s))
    return call


def torch_sdpa_repeat_kv(s):
    """GQA the pre-``enable_gqa`` way: repeat K/V per query head (copies, every call)."""
    groups = s.q.shape[1] // s.k.shape[1]

    def call():
        with torch.no_grad():
            k = s.k.repeat_interleave(groups, dim=1)
            v = s.v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(s.q, k, v, is_causal=s.is_causal)
    return call


def torch_sdpa_train(s):
    """One forward + backward through torch SDPA."""
    return train_step(s, lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=s.is_causal, enable_gqa=_gqa(s)))


def train_step(s, forward):
    """A call running ``forward(q, k, v)`` on leaf copies of the setup's inputs and
    backpropagating a fixed random gradient (gradients dropped after each call)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (s.q, s.k, s.v))
    grad = torch.randn_like(s.q)

    def call():
        out = forward(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
    return call


# --------------------------------------------------------------------------- reference

def reference(s):
    """attnkit's textbook backend: scores, softmax, weighted sum, all materialised."""
    def call():
        with torch.no_grad():
            return scaled_dot_product_attention(s.q, s.k, s.v, attn_mask=s.mask,
                                                is_causal=s.is_causal, bias=s.bias,
                                                scale=s.scale, softcap=s.softcap,
                                                backend="reference")
    return call


def softcap_eager(s):
    """Softcapped causal attention as Gemma 2's eager code writes it, in the inputs'
    dtype: scores, softcap * tanh(scores / softcap), causal -inf, softmax, weighted sum."""
    L, S = s.q.shape[2], s.k.shape[2]
    causal = torch.ones(L, S, dtype=torch.bool).tril(S - L)

    def call():
        with torch.no_grad():
            scores = (s.q @ s.k.transpose(-1, -2)) * s.q.shape[-1] ** -0.5
            scores = s.softcap * torch.tanh(scores / s.softcap)
            scores = scores.masked_fill(~causal, float("-inf"))
            return torch.softmax(scores, -1, dtype=torch.float32).to(s.q.dtype) @ s.v
    return call


def reference_train(s):
    return train_step(s, lambda q, k, v: scaled_dot_product_attention(
        q, k, v, attn_mask=s.mask, is_causal=s.is_causal, backend="reference"))


# --------------------------------------------------------------------------- flex

@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def preload_flex():
    """Import FlexAttention and make one tiny block mask, so that the one-off lazy
    imports and initialisation are not counted as the first length's setup."""
    from torch.nn.attention.flex_attention import create_block_mask
    create_block_mask(lambda b, h, q, k: k <= q, None, None, 256, 256, device="cpu")


def flex(s):
    """Compiled FlexAttention with a BlockMask built once from the same mask rule."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, H, L, _ = s.q.shape
    S = s.k.shape[2]
    grid = Grid(L, S, s.q.device)
    mask = _full_mask(s)
    block_mask = None
    if mask is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask.at(grid, b, h, q_idx, kv_idx)
        block_mask = create_block_mask(mask_mod, B if mask.batch_size else None,
                                       H if mask.num_heads else None, L, S,
                                       device=s.q.device)
    score_mod = None
    if s.bias is not None:
        bias, params = s.bias, tuple(s.bias.params)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias.at(grid, b, h, q_idx, kv_idx, *params)
    attention = _compiled_flex()

    def call():
        with torch.no_grad():
            return attention(s.q, s.k, s.v, score_mod=score_mod, block_mask=block_mask,
                             scale=s.scale, enable_gqa=_gqa(s))
    return call


# --------------------------------------------------------------------------- decoding

def _cat_decoder(s, k0, v0, keep: int | None = None):
    """``steps`` decoding steps from K/V ``k0``/``v0``: ``torch.cat`` the new key and value,
    torch SDPA for the one new query (it sees every kept key, so no mask), then keep only
    the last ``keep`` keys (None: all)."""
    steps = s.extra["steps"]
    q_new, k_new, v_new = s.extra["q_new"], s.extra["k_new"], s.extra["v_new"]
    gqa = q_new.shape[1] != k0.shape[1]

    def call():
        with torch.no_grad():
            k, v = k0, v0
            for t in range(steps):
                k = torch.cat([k, k_new[t]], 2)
                v = torch.cat([v, v_new[t]], 2)
                out = F.scaled_dot_product_attention(q_new[t], k, v, enable_gqa=gqa)
                if keep is not None:
                    k, v = k[:, :, -keep:], v[:, :, -keep:]
            return out
    call.cache_bytes = 2 * k0.numel() * k0.element_size()  # K/V at context length n
    return call


def torch_cat_decode(s):
    """Decoding without a cache object: grow K/V with ``torch.cat`` every step and call
    torch SDPA for the one new query."""
    return _cat_decoder(s, s.extra["k_context"], s.extra["v_context"])


def torch_cat_window_decode(s):
    """Rolling window the plain-torch way: keep the last ``window - 1`` keys in a tensor,
    ``torch.cat`` the new one, call torch SDPA (the kept keys are exactly the window)."""
    w = s.extra["window"]
    return _cat_decoder(s, s.extra["k_context"][:, :, -(w - 1):].clone(),
                        s.extra["v_context"][:, :, -(w - 1):].clone(), keep=w - 1)


# --------------------------------------------------------------------------- HuggingFace

def _hf_config(name: str, **kw):
    import transformers
    return getattr(transformers, name)(**kw)


def submodule(model, path: str):
    """``model``'s submodule at a dotted path (numbers index module lists)."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def hf_model(model_class: str, config_class: str, config: dict, implementation: str,
             module_path: str | None = None, call_args: dict | None = None):
    """A transformers model from ``config_class(**config)`` under ``attn_implementation``
    ("eager", "sdpa", or "attnkit" after ``attnkit.integrations.hf.register()``), random
    weights from seed 0, eval mode. The call runs the whole model on the setup's token
    ids, or, with ``module_path``, that module on the setup's hidden states (with
    ``call_args``)."""
    def build(s):
        import transformers
        if implementation == "attnkit":
            from ..integrations import hf as attnkit_hf
            attnkit_hf.register()
        torch.manual_seed(0)
        cfg = getattr(transformers, config_class)(**config)
        model = getattr(transformers, model_class)._from_config(
            cfg, attn_implementation=implementation).eval().to(s.q.dtype)
        if module_path is None:
            ids = s.extra["ids"]

            def call():
                with torch.no_grad():
                    return model(input_ids=ids)
            return call
        module, hidden, kwargs = submodule(model, module_path), s.extra["hidden"], call_args or {}

        def call():
            with torch.no_grad():
                return module(hidden, **kwargs)
        return call
    build.__name__ = f"hf_{model_class}_{implementation}"
    return build


def longformer_config(s):
    x = s.extra
    return _hf_config("LongformerConfig", hidden_size=x["d_model"],
                      num_attention_heads=x["heads"], attention_window=[2 * x["window"]],
                      num_hidden_layers=1, intermediate_size=4 * x["d_model"],
                      max_position_embeddings=s.n + 8, attention_probs_dropout_prob=0.0,
                      initializer_range=0.2)


def hf_longformer_module(s):
    """HF ``LongformerSelfAttention`` (window = 2 x one-sided window, layer 0), eval."""
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    torch.manual_seed(0)
    return LongformerSelfAttention(longformer_config(s), layer_id=0).eval().to(s.q.dtype)


def longformer_call_args(s):
    """The arguments LongformerModel passes its layers: hidden states and the mask with
    0 = local, +10000 = global, -10000 = padding."""
    B, n = s.extra["hidden"].shape[:2]
    attention_mask = torch.zeros(B, n, dtype=s.q.dtype)
    attention_mask[:, :s.extra["num_global"]] = 10000.0
    is_index_masked = attention_mask < 0
    is_index_global_attn = attention_mask > 0
    return dict(attention_mask=attention_mask, is_index_masked=is_index_masked,
                is_index_global_attn=is_index_global_attn,
                is_global_attn=bool(is_index_global_attn.any()))


def hf_longformer(s):
    """HF's LongformerSelfAttention forward on (B, n, d_model)."""
    module = hf_longformer_module(s)
    hidden = s.extra["hidden"]
    kwargs = longformer_call_args(s)

    def call():
        with torch.no_grad():
            return module(hidden, **kwargs)
    return call


def hf_bigbird_module(s):
    """HF ``BigBirdBlockSparseAttention`` (block 64, 3 random blocks), eval mode."""
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention
    torch.manual_seed(0)
    return BigBirdBlockSparseAttention(bigbird_config(s), seed=0).eval().to(s.q.dtype)


def bigbird_config(s):
    x = s.extra
    return _hf_config("BigBirdConfig", hidden_size=x["d_model"], num_attention_heads=x["heads"],
                      num_hidden_layers=1, intermediate_size=4 * x["d_model"],
                      attention_type="block_sparse", block_size=x["block"],
                      num_random_blocks=x["random_blocks"], max_position_embeddings=s.n + 8,
                      attention_probs_dropout_prob=0.0, initializer_range=0.2)


def bigbird_call_args(s):
    """The masks BigBirdModel builds for its block-sparse layers (no padding)."""
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel
    B, n = s.extra["hidden"].shape[:2]
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(B, n, dtype=s.q.dtype), s.extra["block"])
    return dict(band_mask=band, from_mask=from_mask, to_mask=to_mask,
                from_blocked_mask=blocked, to_blocked_mask=blocked)


def hf_bigbird(s):
    module = hf_bigbird_module(s)
    hidden = s.extra["hidden"]
    kwargs = bigbird_call_args(s)

    def call():
        with torch.no_grad():
            return module(hidden, **kwargs)
    return call


def hf_t5_module(s, implementation: str):
    """HF ``T5Attention`` with its relative position bias (encoder self-attention)."""
    from transformers.models.t5.modeling_t5 import T5Attention
    torch.manual_seed(0)
    return T5Attention(t5_config(s, implementation), has_relative_attention_bias=True,
                       layer_idx=0).eval().to(s.q.dtype)


def t5_config(s, implementation: str = "eager"):
    x = s.extra
    return _hf_config("T5Config", d_model=x["d_model"], d_kv=x["d_model"] // x["heads"],
                      num_heads=x["heads"], num_layers=1, dropout_rate=0.0,
                      initializer_factor=1.0, attn_implementation=implementation)


def hf_t5(implementation: str):
    def build(s):
        module = hf_t5_module(s, implementation)
        hidden = s.extra["hidden"]

        def call():
            with torch.no_grad():
                return module(hidden)
        return call
    build.__name__ = f"hf_t5_{implementation}"
    return build


def hf_mistral(implementation: str):
    """HF ``MistralAttention`` (GQA 8/2 heads, RoPE, sliding window) called as
    ``MistralModel`` calls it, with the mask that model builds for ``implementation``
    ("eager", "sdpa", or "attnkit" after ``attnkit.integrations.hf.register()``); the mask
    and rotary tables are built once, as the model does once for all its layers."""
    def build(s):
        from transformers.masking_utils import create_sliding_window_causal_mask
        from transformers.models.mistral.modeling_mistral import (MistralAttention,
                                                                  MistralRotaryEmbedding)
        if implementation == "attnkit":
            from ..integrations import hf as attnkit_hf
            attnkit_hf.register()
        x = s.extra
        cfg = _hf_config("MistralConfig", hidden_size=x["d_model"],
                         num_attention_heads=x["heads"], num_key_value_heads=x["kv_heads"],
                         head_dim=x["d_model"] // x["heads"], sliding_window=x["window"],
                         num_hidden_layers=1, intermediate_size=4 * x["d_model"],
                         max_position_embeddings=max(s.n, 4096), attention_dropout=0.0,
                         initializer_range=0.2, attn_implementation=implementation)
        torch.manual_seed(0)
        module = MistralAttention(cfg, layer_idx=0).eval().to(s.q.dtype)
        hidden = x["hidden"]
        position_ids = torch.arange(s.n).unsqueeze(0)
        with torch.no_grad():
            position_embeddings = MistralRotaryEmbedding(config=cfg)(hidden, position_ids)
            mask = create_sliding_window_causal_mask(
                config=cfg, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                position_ids=position_ids)

        def call():
            with torch.no_grad():
                return module(hidden, position_embeddings=position_embeddings,
                              attention_mask=mask)
        return call
    build.__name__ = f"hf_mistral_{implementation}"
    return build
