"""torch FlexAttention (opt-in): the same mask and bias objects lowered to a
``BlockMask`` and a ``score_mod``. The first call compiles (about 10 s on CPU).

Masks and biases already speak FlexAttention's ``(b, h, q_idx, kv_idx)`` language: their
``at`` rules take query rows, as FlexAttention's ``q_idx`` is, and turn them into
positions through the grid (bottom-right, or per row).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..bias import Bias
from ..masks import Grid, Mask

__all__ = ["flex_attention_backend", "available"]


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - old torch
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: Mask, grid: Grid, batch: int, heads: int, block_size: int = 128):
    """A FlexAttention ``BlockMask`` for an attnkit mask on this grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return mask.at(grid, b, h, q_idx, kv_idx)

    per_batch = mask.batch_size or grid.batch_size
    return create_block_mask(mask_mod, batch if per_batch else None,
                             heads if mask.num_heads else None, grid.q_len, grid.k_len,
                             device=grid.device, BLOCK_SIZE=block_size)


def flex_attention_backend(query: Tensor, key: Tensor, value: Tensor, *,
                           mask: Mask | None = None, bias: Bias | None = None, scale: float,
                           softcap: float | None = None, sinks: Tensor | None = None,
                           return_lse: bool = False, block_mask=None, grid: Grid | None = None):
    """Returns ``(out, lse or None)`` for (B, Hq, L, D) query, (B, Hkv, S, D) key/value.

    On CPU, torch's compiled FlexAttention is inference-only and returns no log-sum-exp,
    so gradients, ``return_lse`` and ``sinks`` need another device there.
    """
    B, Hq, L, _ = query.shape
    grid = Grid(L, key.shape[2], query.device) if grid is None else grid
    if block_mask is None and mask is not None:
        block_mask = flex_block_mask(mask, grid, B, Hq)
    score_mod = None
    if bias is not None or softcap is not None:
        params = tuple(bias.params) if bias is not None else ()

        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            if bias is not None:
                score = score + bias.at(grid, b, h, q_idx, kv_idx, *params)
            return score

    need_lse = return_lse or sinks is not None
    result = _compiled()(query, key, value, score_mod=score_mod, block_mask=block_mask,
                         scale=scale, enable_gqa=Hq != key.shape[1], return_lse=need_lse)
    if not need_lse:
        return result, None
    out, lse = result
    if sinks is not None:
        sink_l = sinks.to(lse.dtype).view(1, Hq, 1)
        new_l = torch.logaddexp(lse, sink_l)
        out = out * torch.exp(lse - new_l).unsqueeze(-1).to(out.dtype)
        lse = new_l
    return out, lse


def not_supported_reasons(p) -> list[str]:
    """FlexAttention has no dropout and returns no weights; on CPU torch compiles it for
    inference only, without the log-sum-exp or sinks."""
    if not available():
        return ["anything: this torch has no torch.nn.attention.flex_attention"]
    asked = [("dropout_p > 0", p.dropout_p > 0), ("return_weights", p.return_weights)]
    if p.device.type == "cpu":
        asked += [("return_lse (on CPU)", p.return_lse), ("sinks (on CPU)", p.sinks),
                  ("inputs that require grad (on CPU: no backward in torch's "
                   "FlexAttention)", p.needs_grad)]
    return [name for name, given in asked if given]
