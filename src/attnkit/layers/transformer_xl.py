"""Transformer-XL's relative multi-head attention with segment-level memory
(Dai et al. 2019, sections 3.2 and 3.3).

For a segment x (B, L, d_model) and the cached hidden states of the previous segment,
the memory m (B, M, d_model), each head computes (scale = 1 / sqrt(head_dim)):

    h~ = [SG(m) ; x]                                  (B, S = M + L, d_model), no grad into m
    q  = x W_q,   k = h~ W_k,   v = h~ W_v             from qkv_net
    R  = sinusoidal encoding of distances S-1 .. 0    ([sin | cos], clamped to clamp_len)
    A[i, j] = scale * ((q_i + u) . k_j  +  (q_i + v) . W_r R_(p_i - j))     u = r_w_bias
                                                                            v = r_r_bias
    A[i, j] = -inf where j > p_i = M + i   (causal with memory; with same_length, also
                                            where j <= p_i - M: every query sees M keys)
    out = o_net(softmax(A) v)

The content term is ``scaled_dot_product_attention`` of ``q + u`` against ``k``; the
position term is a bias object (:class:`attnkit.positional.TransformerXLPositionTerm`)
that the chunked engine evaluates tile by tile, and the mask is an attnkit mask object.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import scaled_dot_product_attention
from ..masks import TensorMask, causal, sliding_window
from ..positional.relative import TransformerXLPositionTerm, relative_sinusoidal_encoding
from ..checks import positive_int

__all__ = ["TransformerXLAttention"]



class TransformerXLAttention(nn.Module):
    """Relative multi-head attention of Transformer-XL (the paper's
    ``RelPartialLearnableMultiHeadAttn``), with parameter names from the paper's code so
    weights load by name.

    Args:
        d_model: model width.
        num_heads: H.
        head_dim: d per head (need not be d_model / H).
        dropout: dropout on the attention weights in training mode.

    Parameters: ``qkv_net`` Linear(d_model, 3*H*d, bias=False), output laid out as
    ``[q | k | v]``, each H heads of d dims (the paper's ``chunk(3, -1)`` then
    ``view(H, d)``); ``r_net`` Linear(d_model, H*d, bias=False); ``o_net``
    Linear(H*d, d_model, bias=False); ``r_w_bias`` (u) and ``r_r_bias`` (v), (H, d).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("num_heads", num_heads)
        positive_int("head_dim", head_dim)
        if d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal [sin | cos] encoding), "
                             f"got {d_model}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.dropout = float(dropout)
        self.scale = 1.0 / math.sqrt(head_dim)
        f = dict(device=device, dtype=dtype)
        width = num_heads * head_dim
        self.qkv_net = nn.Linear(d_model, 3 * width, bias=False, **f)
        self.r_net = nn.Linear(d_model, width, bias=False, **f)
        self.o_net = nn.Linear(width, d_model, bias=False, **f)
        self.r_w_bias = nn.Parameter(torch.empty(num_heads, head_dim, **f))
        self.r_r_bias = nn.Parameter(torch.empty(num_heads, head_dim, **f))
        nn.init.normal_(self.r_w_bias, std=0.02)
        nn.init.normal_(self.r_r_bias, std=0.02)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}")

    def _heads(self, t: Tensor) -> Tensor:
        """(B, n, H*d) -> (B, H, n, d)"""
        B, n, _ = t.shape
        return t.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _check(self, x, mems, same_length, clamp_len, key_padding_mask):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, length, d_model={self.d_model}), got "
                             f"{tuple(x.shape)}")
        if x.dtype != self.qkv_net.weight.dtype:
            raise TypeError(f"x is {x.dtype} but the layer's parameters are "
                            f"{self.qkv_net.weight.dtype}; convert one (e.g. layer.double())")
        M = 0
        if mems is not None:
            if not isinstance(mems, Tensor):
                raise TypeError(f"mems must be a tensor or None, got {type(mems).__name__}")
            if mems.dim() != 3 or mems.shape[0] != x.shape[0] or mems.shape[2] != self.d_model:
                raise ValueError(f"mems must be (batch={x.shape[0]}, M, d_model="
                                 f"{self.d_model}), got {tuple(mems.shape)} with x "
                                 f"{tuple(x.shape)}")
            if mems.dtype != x.dtype:
                raise TypeError(f"mems ({mems.dtype}) and x ({x.dtype}) must share a dtype")
            M = mems.shape[1]
        if not isinstance(same_length, bool):
            raise TypeError(f"same_length must be a bool, got {type(same_length).__name__}")
        if isinstance(clamp_len, bool) or not isinstance(clamp_len, int):
            raise TypeError(f"clamp_len must be an int, got {clamp_len!r}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), "
                                f"got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            want = (x.shape[0], M + x.shape[1])
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask must be (batch, M + L) = {want}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        return M

    def forward(self, x: Tensor, mems: Tensor | None = None, *, same_length: bool = False,
                clamp_len: int = -1, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (B, L, d_model), mems (B, M, d_model) or None -> (B, L, d_model) after o_net
        (no residual, no layer norm). ``key_padding_mask`` (B, M + L), True = padding."""
        M = self._check(x, mems, same_length, clamp_len, key_padding_mask)
        B, L, _ = x.shape
        S = M + L
        width = self.num_heads * self.head_dim

        # q, k, v: queries only for the segment, keys/values for memory + segment
        q, k, v = self.qkv_net(x).split(width, dim=-1)
        if M:
            w_kv = self.qkv_net.weight[width:]
            k_m, v_m = nn.functional.linear(mems.detach(), w_kv).split(width, dim=-1)
            k, v = torch.cat((k_m, k), 1), torch.cat((v_m, v), 1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)

        # W_r R for distances S-1 .. 0: (H, S, d)
        R = relative_sinusoidal_encoding(S, self.d_model, clamp_len, dtype=x.dtype,
                                         device=x.device)
        key_r = self.r_net(R).view(S, self.num_heads, self.head_dim).transpose(0, 1)

        query_w = q + self.r_w_bias.unsqueeze(1)                   # content:  (q + u) . k
        query_r = (q + self.r_r_bias.unsqueeze(1)) * self.scale    # position: (q + v) . W_r R
        position = TransformerXLPositionTerm(query_r, key_r)

        mask = sliding_window(M - 1, 0) if (same_length and M > 0) else causal()
        if key_padding_mask is not None:
            mask = mask & TensorMask(~key_padding_mask.to(x.device).view(B, 1, 1, S))
        out = scaled_dot_product_attention(
            query_w, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale, bias=position)
        return self.o_net(out.transpose(1, 2).reshape(B, L, width))
