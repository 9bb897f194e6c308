"""DeepSeek Sparse Attention (DSA; DeepSeek-V3.2): MLA whose queries each attend only to
the top-k keys a lightweight "lightning indexer" scores highest.

Per query token t and key s, with the indexer's Hi heads of width d (first dr dims
rotated, half-split RoPE) and per-token head weights w::

    q_t,h = rope(W_IQ c_q,t)            (wq_b, on MLA's query latent c_q)
    k_s   = rope(layernorm(W_IK x_s))   (wk, k_norm: one key per token, shared by heads)
    w_t   = W_w x_t * Hi^-1/2           (weights_proj)
    I[t, s] = sum_h w_t,h relu(q_t,h . k_s * d^-1/2)         (masked where t may not see s)
    sel(t)  = top-k_s I[t, s]

and MLA attends over sel(t) only (``masks.selected``): the engine gathers each row's k
chosen latents, O(L k) work and memory instead of O(L S). The selection is discrete: no
gradient reaches the indexer through it (as in the paper, where the indexer is trained
by its own KL loss). Parameter names are transformers' ``DeepseekV32Attention``'s (the
indexer under ``indexer.``), so its state_dict loads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..cache import LatentCache
from ..checks import positive_int
from ..masks import Grid, Mask, causal, selected
from ..positional.rotary import RotaryEmbedding
from .latent import MultiHeadLatentAttention
from .multihead import with_key_padding

__all__ = ["LightningIndexer", "DeepSeekSparseAttention"]

#: index scores computed per chunk of query rows: rows x heads x keys numbers at most
INDEX_CHUNK = 1 << 22


class LightningIndexer(nn.Module):
    """DSA's indexer: scores every key for every query and keeps each query's top-k."""

    def __init__(self, hidden_size: int, q_lora_rank: int, num_heads: int, head_dim: int,
                 rope_head_dim: int, topk: int, *, rope_theta: float = 10000.0,
                 rope_scaling: dict | None = None, device=None, dtype=None):
        super().__init__()
        for name, v in (("num_heads", num_heads), ("head_dim", head_dim), ("topk", topk)):
            positive_int(name, v)
        if not 0 < rope_head_dim <= head_dim:
            raise ValueError(f"rope_head_dim must be in (0, head_dim={head_dim}], got "
                             f"{rope_head_dim}")
        f = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim, self.rope_head_dim, self.topk = (
            num_heads, head_dim, rope_head_dim, topk)
        self.wq_b = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False, **f)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False, **f)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6, **f)
        self.weights_proj = nn.Linear(hidden_size, num_heads, bias=False, **f)
        self.rotary = RotaryEmbedding(rope_head_dim, rope_theta, interleaved=False,
                                      scaling=rope_scaling)

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        rot, rest = x.split([self.rope_head_dim, self.head_dim - self.rope_head_dim], -1)
        return torch.cat([self.rotary.rotate(rot, positions), rest], -1)

    def keys(self, x: Tensor, positions: Tensor) -> Tensor:
        """(B, 1, L, head_dim) index keys of x (B, L, hidden): what a cache keeps."""
        B, L, _ = x.shape
        k = self.k_norm(self.wk(x)).view(B, 1, L, self.head_dim)
        return self._rope(k, positions)

    @torch.no_grad()
    def forward(self, x: Tensor, q_latent: Tensor, positions: Tensor, keys: Tensor,
                allowed: Mask | None, grid: Grid) -> Tensor:
        """Top-k key indices (B, 1, L, k) of each query row, -1 where a row may see fewer
        than k keys. ``keys`` (B, 1, S, head_dim) from :meth:`keys`, ``allowed`` the mask
        the scores are taken under (causal, padding)."""
        B, L, _ = x.shape
        H, d, S = self.num_heads, self.head_dim, keys.shape[2]
        q = self.wq_b(q_latent).view(B, L, H, d).transpose(1, 2)       # (B, H, L, d)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # as transformers
        q = self._rope(q, positions).to(acc)
        w = self.weights_proj(x).to(acc) * H ** -0.5                    # (B, L, H)
        kt = keys.to(acc).transpose(-1, -2)                            # (B, 1, d, S)
        k = min(self.topk, S)
        out = torch.empty(B, 1, L, k, dtype=torch.long, device=x.device)
        step = max(1, INDEX_CHUNK // max(1, H * S))
        for r0 in range(0, L, step):
            r1 = min(L, r0 + step)
            s = torch.relu(torch.matmul(q[:, :, r0:r1], kt) * d ** -0.5)  # (B, H, c, S)
            score = torch.einsum("bch,bhcs->bcs", w[:, r0:r1], s)
            if allowed is not None:
                ok = allowed.tile(grid, r0, r1, 0, S).any(1)  # (B|1, c, S)
                score = score.masked_fill(~ok, -math.inf)
            top = score.topk(k, -1)
            out[:, 0, r0:r1] = top.indices.masked_fill(torch.isinf(top.values), -1)
        return out


class DeepSeekSparseAttention(MultiHeadLatentAttention):
    """MLA (see :class:`MultiHeadLatentAttention`, same arguments) with DSA's indexer:
    ``index_n_heads``, ``index_head_dim`` and ``index_topk`` as transformers'
    ``DeepseekV32Config``. ``q_lora_rank`` is required (the indexer reads the query
    latent). Attention runs in the absorbed form by default: multi-query attention over
    the latents, the form in which gathering k keys per row is cheapest."""

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, *,
                 index_n_heads: int, index_head_dim: int, index_topk: int,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None, **kw):
        if q_lora_rank is None:
            raise ValueError("DeepSeekSparseAttention needs q_lora_rank: the indexer reads "
                             "the query latent")
        super().__init__(hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
                         qk_rope_head_dim, v_head_dim, rope_theta=rope_theta,
                         rope_scaling=rope_scaling, **kw)
        self.indexer = LightningIndexer(hidden_size, q_lora_rank, index_n_heads,
                                        index_head_dim, qk_rope_head_dim, index_topk,
                                        rope_theta=rope_theta, rope_scaling=rope_scaling,
                                        device=kw.get("device"), dtype=kw.get("dtype"))

    def forward(self, x: Tensor, positions: Tensor | None = None, *,
                cache: LatentCache | None = None, index_cache: LatentCache | None = None,
                is_causal: bool = True, key_padding_mask: Tensor | None = None,
                attn_mask=None, absorb: bool | None = None, return_indices: bool = False):
        """x (B, L, hidden_size) -> (B, L, hidden_size) (and the (B, 1, L, k) selected
        indices with ``return_indices``). ``cache`` keeps the MLA latents and
        ``index_cache`` (another :class:`attnkit.LatentCache`) the index keys; pass both
        or neither. The rest as :meth:`MultiHeadLatentAttention.forward`."""
        x, positions = self._check_call(x, positions, cache)
        if (cache is None) != (index_cache is None):
            raise ValueError("pass cache and index_cache together (the latents and the "
                             "indexer's keys), or neither")
        B, L, _ = x.shape
        q_latent, q_nope, q_rope = self.query_parts(x, positions)
        z, ik = self.latents(x, positions), self.indexer.keys(x, positions)
        if cache is not None:
            z, ik = cache.update(z), index_cache.update(ik)
        S = z.shape[2]
        if key_padding_mask is not None:
            attn_mask = with_key_padding(attn_mask, key_padding_mask, B, S)
        if isinstance(attn_mask, Tensor):
            attn_mask = _as_mask(attn_mask)
        allowed = causal() & attn_mask if is_causal and attn_mask is not None else (
            causal() if is_causal else attn_mask)
        out, indices = self.attend_selected(x, q_latent, positions, q_nope, q_rope, z, ik,
                                            allowed, absorb)
        return (out, indices) if return_indices else out

    def query_parts(self, x: Tensor, positions: Tensor):
        """(query latent c_q (B, L, q_lora_rank), q_nope (B, H, L, dn), rotated q_rope)."""
        B, L, _ = x.shape
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, L, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        return q_latent, q_nope, self.rotary.rotate(q_rope, positions)

    def attend_selected(self, x, q_latent, positions, q_nope, q_rope, z, index_keys,
                        allowed: Mask | None, absorb: bool | None = None):
        """The indexer's top-k under ``allowed``, then MLA over the chosen latents:
        ``(output (B, L, hidden), indices (B, 1, L, k))``. z (B, 1, S, r + dr) and
        ``index_keys`` (B, 1, S, index_head_dim) cover every key, cached ones included."""
        B, L, _ = x.shape
        grid = Grid(L, z.shape[2], x.device)
        indices = self.indexer(x, q_latent, positions, index_keys, allowed, grid)
        chosen = selected(indices) if allowed is None else allowed & selected(indices)
        if absorb is None:
            absorb = self.can_absorb
        attend = self.absorbed if absorb else self.decompressed
        out = attend(q_nope, q_rope, z, chosen, False, self.dropout if self.training else 0.0)
        out = self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.v_head_dim))
        return out, indices


def _as_mask(t: Tensor) -> Mask:
    from ..masks import TensorMask
    if t.dtype != torch.bool:
        raise TypeError("DeepSeekSparseAttention takes bool masks (True = may attend) or "
                        "mask objects; a float key_padding_mask has no top-k meaning")
    return TensorMask(t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)))
