"""Transformer-XL's relative positional encoding (Dai et al. 2019, section 3.3).

The score of query ``i`` and key ``j`` splits into four terms (eq. in section 3.3):

    A[i, j] = q_i . k_j            (a) content
            + q_i . W_r R_(i-j)     (b) content-dependent position
            + u   . k_j             (c) global content bias
            + v   . W_r R_(i-j)     (d) global position bias
            = (q_i + u) . k_j  +  (q_i + v) . W_r R_(i-j)

``R_d`` is the sinusoidal encoding of the distance ``d`` (``[sin | cos]`` halves, no
learned parameters), so a query scores keys by how far back they are, never by where
they are: the same weights serve every segment, with or without memory.

Terms (a)+(c) are an ordinary ``scale * Q' K^T`` with ``Q' = Q + u``. Terms (b)+(d)
depend on the query and on ``i - j``; :class:`TransformerXLPositionTerm` hands them to
the attention engine as a bias object that computes them tile by tile, so no (L, M+L)
score-sized tensor is ever built, in the forward or the backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bias import Bias
from ..masks import Grid

__all__ = ["relative_sinusoidal_encoding", "TransformerXLPositionTerm"]


def relative_sinusoidal_encoding(k_len: int, d_model: int, clamp_len: int = -1, *,
                                 dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Transformer-XL's ``R``: (k_len, d_model), row ``m`` encodes the distance
    ``k_len - 1 - m`` (distances k_len-1 down to 0), clamped to ``clamp_len`` when > 0:

        R[m] = [sin(d * f_0), ..., sin(d * f_(n-1)) | cos(d * f_0), ..., cos(d * f_(n-1))]
        f_t = 10000^(-2t / d_model),  n = d_model / 2
    """
    if isinstance(k_len, bool) or not isinstance(k_len, int) or k_len < 0:
        raise ValueError(f"k_len must be an int >= 0, got {k_len!r}")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 2 or d_model % 2:
        raise ValueError(f"d_model must be an even positive int, got {d_model!r}")
    if isinstance(clamp_len, bool) or not isinstance(clamp_len, int):
        raise TypeError(f"clamp_len must be an int, got {clamp_len!r}")
    distance = torch.arange(k_len - 1, -1, -1, dtype=torch.float64, device=device)
    if clamp_len > 0:
        distance = distance.clamp(max=clamp_len)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
                           / d_model)
    angle = torch.outer(distance, inv_freq)
    return torch.cat((angle.sin(), angle.cos()), -1).to(dtype)


class TransformerXLPositionTerm(Bias):
    """Terms (b)+(d) of Transformer-XL's score as a bias object, evaluated per tile:

        bias[b, h, i, j] = query_r[b, h, i] . key_r[h, S - 1 - (p_i - j)]

    with ``query_r = scale * (q + v)`` (B, H, L, d), ``key_r = W_r R`` (H, S, d) in
    :func:`relative_sinusoidal_encoding`'s row order, and ``p_i = i + S - L`` the query's
    position among the S = M + L keys. For one tile of rows ``a`` and keys ``t`` the
    needed rows of ``key_r`` are one contiguous run of ``nq + nk - 1``; one matmul gives
    ``raw[a, c]`` and the tile is ``raw[a, nq - 1 - a + t]``: the paper's "relative
    shift", done as a strided view. Keys after the query (``j > p_i``) get a finite
    placeholder; Transformer-XL masks them.

    ``params = (query_r, key_r)``: the engine pushes gradients into both, tile by tile.
    """

    def __init__(self, query_r: Tensor, key_r: Tensor):
        if not isinstance(query_r, Tensor) or query_r.dim() != 4:
            raise ValueError(f"query_r must be (B, H, L, d), got "
                             f"{getattr(query_r, 'shape', type(query_r).__name__)}")
        if not isinstance(key_r, Tensor) or key_r.dim() != 3:
            raise ValueError(f"key_r must be (H, S, d), got "
                             f"{getattr(key_r, 'shape', type(key_r).__name__)}")
        if key_r.shape[0] != query_r.shape[1] or key_r.shape[2] != query_r.shape[3]:
            raise ValueError(f"query_r {tuple(query_r.shape)} and key_r {tuple(key_r.shape)} "
                             f"must share heads and head_dim")
        self.query_r, self.key_r = query_r, key_r
        self.batch_size = query_r.shape[0] if query_r.shape[0] > 1 else None
        self.num_heads = query_r.shape[1]

    @property
    def params(self):
        return (self.query_r, self.key_r)

    def validate(self, grid: Grid) -> None:
        L, S = self.query_r.shape[2], self.key_r.shape[1]
        if (grid.q_len, grid.k_len) != (L, S) or not grid.affine or grid.q_offset != S - L:
            raise ValueError(f"this position term is for {L} queries at positions "
                             f"{S - L}.. among {S} keys, got q_len={grid.q_len}, "
                             f"k_len={grid.k_len}")

    def tile(self, grid, r0, r1, k0, k1, params=None):
        query_r, key_r = self.params if params is None else params
        S = key_r.shape[1]
        off = grid.q_offset
        q0, q1 = r0 + off, r1 + off
        nq, nk = q1 - q0, k1 - k0
        # key_r rows m = S - 1 - (p - j) for p in [q0, q1), j in [k0, k1)
        m_lo, m_hi = S - 1 - (q1 - 1) + k0, S - 1 - q0 + (k1 - 1)
        rows = key_r[:, m_lo:min(m_hi, S - 1) + 1]                     # (H, <= nq+nk-1, d)
        raw = torch.matmul(query_r[:, :, q0 - off:q1 - off], rows.transpose(-1, -2))
        if m_hi > S - 1:  # keys after every query of the tile: placeholder zeros
            raw = torch.nn.functional.pad(raw, (0, m_hi - (S - 1)))
        if nq == 1:
            return raw
        width = nq + nk - 1
        flat = raw.flatten(-2)[..., nq - 1:nq - 1 + nq * (width - 1)]
        return flat.unflatten(-1, (nq, width - 1))[..., :nk]

    def at(self, grid, b, h, i, k, query_r, key_r):
        S = key_r.shape[1]
        m = (S - 1 - (i + grid.q_offset - k)).clamp(max=S - 1)
        bi = b if query_r.shape[0] > 1 else torch.zeros_like(b)
        return (query_r[bi, h, i] * key_r[h, m]).sum(-1)

    def score_mod(self, grid, b, h, q, k, query_r, key_r):
        return self.at(grid, b, h, q - grid.q_offset, k, query_r, key_r)

    def __repr__(self):
        return (f"TransformerXLPositionTerm(query_r={tuple(self.query_r.shape)}, "
                f"key_r={tuple(self.key_r.shape)})")
