"""Decoding attention: a few query rows over a long KV cache (work in progress)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["decode_attention", "paged_decode_attention"]

CHUNK = 2048


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths(key_lengths, B, S, device):
    if key_lengths is None:
        return torch.full((B,), S, dtype=torch.long, device=device)
    return key_lengths.to(device=device, dtype=torch.long)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_lengths=None,
                     is_causal: bool = False, need_lse: bool = False):
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    acc = _stat(q.dtype)
    lens = _lengths(key_lengths, B, S, q.device)
    qf = q.to(acc).reshape(B, Hkv, g * L, D) * scale
    scores = torch.empty(B, Hkv, g * L, S, dtype=acc)
    for s0 in range(0, S, CHUNK):
        kc = k[:, :, s0:s0 + CHUNK].to(acc)
        scores[..., s0:s0 + CHUNK] = qf @ kc.transpose(-1, -2)
    j = torch.arange(S, device=q.device)
    limit = lens.view(B, 1, 1, 1).expand(B, 1, g, L)
    if is_causal:
        limit = limit - L + 1 + torch.arange(L, device=q.device)
    limit = limit.reshape(B, 1, g * L, 1)
    scores.masked_fill_(j >= limit, -math.inf)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    p = torch.exp(scores - lse).nan_to_num_(0.0)
    out = torch.zeros(B, Hkv, g * L, Dv, dtype=acc)
    for s0 in range(0, S, CHUNK):
        out += p[..., s0:s0 + CHUNK] @ v[:, :, s0:s0 + CHUNK].to(acc)
    out = out.view(B, Hq, L, Dv).to(q.dtype)
    if need_lse:
        return out, lse.view(B, Hq, L).to(torch.float32)
    return out


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor,
                           key_lengths: Tensor, *, scale: float, is_causal: bool = False,
                           need_lse: bool = False):
    B = q.shape[0]
    bs = k_pool.shape[2]
    width = block_table.shape[1]
    table = block_table.long().clamp(min=0)
    k = k_pool[table.view(-1)].view(B, width, *k_pool.shape[1:]).transpose(1, 2).reshape(
        B, k_pool.shape[1], width * bs, k_pool.shape[3])
    v = v_pool[table.view(-1)].view(B, width, *v_pool.shape[1:]).transpose(1, 2).reshape(
        B, v_pool.shape[1], width * bs, v_pool.shape[3])
    return decode_attention(q, k, v, scale=scale, key_lengths=key_lengths,
                            is_causal=is_causal, need_lse=need_lse)
