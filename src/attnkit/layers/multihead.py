"""Multi-head attention as an ``nn.Module``: MHA, GQA and MQA from one class.

    q = x W_q  -> (B, Hq,  L, d)        d = embed_dim / num_heads
    k = m W_k  -> (B, Hkv, S, d)        Hkv = num_kv_heads (Hq: MHA, 1: MQA, else GQA)
    v = m W_v  -> (B, Hkv, S, d)        m = x (self-attention) or the memory (cross)
    o = attention(q, k, v)               query head h reads kv head h // (Hq / Hkv)
    y = concat_h(o) W_o

Options of 2025's open models: ``qk_norm`` (per-head RMSNorm of q and k before RoPE:
Qwen3; zero-centred, ``(1 + w)``, in Gemma 3 and Qwen3-Next) and ``output_gate``
(Qwen3-Next: ``q_proj`` also yields a gate g per head, and ``o * sigmoid(g)`` replaces
``o``).

Inputs are batch-first (B, L, embed_dim). ``attn_mask`` follows attnkit's convention
(True = may attend); ``key_padding_mask`` follows ``nn.MultiheadAttention`` (True marks
padding).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..bias import Bias
from ..cache import KVCache, PagedKVCache, SinkCache
from ..functional import scaled_dot_product_attention
from ..masks import KeyPaddingMask, Mask, padding
from ..checks import positive_int

__all__ = ["MultiHeadAttention", "HeadRMSNorm", "with_key_padding"]



class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped/multi-query variants and a KV cache.

    Args:
        embed_dim: model width E; the output is (B, L, E).
        num_heads: query heads Hq; E % Hq == 0.
        num_kv_heads: key/value heads Hkv (None: Hq, MHA; 1: MQA; a divisor: GQA).
        kdim, vdim: widths of the key and value inputs (cross-attention), default E.
        bias: add biases to the four projections.
        dropout: dropout on the attention weights in training mode.
        positional: where positions enter attention: a rotary embedding (anything with a
            ``rope(q, k, positions)`` method), an attnkit bias object (e.g. ALiBi), or a
            module with ``bias(q_len, k_len)`` returning one (e.g. T5's relative bias).
        qk_norm: False; True for a per-head RMSNorm of queries and keys before the rotary
            embedding, ``w * x / rms(x)`` with weights ``q_norm.weight``,
            ``k_norm.weight`` (Qwen3); "zero_centered" for ``(1 + w) * x / rms(x)``
            (Gemma 3, Qwen3-Next). The norm runs in float32, as transformers runs it.
        norm_eps: the RMSNorm's epsilon.
        head_dim: each head's width d (default E / Hq); Qwen3 and Qwen3-Next have
            Hq * d != E, so q_proj is (Hq d, E) and out_proj (E, Hq d), as theirs.
        output_gate: Qwen3-Next's gate: ``q_proj`` is (2 Hq d, E), each head's d query rows
            followed by its d gate rows (transformers' layout, so its weights load as
            they are), and the attention output is multiplied by ``sigmoid(gate)``
            before ``out_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
                 kdim: int | None = None, vdim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, positional=None, qk_norm: bool | str = False,
                 norm_eps: float = 1e-6, output_gate: bool = False,
                 head_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        positive_int("embed_dim", embed_dim)
        positive_int("num_heads", num_heads)
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}), or give head_dim")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                             f"({num_kv_heads})")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else positive_int(
            "head_dim", head_dim)
        inner = num_heads * self.head_dim  # the attention's width (E unless head_dim says)
        self.kdim = embed_dim if kdim is None else positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else positive_int("vdim", vdim)
        self.dropout = float(dropout)
        kv_width = num_kv_heads * self.head_dim
        f = dict(device=device, dtype=dtype)
        if qk_norm not in (False, True, "zero_centered"):
            raise ValueError(f"qk_norm must be False, True or 'zero_centered', got {qk_norm!r}")
        if not isinstance(output_gate, bool):
            raise TypeError(f"output_gate must be a bool, got {type(output_gate).__name__}")
        self.output_gate = output_gate
        self.inner_dim = inner
        self.q_proj = nn.Linear(embed_dim, inner * (2 if output_gate else 1), bias=bias, **f)
        self.q_norm = self.k_norm = None
        if qk_norm:
            zero = qk_norm == "zero_centered"
            self.q_norm = HeadRMSNorm(self.head_dim, norm_eps, zero, **f)
            self.k_norm = HeadRMSNorm(self.head_dim, norm_eps, zero, **f)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias, **f)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias, **f)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **f)
        self.positional = positional

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """(B, L, n*d) -> (B, n, L, d)"""
        B, L, _ = x.shape
        return x.view(B, L, n, self.head_dim).transpose(1, 2)

    def _check(self, name: str, x, width: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must be (batch, length, {width}), got {tuple(x.shape)}")

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None, attn_mask=None, is_causal: bool = False,
                cache: KVCache | None = None, need_weights: bool = False,
                query_lengths: Tensor | None = None):
        """Returns ``(output (B, L, E), weights (B, Hq, L, S_total) or None)``.

        ``key=None`` is self-attention, ``value=None`` means ``value = key``. With a
        ``cache``, this call's keys/values are appended to it first, and query row i sits
        at position ``S_total - L + i``: one token at a time with ``is_causal=True``
        reproduces a single full causal call.

        ``query_lengths`` (B,) makes the batch ragged: row b's first ``query_lengths[b]``
        tokens are real, the rest right padding (they attend to nothing: their output
        is ``out_proj``'s bias). With a cache,
        each sequence's tokens go after its own cached ones (``cache.update(...,
        lengths=)``), its queries sit bottom-right against its own keys and RoPE turns them
        at their own positions; later calls without ``query_lengths`` continue each
        sequence from its own length.
        """
        self._check("query", query, self.embed_dim)
        if key is None:
            key = query
            if value is None:
                value = query
        self._check("key", key, self.kdim)
        value = key if value is None else value
        self._check("value", value, self.vdim)
        B, L, _ = query.shape
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} must share the batch size, and key/value "
                             f"the length")
        if cache is not None and not isinstance(cache, (KVCache, SinkCache, PagedKVCache)):
            raise TypeError(f"cache must be an attnkit KVCache, SlidingWindowCache, "
                            f"SinkCache or PagedKVCache, got {type(cache).__name__}")

        gate = None
        if self.output_gate:  # per head: d query rows, then d gate rows
            q, gate = self.q_proj(query).view(B, L, self.num_heads, 2 * self.head_dim).chunk(2, -1)
            q, gate = q.transpose(1, 2), gate.reshape(B, L, self.inner_dim)
        else:
            q = self._heads(self.q_proj(query), self.num_heads)
        k = self._heads(self.k_proj(key), self.num_kv_heads)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        ragged = query_lengths is not None or (cache is not None and cache.is_ragged)
        pos = self.positional
        rope = pos is not None and hasattr(pos, "rope")
        if rope and k.shape[2] != L:
            raise ValueError(f"rotary positions need keys at the query positions "
                             f"(self-attention); got query length {L} and key length "
                             f"{k.shape[2]}")
        in_cache = cache is not None and getattr(cache, "rotates_keys", False)
        if rope and not in_cache:
            q, k = pos.rope(q, k, self._positions(cache, B, L, ragged, q.device))
        if isinstance(cache, PagedKVCache):
            cache.update(k, v, lengths=query_lengths)
            if (attn_mask is None and key_padding_mask is None and not need_weights
                    and not isinstance(pos, Bias) and not callable(getattr(pos, "bias", None))
                    and not (self.training and self.dropout) and not cache.is_ragged_step):
                return self._finish(cache.attention(q, is_causal=is_causal), gate, B, L), None
            k, v = cache.keys, cache.values  # the cases the block-table kernel does not cover
        elif cache is not None:
            k, v = cache.update(k, v, lengths=query_lengths)
        S = k.shape[2]
        if rope and in_cache:  # positions inside the cache (StreamingLLM): slots 0..S-1
            q, k = self._rotate_in_cache(pos, q, k, cache)
        cache_mask = cache.mask() if cache is not None else (
            padding(query_lengths, query_lengths) if query_lengths is not None else None)
        if cache_mask is not None:
            attn_mask = _and(cache_mask, attn_mask, L, S)

        bias = None
        if isinstance(pos, Bias):
            bias = pos
        elif pos is not None and callable(getattr(pos, "bias", None)):
            bias = pos.bias(L, S)

        if key_padding_mask is not None:
            attn_mask = with_key_padding(attn_mask, key_padding_mask, B, S)
        out = scaled_dot_product_attention(
            q, k, v, attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, bias=bias, return_weights=need_weights)
        weights = None
        if need_weights:
            out, weights = out
        return self._finish(out, gate, B, L), weights

    def _finish(self, out: Tensor, gate: Tensor | None, B: int, L: int) -> Tensor:
        """(B, Hq, L, d) attention output -> (B, L, E): heads joined, gated, projected."""
        out = out.transpose(1, 2).reshape(B, L, self.inner_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.out_proj(out)

    @staticmethod
    def _positions(cache, B: int, L: int, ragged: bool, device) -> Tensor:
        """Rotary positions of this call's tokens: (L,) after the cache, or (B, L) after
        each sequence's own cached length."""
        if not ragged or cache is None or cache.lengths is None:
            past = len(cache) if cache is not None else 0
            return torch.arange(past, past + L, device=device)
        return cache.lengths.view(B, 1) + torch.arange(L, device=device)

    @staticmethod
    def _rotate_in_cache(pos, q: Tensor, k: Tensor, cache) -> tuple[Tensor, Tensor]:
        """Keys the cache returned (before RoPE) turned at their slots 0..S-1, queries at
        theirs: row b's last ones, bottom-right against its own returned keys."""
        if not callable(getattr(pos, "rotate", None)):
            raise TypeError(f"{type(cache).__name__} keeps keys before RoPE and needs a "
                            f"rotary embedding with rotate(x, positions), got "
                            f"{type(pos).__name__}")
        slots = torch.arange(k.shape[2], device=q.device)
        return pos.rotate(q, cache.query_slots(q.shape[2]).to(q.device)), pos.rotate(k, slots)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiHeadAttention":
        """An equivalent layer holding a copy of ``module``'s weights. The layer is
        always batch-first: inputs (B, L, E). A ``batch_first=False`` module (torch's
        default) takes (L, B, E); feed the attnkit layer ``x.transpose(0, 1)`` and
        transpose its output back (a UserWarning says so when such a module is given).

        Remember the mask conventions differ: torch's bool ``attn_mask`` marks keys that
        may NOT be attended; attnkit's marks keys that may (pass ``~mask``).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch takes an nn.MultiheadAttention, got "
                            f"{type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("from_torch: nn.MultiheadAttention with add_bias_kv=True has no "
                             "attnkit equivalent")
        if module.add_zero_attn:
            raise ValueError("from_torch: nn.MultiheadAttention with add_zero_attn=True has "
                             "no attnkit equivalent")
        if not module.batch_first:
            warnings.warn("from_torch: the module is batch_first=False and takes (L, B, E); "
                          "the attnkit layer is batch-first and takes (B, L, E): pass "
                          "x.transpose(0, 1) and transpose the output back", UserWarning,
                          stacklevel=2)
        E = module.embed_dim
        has_bias = module.in_proj_bias is not None
        w = module.in_proj_weight
        ref = w if w is not None else module.q_proj_weight
        layer = cls(E, module.num_heads, kdim=module.kdim, vdim=module.vdim, bias=has_bias,
                    dropout=module.dropout, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                wq, wk, wv = module.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            for lin, wt in ((layer.q_proj, wq), (layer.k_proj, wk), (layer.v_proj, wv)):
                lin.weight.copy_(wt)
            if has_bias:
                for lin, b in zip((layer.q_proj, layer.k_proj, layer.v_proj),
                                  module.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            layer.out_proj.weight.copy_(module.out_proj.weight)
            if has_bias:
                layer.out_proj.bias.copy_(module.out_proj.bias)
        layer.train(module.training)
        return layer


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's d numbers, computed in float32 as transformers computes it:
    ``w * (x / sqrt(mean(x^2) + eps))`` (Qwen3: the normalised x is cast back to x's dtype,
    then scaled), or with ``zero_centered`` ``(1 + w) * ...`` scaled in float32 and cast
    after (Gemma 3, Qwen3-Next; w starts at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.zero_centered = float(eps), zero_centered
        init = torch.zeros if zero_centered else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


def with_key_padding(attn_mask, key_padding_mask: Tensor, B: int, S: int):
    """Fold a (B, S) key padding mask (True = padding, or float added) into attn_mask."""
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a tensor, got "
                        f"{type(key_padding_mask).__name__}")
    if key_padding_mask.shape != (B, S):
        raise ValueError(f"key_padding_mask must be (batch, keys incl. cached) = ({B}, {S}), "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype == torch.bool:
        keep = ~key_padding_mask.view(B, 1, 1, S)
        if attn_mask is None:
            return keep
        if isinstance(attn_mask, Mask):
            return attn_mask & KeyPaddingMask(~key_padding_mask)
        if isinstance(attn_mask, Tensor) and attn_mask.dtype == torch.bool:
            return attn_mask & keep
        if isinstance(attn_mask, Tensor) and attn_mask.is_floating_point():
            return attn_mask.masked_fill(~keep, float("-inf"))
        raise TypeError(f"attn_mask must be a tensor or an attnkit mask, got "
                        f"{type(attn_mask).__name__}")
    if key_padding_mask.is_floating_point():
        add = key_padding_mask.view(B, 1, 1, S)
        if attn_mask is None:
            return add
        if isinstance(attn_mask, Tensor):
            if attn_mask.dtype == torch.bool:
                return add.masked_fill(~attn_mask, float("-inf"))
            return attn_mask + add
        raise TypeError("a float key_padding_mask combines only with a tensor attn_mask")
    raise TypeError(f"key_padding_mask must be bool (True = padding) or float, got "
                    f"{key_padding_mask.dtype}")


def _and(ragged_mask: Mask, attn_mask, L: int, S: int):
    """The ragged batch's mask and the caller's: objects and bool tensors combine as
    masks; a float mask (added to the scores) takes -inf where the ragged mask forbids."""
    if attn_mask is None:
        return ragged_mask
    if isinstance(attn_mask, Tensor) and attn_mask.is_floating_point():
        return attn_mask.masked_fill(~ragged_mask.materialize(L, S, attn_mask.device),
                                     float("-inf"))
    return ragged_mask & attn_mask
