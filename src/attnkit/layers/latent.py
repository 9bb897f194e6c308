"""Multi-head latent attention (MLA; DeepSeek-V2 2024, DeepSeek-V3): keys and values
through a low-rank latent, so a KV cache holds ``r + dr`` numbers per token, not ``2 H d``.

Per token x (hidden_size), with H heads, r = kv_lora_rank, dr = qk_rope_head_dim,
dn = qk_nope_head_dim, dv = v_head_dim::

    q        = W_UQ rmsnorm(W_DQ x)              (q_a_proj, q_a_layernorm, q_b_proj;
                                                  or q_proj when q_lora_rank is None)
    q_h      = [q_nope_h (dn) | rope(q_rope_h) (dr)]            per head h
    [c | kr] = W_DKV x                           (kv_a_proj_with_mqa: r + dr numbers)
    c        = rmsnorm(c)                        (kv_a_layernorm)
    k_h      = [W_UK_h c (dn) | rope(kr) (dr)]   (kv_b_proj's first dn rows per head;
    v_h      =  W_UV_h c (dv)                     the rope part is shared by all heads)
    o_h      = softmax(q_h k_h^T * scale) v_h,   y = W_O [o_1 .. o_H]   (o_proj)

The cache keeps only the latent ``z = [c | rope(kr)]`` of each token (an
:class:`attnkit.LatentCache`). Two exact ways to attend from it:

* **decompressed**: rebuild k and v for every cached token (``kv_b_proj`` over all S
  latents), then ordinary attention with head dims (dn + dr, dv). Right for prefill and
  training, where all S tokens are new anyway.
* **absorbed** (DeepSeek-V3's ``attn_impl="absorb"``): ``q_nope_h . (W_UK_h c) =
  (W_UK_h^T q_nope_h) . c``, so W_UK folds into the query and the scores need only z:
  ``q'_h = [W_UK_h^T q_nope_h | rope(q_rope_h)]`` (r + dr numbers) attends to keys ``z``
  and values ``c``, one key/value head for all H query heads (multi-query attention on
  the latents), and ``o_h = W_UV_h (that output)``. Nothing of size (S, H, d) is built:
  right for decoding, where one new token meets S cached ones.

Parameter names are transformers' ``DeepseekV3Attention``'s, so its state_dict loads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import LatentCache
from ..checks import positive_int
from ..functional import scaled_dot_product_attention
from ..masks import Mask
from ..positional.rope_scaling import yarn_mscale
from ..positional.rotary import RotaryEmbedding
from .common import check_dropout
from .multihead import HeadRMSNorm, with_key_padding

__all__ = ["MultiHeadLatentAttention"]

_PER_HEAD = object()  # a mask that differs between heads: no folding of heads into rows


def _one_row_mask(attn_mask, L: int, S: int, device):
    """For one query row (L == 1): the mask as a (B|1, 1, 1, S) tensor every head shares
    (None: no mask), or ``_PER_HEAD`` when it depends on the head."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, Mask):
        attn_mask = attn_mask.materialize(L, S, device)
    if not isinstance(attn_mask, Tensor):
        return _PER_HEAD
    if attn_mask.dim() <= 2:
        return attn_mask.reshape(1, 1, 1, S) if attn_mask.numel() == S else _PER_HEAD
    if attn_mask.dim() == 4 and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1:
        return attn_mask
    return _PER_HEAD


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention with a compressed cache.

    Args:
        hidden_size: model width; input and output are (B, L, hidden_size).
        num_heads: H query heads (and as many key/value heads, rebuilt from the latent).
        q_lora_rank: width of the query's low-rank bottleneck (``q_a_proj`` -> RMSNorm ->
            ``q_b_proj``); None for a full ``q_proj`` (DeepSeek-V2-Lite).
        kv_lora_rank: r, width of the compressed key/value latent c.
        qk_nope_head_dim: dn, the per-head query/key part without position.
        qk_rope_head_dim: dr, the rotary part (one key part shared by every head).
        v_head_dim: dv, each head's value width.
        rope_theta: RoPE's base.
        rope_scaling: None, or transformers' ``rope_parameters`` dict ("yarn" for
            DeepSeek-V3's long context). With YaRN's ``mscale_all_dim`` the softmax scale
            is multiplied by ``yarn_mscale(factor, mscale_all_dim)^2``, as DeepSeek does.
        rope_interleave: True (DeepSeek's layout): rotary pairs are dims (2k, 2k + 1);
            False: rotate-half pairs (k, k + dr/2).
        attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``
            (transformers' ``attention_bias``; the up-projections never have one).
        norm_eps: the two RMSNorms' epsilon.
        dropout: dropout on the attention weights in training mode.

    The softmax scale is ``(dn + dr)^-0.5`` (times YaRN's factor above); ``self.scaling``.
    """

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int | None,
                 kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, *, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 rope_interleave: bool = True, attention_bias: bool = False,
                 norm_eps: float = 1e-6, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("kv_lora_rank", kv_lora_rank),
                            ("qk_nope_head_dim", qk_nope_head_dim),
                            ("qk_rope_head_dim", qk_rope_head_dim), ("v_head_dim", v_head_dim)):
            positive_int(name, value)
        if q_lora_rank is not None:
            positive_int("q_lora_rank", q_lora_rank)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {qk_rope_head_dim}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.dropout = check_dropout(dropout)
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        f = dict(device=device, dtype=dtype)
        H, dq = num_heads, self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, H * dq, bias=False, **f)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias, **f)
            self.q_a_layernorm = HeadRMSNorm(q_lora_rank, norm_eps, **f)
            self.q_b_proj = nn.Linear(q_lora_rank, H * dq, bias=False, **f)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim,
                                            bias=attention_bias, **f)
        self.kv_a_layernorm = HeadRMSNorm(kv_lora_rank, norm_eps, **f)
        self.kv_b_proj = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim),
                                   bias=False, **f)
        self.o_proj = nn.Linear(H * v_head_dim, hidden_size, bias=attention_bias, **f)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta, interleaved=rope_interleave,
                                      scaling=rope_scaling)
        self.scaling = dq ** -0.5
        scaling = self.rotary.scaling
        if scaling is not None and scaling["rope_type"] != "default" and scaling.get(
                "mscale_all_dim"):
            factor = scaling.get("factor") or (scaling["max_position_embeddings"]
                                               / scaling["original_max_position_embeddings"])
            m = yarn_mscale(factor, scaling["mscale_all_dim"])
            self.scaling *= m * m

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_nope_head_dim={self.qk_nope_head_dim}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}")

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # -- the pieces: queries, latents, and the two ways to attend ------------------------

    def queries(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(q_nope (B, H, L, dn), rotated q_rope (B, H, L, dr)) of x (B, L, hidden)."""
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, L, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        return q_nope, self.rotary.rotate(q_rope, positions)

    def latents(self, x: Tensor, positions: Tensor) -> Tensor:
        """z = [rmsnorm(c) | rope(k_rope)] of x (B, L, hidden): (B, 1, L, r + dr), what
        the cache keeps."""
        B, L, _ = x.shape
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank,
                                                      self.qk_rope_head_dim], -1)
        k_rope = self.rotary.rotate(k_rope.view(B, 1, L, self.qk_rope_head_dim), positions)
        return torch.cat([self.kv_a_layernorm(c).view(B, 1, L, self.kv_lora_rank), k_rope], -1)

    def _up_weights(self) -> tuple[Tensor, Tensor]:
        """W_UK (H, dn, r) and W_UV (H, dv, r): kv_b_proj's rows, head by head."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim,
                                       self.kv_lora_rank)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], 1)

    def decompressed(self, q_nope: Tensor, q_rope: Tensor, z: Tensor, attn_mask=None,
                     is_causal: bool = True, dropout_p: float = 0.0) -> Tensor:
        """Attention with k, v rebuilt from the latents z (B, 1, S, r + dr): returns
        (B, H, L, dv)."""
        B, _, S, _ = z.shape
        c, k_rope = z.split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        kv = self.kv_b_proj(c.squeeze(1)).view(B, S, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], -1)
        q = torch.cat([q_nope, q_rope], -1)
        return scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=dropout_p,
                                            is_causal=is_causal, scale=self.scaling)

    def absorbed(self, q_nope: Tensor, q_rope: Tensor, z: Tensor, attn_mask=None,
                 is_causal: bool = True, dropout_p: float = 0.0) -> Tensor:
        """Attention on the latents z (B, 1, S, r + dr) themselves, W_UK folded into the
        queries and W_UV applied after: returns (B, H, L, dv), equal to
        :meth:`decompressed` up to rounding."""
        B, H, L, _ = q_nope.shape
        S = z.shape[2]
        if not self.can_absorb:
            raise ValueError(f"the absorbed form needs kv_b_proj as a plain nn.Linear with "
                             f"floating-point weights, got {type(self.kv_b_proj).__name__}; "
                             f"use the decompressed form (absorb=False)")
        w_uk, w_uv = self._up_weights()
        q = torch.cat([torch.einsum("bhld,hdr->bhlr", q_nope, w_uk), q_rope], -1)
        # values: the latents c, passed as all of z, whose last dr output columns are
        # dropped: q, k and v then share one head dim (torch's fused kernel needs it) and
        # the cache is read where it lies
        shared = _one_row_mask(attn_mask, L, S, z.device) if L == 1 else _PER_HEAD
        if shared is not _PER_HEAD:  # every head's one row sees the same keys: heads
            # become the rows of one multi-query call (one GEMM over the cache)
            out = scaled_dot_product_attention(q.transpose(1, 2), z, z, shared,
                                               dropout_p=dropout_p, scale=self.scaling)
            out = out.transpose(1, 2)  # (B, 1, H, r + dr) -> (B, H, 1, r + dr)
        else:
            out = scaled_dot_product_attention(q, z, z, attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=self.scaling)
        out = out[..., :self.kv_lora_rank]
        return torch.einsum("bhlr,hvr->bhlv", out, w_uv)

    @property
    def can_absorb(self) -> bool:
        """Whether kv_b_proj's weight can be folded into the queries: a plain ``nn.Linear``
        with a floating-point (H (dn + dv), r) weight. A wrapped or quantized projection
        (LoRA, FP8, 4-bit) is only called as a module: the decompressed form."""
        w = getattr(self.kv_b_proj, "weight", None)
        return (type(self.kv_b_proj) is nn.Linear and isinstance(w, Tensor)
                and w.is_floating_point() and w.dtype.itemsize >= 2
                and tuple(w.shape) == (self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                       self.kv_lora_rank))

    def prefers_absorbed(self, L: int, S: int) -> bool:
        """Whether the absorbed form costs fewer multiply-adds for L queries over S keys:
        decompressed ``S r H (dn + dv) + L S H (dn + dr + dv)``, absorbed
        ``L H r (dn + dv) + L S H (2 r + dr)``. Decoding (L = 1) prefers it from S = 2 on;
        a DeepSeek-V3-sized prompt (r = 512, dn = dv = 128) only below L ~ 170."""
        r, dn, dr, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, \
            self.v_head_dim
        decompressed = S * r * (dn + dv) + L * S * (dn + dr + dv)
        absorbed = L * r * (dn + dv) + L * S * (2 * r + dr)
        return absorbed < decompressed

    # -- the module call ------------------------------------------------------------------

    def forward(self, x: Tensor, positions: Tensor | None = None, *,
                cache: LatentCache | None = None, is_causal: bool = True,
                key_padding_mask: Tensor | None = None, attn_mask=None,
                absorb: bool | None = None) -> Tensor:
        """x (B, L, hidden_size) -> (B, L, hidden_size).

        Args:
            positions: the tokens' positions for RoPE, (L,) or (B, L) integers; default
                ``len(cache) + arange(L)``.
            cache: a :class:`attnkit.LatentCache` (one per layer); this call's latents are
                appended first, and query row i sits at key position ``S - L + i``.
            is_causal: causal, bottom-right aligned with a cache.
            key_padding_mask: (B, S) with S the keys including cached ones, True = padding
                (``nn.MultiheadAttention``'s convention), or float added to the scores.
            attn_mask: an attnkit mask object or a tensor (True = may attend), combined
                with the above.
            absorb: None (default): the absorbed form with a cache when it is the cheaper
                (:meth:`prefers_absorbed`: every decoding step past the first token),
                else decompressed;
                True / False force one.
        """
        if absorb is not None and not isinstance(absorb, bool):
            raise TypeError(f"absorb must be None, True or False, got {absorb!r}")
        x, positions = self._check_call(x, positions, cache)
        B, L, _ = x.shape
        q_nope, q_rope = self.queries(x, positions)
        z = self.latents(x, positions)
        if cache is not None:
            z = cache.update(z)
        S = z.shape[2]
        if key_padding_mask is not None:
            attn_mask = with_key_padding(attn_mask, key_padding_mask, B, S)
        if absorb is None:
            absorb = cache is not None and self.can_absorb and self.prefers_absorbed(L, S)
        attend = self.absorbed if absorb else self.decompressed
        out = attend(q_nope, q_rope, z, attn_mask, is_causal,
                     self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.v_head_dim))

    def _check_call(self, x, positions, cache) -> tuple[Tensor, Tensor]:
        """Validate x, positions and cache; default positions ``len(cache) + arange(L)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (batch, length, {self.hidden_size}), got "
                             f"{tuple(x.shape)}")
        if cache is not None and not isinstance(cache, LatentCache):
            raise TypeError(f"cache must be an attnkit.LatentCache, got {type(cache).__name__}")
        B, L, _ = x.shape
        past = len(cache) if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + L, device=x.device)
        elif not isinstance(positions, Tensor) or positions.is_floating_point() or not (
                (positions.dim() == 1 and positions.shape[0] == L)
                or (positions.dim() == 2 and positions.shape[1] == L
                    and positions.shape[0] in (1, B))):
            raise ValueError(f"positions must be integers ({L},) or ({B}, {L}) for x "
                             f"{tuple(x.shape)}, got "
                             f"{tuple(positions.shape) if isinstance(positions, Tensor) else positions!r}")
        return x, positions
