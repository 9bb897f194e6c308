"""The block layout of BigBird's original implementation, as transformers ships it
(``BigBirdBlockSparseAttention``): what ``BigBirdAttention(pattern="hf")`` computes.

* :func:`hf_block_counts`: how many times each key block enters each query block's
  softmax (the layout concatenates key blocks, so a block listed twice counts twice);
* :func:`hf_random_plan`: the random key blocks of one call, by the original numpy
  algorithm (all block 0 in eval mode, as transformers 5.x returns them).

Plain numpy and torch: nothing here imports transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["hf_block_counts", "hf_random_plan", "hf_rand_attn_plan"]


def hf_block_counts(num_blocks: int, rand_attn: Tensor) -> Tensor:
    """How many times each key block enters each query block's softmax in HuggingFace's
    ``BigBirdBlockSparseAttention``: (H, n, n) long, n = ``num_blocks`` (>= 5).

    ``rand_attn`` (H, n - 2, r): the random key blocks of query blocks 1..n-2 (row i - 1
    for query block i), as transformers' ``rand_attn``.
    """
    n = int(num_blocks)
    if n < 5:
        raise ValueError(f"HuggingFace's block-sparse layout needs >= 5 blocks, got {n}")
    if rand_attn.dim() != 3 or rand_attn.shape[1] != n - 2:
        raise ValueError(f"rand_attn must be (heads, num_blocks - 2, r) = (H, {n - 2}, r), "
                         f"got {tuple(rand_attn.shape)}")
    H = rand_attn.shape[0]
    counts = torch.zeros(H, n, n, dtype=torch.long)
    counts[:, 0] = counts[:, -1] = 1                        # global rows see everything
    i = torch.arange(1, n - 1)
    # the key blocks each row lists: global first, window i-1..i+1, global last
    listed = torch.stack([torch.zeros_like(i), i - 1, i, i + 1, torch.full_like(i, n - 1)], 1)
    used = torch.ones_like(listed)
    listed[0] = torch.tensor([0, 1, 2, n - 1, 0])           # block 1: 0, 1, 2, n-1
    listed[-1] = torch.tensor([0, n - 3, n - 2, n - 1, 0])  # block n-2: 0, n-3, n-2, n-1
    used[0, 4] = used[-1, 4] = 0
    counts[:, 1:-1] += torch.zeros(n - 2, n, dtype=torch.long).scatter_add_(1, listed, used)
    rand = rand_attn.long()
    counts[:, 1:-1].scatter_add_(2, rand, torch.ones_like(rand))
    return counts


def hf_rand_attn_plan(seq_len: int, block_size: int, num_random_blocks: int):
    """transformers' ``_get_rand_attn_plan``: where random blocks are drawn from."""
    r, nb = num_random_blocks, seq_len // block_size
    if (2 * r + 5) < nb:
        return [int((2 * r + 5) * block_size), seq_len], [r, 0]
    if (r + 5) < nb:
        return [int((r + 5) * block_size), seq_len], [r // 2, r - r // 2]
    return [seq_len], [r]


def _hf_single_row(rng, block_id, to_start, to_end, r, wl=1, wr=1, gl=1, gr=1):
    """transformers' ``_get_single_block_row_attention``."""
    perm = rng.permutation(np.arange(to_start, to_end, dtype=np.int32))
    illegal = list(range(block_id - wl, block_id + wr + 1))
    illegal.extend(range(gl))
    illegal.extend(range(to_end - gr, to_end))
    if block_id == 1:
        illegal.append(to_end - 2)
    if block_id == to_end - 2:
        illegal.append(1)
    chosen = []
    for i in range(to_end - to_start):
        if perm[i] not in illegal:
            chosen.append(perm[i])
        if len(chosen) == r:
            break
    return np.array(chosen, dtype=np.int32)


def _hf_rand_mask_legacy(rng, n, block_size, r, last_idx, training):
    """transformers' ``_bigbird_block_rand_mask`` (the paper's plans, lengths 1024/3072/4096),
    for ``n`` blocks of the model's maximum length."""
    rand_attn = np.zeros((n - 2, r), dtype=np.int32)
    if not training:
        return rand_attn
    middle = np.arange(1, n - 1, dtype=np.int32)
    last = n - 1
    if last_idx > 2 * block_size:
        last = last_idx // block_size - 1
    for i in range(1, n - 1):
        start, end = i - 2, i
        if i == 1:
            rand_attn[i - 1, :] = rng.permutation(middle[2:last])[:r]
        elif i == 2:
            rand_attn[i - 1, :] = rng.permutation(middle[3:last])[:r]
        elif i in (n - 3, n - 2):
            rand_attn[i - 1, :] = rng.permutation(middle[:last])[:r]
        elif start > last:
            rand_attn[i - 1, :] = rng.permutation(middle[:last])[:r]
        elif end + 1 == last:
            rand_attn[i - 1, :] = rng.permutation(middle[:start])[:r]
        else:
            rand_attn[i - 1, :] = rng.permutation(
                np.concatenate((middle[:start], middle[end + 1:last])))[:r]
    return rand_attn


def _hf_rand_mask_with_head(rng, seq_len, block_size, num_heads, plan_len, plan_r, training):
    """transformers' ``_bigbird_block_rand_mask_with_head`` (window 1+1, one global block
    at each end)."""
    n = seq_len // block_size
    plan_blocks = np.array(plan_len) // block_size
    max_plan = plan_len.index(seq_len)
    width = int(np.sum(plan_r[:max_plan + 1]))
    rand_attn = [np.zeros((n, width), dtype=np.int32) for _ in range(num_heads)]
    if training:
        for p in range(max_plan + 1):
            rnd = 0
            if p > 0:
                if plan_r[p] > 0:
                    rnd, cur = int(np.sum(plan_r[:p])), int(np.sum(plan_r[:p + 1]))
                    for row in range(1, plan_blocks[p - 1]):
                        for h in range(num_heads):
                            rand_attn[h][row, rnd:cur] = _hf_single_row(
                                rng, row, plan_blocks[p - 1], plan_blocks[p], plan_r[p])
                for q in range(p):
                    if plan_r[q] == 0:
                        continue
                    for row in range(plan_blocks[p - 1], plan_blocks[p]):
                        rnd, to_start = 0, 0
                        if q > 0:
                            rnd, to_start = int(np.sum(plan_r[:q])), plan_blocks[q - 1]
                        cur = int(np.sum(plan_r[:q + 1]))
                        for h in range(num_heads):
                            rand_attn[h][row, rnd:cur] = _hf_single_row(
                                rng, row, to_start, plan_blocks[q], plan_r[q])
            if plan_r[p] == 0:
                continue
            cur = int(np.sum(plan_r[:p + 1]))
            from_start, to_start = 1, 0
            if p > 0:
                rnd = int(np.sum(plan_r[:p]))
                from_start = to_start = plan_blocks[p - 1]
            for row in range(from_start, plan_blocks[p]):
                for h in range(num_heads):
                    rand_attn[h][row, rnd:cur] = _hf_single_row(
                        rng, row, to_start, plan_blocks[p], plan_r[p])
    return [a[1:n - 1] for a in rand_attn]


def hf_random_plan(seq_len: int, block_size: int, num_random_blocks: int, num_heads: int, *,
                   training: bool = False, seed: int | None = None,
                   max_seqlen: int = 4096) -> Tensor:
    """transformers' ``rand_attn`` for one call, (H, n - 2, r) long, n = seq_len // block_size.

    Eval mode (``training=False``): all zeros, as transformers 5.x returns it (every random
    slot is block 0). Training: transformers' numpy algorithm on a ``RandomState(seed)``,
    the stream ``np.random.seed(seed)`` gives it. ``max_seqlen`` is the config's
    ``max_position_embeddings`` (used by the paper's plans at lengths 1024, 3072, 4096).
    """
    rng = np.random.RandomState(seed) if training else None
    n = seq_len // block_size
    if seq_len in (1024, 3072, 4096):
        plans = [_hf_rand_mask_legacy(rng, max_seqlen // block_size, block_size,
                                      num_random_blocks, 1024, training)[:n - 2]
                 for _ in range(num_heads)]
    else:
        plan_len, plan_r = hf_rand_attn_plan(seq_len, block_size, num_random_blocks)
        plans = _hf_rand_mask_with_head(rng, seq_len, block_size, num_heads, plan_len, plan_r,
                                        training)
    return torch.as_tensor(np.stack(plans, 0), dtype=torch.long)
