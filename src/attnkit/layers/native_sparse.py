"""Native Sparse Attention (NSA; Yuan et al., DeepSeek 2025): three gated branches over the
same rotated queries, keys and values, each cheap for a long sequence.

With block size l (``block_size``), compression stride d (``compress_stride``), n selected
blocks (``num_selected_blocks``) and window w, per query token t::

    compression  k~_c = mean(k[c d : c d + l]),  v~_c likewise       (C = (S - l) / d + 1)
                 o_cmp = softmax(q_t k~^T * scale) v~   over c with c d + l - 1 <= t
    selection    p_t = that softmax; importance of block j (tokens j l .. j l + l - 1)
                 = sum of p_t over the compressed tokens overlapping it, averaged over the
                 block's l query rows and the kv head's query heads (one choice per query
                 block and kv head, as the paper's kernel shares it); the query's own
                 block, the first and the one before are always kept (in that order when
                 n < 3), then the most important, n in all
                 o_slc = attention over the chosen blocks' tokens (causal)
    window       o_swa = attention over keys t - w + 1 .. t
    output       o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa,  g = sigmoid(W_g x) per head

Compression is mean pooling, as fla's reference (fla-org/flash-linear-attention,
``fla/ops/nsa``); the paper's learned MLP would replace :meth:`compress`. All three branches
share q, k and v, as in fla. Each branch is one call of the tiled engine with a mask object
(``masks.compressed_causal``, ``masks.selected(..., block_size=l)``, a sliding window), so
memory stays linear in the length and the backward recomputes tile by tile. The
selection is discrete: no gradient flows through the choice, only through the chosen keys.
Parameter names (q_proj, k_proj, v_proj, g_proj, o_proj) are fla's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_int
from ..functional import scaled_dot_product_attention
from ..masks import compressed_causal, selected, sliding_window
from ..positional.rotary import RotaryEmbedding

__all__ = ["NativeSparseAttention"]

#: query rows whose compressed-attention probabilities are held at once while choosing
SELECT_ROWS = 1024


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention on (B, L, hidden_size) inputs, causal (a decoder layer).

    ``forward(x, positions=None, *, return_indices=False)``: x (B, L, hidden_size) ->
    (B, L, hidden_size); with ``return_indices`` also the chosen key blocks (B, Hkv,
    ceil(L / block_size), num_selected_blocks), -1 for unused slots. No KV cache yet.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 block_size: int = 64, compress_stride: int = 16, num_selected_blocks: int = 16,
                 window: int = 512, rope_theta: float = 10000.0, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("block_size", block_size), ("compress_stride", compress_stride),
                        ("num_selected_blocks", num_selected_blocks), ("window", window)):
            positive_int(name, v)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if block_size % compress_stride:
            raise ValueError(f"block_size ({block_size}) must be a multiple of "
                             f"compress_stride ({compress_stride})")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.block_size, self.compress_stride = head_dim, block_size, compress_stride
        self.num_selected_blocks, self.window = num_selected_blocks, window
        f = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **f)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **f)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **f)
        self.g_proj = nn.Linear(hidden_size, num_heads * 3, bias=False, **f)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **f)
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        self.scale = head_dim ** -0.5

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, compress_stride={self.compress_stride}, "
                f"num_selected_blocks={self.num_selected_blocks}, window={self.window}")

    # -- the pieces ------------------------------------------------------------------------

    def compress(self, x: Tensor) -> Tensor:
        """(B, Hkv, S, D) -> (B, Hkv, C, D): the mean of every window of ``block_size``
        tokens, one every ``compress_stride``; C = 0 below one whole window."""
        l, d = self.block_size, self.compress_stride
        if x.shape[2] < l:
            return x[:, :, :0]
        return x.unfold(2, l, d).mean(-1)

    def overlap(self, C: int, S: int, device) -> Tensor:
        """(C, blocks) 1 where compressed token c's window overlaps selection block j."""
        l, d = self.block_size, self.compress_stride
        start = torch.arange(C, device=device) * d
        j = torch.arange(-(-S // l), device=device)
        return ((start.view(-1, 1) < (j + 1) * l) & (start.view(-1, 1) + l > j * l)).float()

    @torch.no_grad()
    def choose(self, q: Tensor, k_cmp: Tensor, S: int) -> Tensor:
        """(B, Hkv, ceil(L / l), n) chosen key blocks for queries q (B, Hq, L, D) against
        compressed keys k_cmp (B, Hkv, C, D); see the module docstring."""
        B, Hq, L, D = q.shape
        Hkv, C, l = k_cmp.shape[1], k_cmp.shape[2], self.block_size
        g, nb = Hq // Hkv, -(-S // l)
        nqb = -(-L // l)
        n = min(self.num_selected_blocks, nb)
        weight = self.overlap(C, S, q.device)
        out = torch.full((B, Hkv, nqb, self.num_selected_blocks), -1, dtype=torch.long,
                         device=q.device)
        kt = k_cmp.float().transpose(-1, -2)
        rows = max(l, SELECT_ROWS // l * l)
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            pad = -(r1 - r0) % l  # a last partial query block: repeat nothing, count rows
            qc = q[:, :, r0:r1].float().reshape(B, Hkv, g, r1 - r0, D)
            s = torch.matmul(qc, kt.unsqueeze(2)) * self.scale         # (B, Hkv, g, r, C)
            t = torch.arange(r0, r1, device=q.device).view(-1, 1)
            seen = torch.arange(C, device=q.device) * self.compress_stride + l - 1 <= t
            p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
            imp = torch.matmul(p, weight)                                # (B, Hkv, g, r, nb)
            imp = torch.nn.functional.pad(imp, (0, 0, 0, pad))
            imp = imp.view(B, Hkv, g, -1, l, nb).mean((2, 4))            # (B, Hkv, blocks, nb)
            jq = torch.arange(r0 // l, r0 // l + imp.shape[2], device=q.device).view(-1, 1)
            jb = torch.arange(nb, device=q.device)
            # always kept, in this order when n is smaller: the own block, the first, the
            # one before (importances are probability sums, far below these)
            score = torch.where(jb == jq - 1, 1e30, imp)
            score = torch.where(jb == 0, 2e30, score)
            score = torch.where(jb == jq, 3e30, score).masked_fill(jb > jq, float("-inf"))
            top = score.topk(n, -1)
            chosen = top.indices.masked_fill(torch.isneginf(top.values), -1)
            out[:, :, jq.view(-1), :n] = chosen
        return out

    # -- the module call --------------------------------------------------------------------

    def forward(self, x: Tensor, positions: Tensor | None = None, *,
                return_indices: bool = False):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (batch, length, {self.hidden_size}), got "
                             f"{tuple(x.shape)}")
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if positions is None:
            positions = torch.arange(L, device=x.device)
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        q, k = self.rotary.rope(q, k, positions)
        gates = torch.sigmoid(self.g_proj(x)).view(B, L, H, 3).permute(3, 0, 2, 1).unsqueeze(-1)

        k_cmp, v_cmp = self.compress(k), self.compress(v)
        o_cmp = scaled_dot_product_attention(
            q, k_cmp, v_cmp, compressed_causal(self.block_size, self.compress_stride),
            scale=self.scale) if k_cmp.shape[2] else q.new_zeros(B, H, L, D)
        blocks = self.choose(q, k_cmp, L)
        chosen = selected(blocks.repeat_interleave(H // Hkv, 1), block_size=self.block_size)
        o_slc = scaled_dot_product_attention(q, k, v, chosen, is_causal=True, scale=self.scale)
        o_swa = scaled_dot_product_attention(q, k, v, sliding_window(self.window - 1, 0),
                                             is_causal=True, scale=self.scale)
        out = gates[0] * o_cmp + gates[1] * o_slc + gates[2] * o_swa
        out = self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))
        return (out, blocks) if return_indices else out
