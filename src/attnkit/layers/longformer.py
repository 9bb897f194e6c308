"""Longformer's self-attention (Beltagy et al., 2020): a sliding window plus global tokens.

Every token attends to the ``w = attention_window // 2`` tokens on each side of it (the
*local* rows); a few chosen tokens (the *global* ones, e.g. [CLS] or the question) attend
to every token and every token attends to them. Global tokens have their own projections:

    local row i  (not global):  softmax over keys {j : |i - j| <= w, j not global, j not padding}
                                 U {global tokens}, all from q = x W_q, k = x W_k, v = x W_v
    global row g:                softmax over every non-padding key, from
                                 q = x_g W_q_global, k = x W_k_global, v = x W_v_global

with scores ``q . k / sqrt(head_dim)``. This is exactly HuggingFace's
``LongformerSelfAttention``: its windowed scores add a large negative number to global and
padded keys, and it appends the global keys as extra score columns, so a global key in a
row's window is counted once, not twice. Here the same set is one attnkit mask: the keys
are laid out as ``[the L tokens | the G global tokens' keys, gathered]`` and
:class:`LongformerMask` allows the window on the first part (minus global and padded keys)
and the valid global slots on the second, so the tiled engine runs the band plus one
narrow block of global keys per query tile instead of the blocks where globals happen to
sit. The global rows are a small dense call (G queries x L keys).

``dilation`` replaces the window by Longformer's dilated window (``masks.dilated``),
optionally per head; HuggingFace does not implement it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import scaled_dot_product_attention
from ..masks import EMPTY, PARTIAL, DilatedMask, Grid, Mask, SlidingWindowMask
from ..masks.grid import as_4d, states_of
from .common import bool_mask, check_dropout, check_heads, check_hidden

__all__ = ["LongformerAttention", "LongformerMask", "global_slots"]


def _flag_states(flags: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """EMPTY/PARTIAL/FULL of ``flags[b, lo:hi]`` for each block, (B, 1, 1, nk);
    ``flags`` (B, n) bool, ``lo``/``hi`` (1, nk) clamped to [0, n]."""
    n = flags.shape[1]
    csum = nn.functional.pad(flags.long().cumsum(1), (1, 0))  # (B, n + 1)
    lo, hi = lo.clamp(0, n).view(-1), hi.clamp(0, n).view(-1)
    count = csum[:, hi] - csum[:, lo]
    st = states_of(count == (hi - lo), count == 0)
    return st.view(flags.shape[0], 1, 1, -1)


def _pick_rows(table: Tensor, b: Tensor) -> Tensor:
    return b if table.shape[0] > 1 else torch.zeros_like(b)


class LongformerMask(Mask):
    """Longformer's local rows over keys laid out as ``[L tokens | G global keys]``.

    Query row i sits at position ``p = i + G`` (bottom-right alignment with S = L + G) and
    sees

    * token key ``j < L`` when the window allows (i, j) and ``local_keys[b, j]`` (the key
      is neither global nor padding);
    * column ``L + g`` when ``global_slots[b, g]`` (slot g holds a global token of batch
      element b; batch elements with fewer global tokens leave slots empty).

    Args:
        window: a ``sliding_window(w)`` or ``dilated(w, w, d)`` mask, in token positions.
        num_tokens: L.
        local_keys: (B|1, L) bool or None (every token key may be seen).
        global_slots: (B|1, G) bool or None (no global columns).
    """

    def __init__(self, window: Mask, num_tokens: int, local_keys: Tensor | None = None,
                 global_slots: Tensor | None = None):
        if not isinstance(window, (SlidingWindowMask, DilatedMask)):
            raise TypeError(f"window must be a sliding_window or dilated mask, got {window!r}")
        self.window = window
        self.num_tokens = int(num_tokens)
        self.local_keys = local_keys
        self.global_slots = global_slots
        self.num_globals = 0 if global_slots is None else global_slots.shape[1]
        sizes = {t.shape[0] for t in (local_keys, global_slots) if t is not None} - {1}
        if len(sizes) > 1:
            raise ValueError(f"local_keys and global_slots have different batch sizes {sizes}")
        self.batch_size = sizes.pop() if sizes else None
        self.num_heads = window.num_heads
        self._windows = {}  # window tiles by (offset, rows, keys, device), see tile()
        if self.num_globals % 128:
            # Query positions are offset by G (bottom-right alignment), so 128-key blocks
            # would cut the band off-centre: a 128-row tile would touch one key block more
            # than its band spans. Key blocks as fine as G's largest power-of-two divisor
            # keep the engine's FULL/PARTIAL split tight.
            self.tile_hint = max(16, min(128, self.num_globals & -self.num_globals))

    def validate(self, grid: Grid) -> None:
        if not grid.affine:
            raise ValueError("LongformerMask puts query row i at position i + G; it takes no "
                             "per-row query positions")
        want = self.num_tokens + self.num_globals
        if grid.k_len != want:
            raise ValueError(f"LongformerMask covers {self.num_tokens} tokens + "
                             f"{self.num_globals} global keys = {want} keys, got a key length "
                             f"of {grid.k_len}")
        self.window.validate(grid)

    def mask_mod(self, grid, b, h, q, k):
        L, G = self.num_tokens, self.num_globals
        is_token = k < L
        kt = k.clamp(max=L - 1)
        allow = is_token & self.window.mask_mod(grid, b, h, q - G, kt)
        if self.local_keys is not None:
            allow = allow & self.local_keys[_pick_rows(self.local_keys, b), kt]
        if G:
            slot = (k - L).clamp(0, G - 1)
            allow = allow | (~is_token & self.global_slots[_pick_rows(self.global_slots, b), slot])
        return allow

    def tile(self, grid, r0, r1, k0, k1):
        """The exact block, with few ops: inside a band every tile at the same offset
        ``r0 - k0`` has the same window part, so it is computed once and reused. (Row i
        is the token at position i, the window's own position: rows shifted by -G.)"""
        L, G = self.num_tokens, self.num_globals
        if k0 < L < k1 or k1 <= k0:  # straddles tokens and global slots: the general rule
            return super().tile(grid, r0, r1, k0, k1)
        if k0 >= L:
            return self.global_slots[:, None, None, k0 - L:k1 - L]
        key = (r0 - k0, r1 - r0, k1 - k0, grid.device)
        win = self._windows.get(key)
        if win is None:
            if len(self._windows) > 64:
                self._windows.clear()
            win = self._windows[key] = as_4d(self.window.tile(grid, r0 - G, r1 - G, k0, k1))
        if self.local_keys is None:
            return win
        return win & self.local_keys[:, None, None, k0:k1]

    def tile_signature(self, grid, r0, r1, k0, k1):
        """Blocks of token keys that are all local (no global token, no padding) are the
        window's own blocks: equal whenever the window's are; blocks of global slots do
        not depend on the queries."""
        if k0 >= self.num_tokens:
            return ("slots", k0, k1, r1 - r0)
        if k1 > self.num_tokens or not self.window.translation_invariant:
            return None
        if self.local_keys is not None and not bool(self.local_keys[:, k0:k1].all()):
            return None
        G = self.num_globals
        return ("window", self.window.tile_signature(grid, r0 - G, r1 - G, k0, k1))

    def position_states(self, grid, q_lo, q_hi, k_lo, k_hi):
        L, G = self.num_tokens, self.num_globals
        tok_hi = k_hi.clamp(max=L)
        has_tok = tok_hi > k_lo
        # token part: the window (in token positions) and the per-batch key flags
        tok = as_4d(self.window.position_states(grid, q_lo - G, q_hi - G, k_lo,
                                              torch.maximum(tok_hi, k_lo + 1)))
        if self.local_keys is not None:
            tok = torch.minimum(tok, _flag_states(self.local_keys, k_lo, tok_hi))
        if not G:
            return torch.where(has_tok, tok, torch.tensor(EMPTY, dtype=torch.int8))
        glob = _flag_states(self.global_slots, k_lo - L, k_hi - L)
        has_glob = k_hi > L
        tok, glob = torch.broadcast_tensors(tok, glob)
        both = torch.where((tok == glob) & (tok != PARTIAL), tok,
                           torch.tensor(PARTIAL, dtype=torch.int8))
        return torch.where(has_tok & has_glob, both, torch.where(has_tok, tok, glob))

    def __repr__(self):
        return (f"LongformerMask({self.window!r}, tokens={self.num_tokens}, "
                f"globals={self.num_globals})")


class LongformerAttention(nn.Module):
    """Longformer self-attention with HuggingFace's parameter names.

    Args:
        embed_dim: model width E = num_heads * head_dim.
        num_heads: H.
        attention_window: the full window (even, as in ``LongformerConfig``); each local
            row sees ``attention_window // 2`` tokens on each side.
        dilation: None, an int or one int per head: the local window becomes
            ``masks.dilated(w, w, dilation)`` (keys i + t * dilation, |t| <= w).
        bias: biases on the six projections.
        dropout: dropout on the attention weights in training mode.
        backend: passed to :func:`attnkit.scaled_dot_product_attention`.

    Parameters ``query, key, value, query_global, key_global, value_global`` are
    ``nn.Linear(E, E)`` as in ``LongformerSelfAttention``, so its ``state_dict`` loads as
    is. ``forward`` returns the concatenated heads (B, L, E) *before* any output
    projection, like HuggingFace's module (the output dense layer belongs to the block).
    """

    def __init__(self, embed_dim: int, num_heads: int, attention_window: int, *,
                 dilation=None, bias: bool = True, dropout: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        head_dim = check_heads(embed_dim, num_heads)
        if (isinstance(attention_window, bool) or not isinstance(attention_window, int)
                or attention_window < 2 or attention_window % 2):
            raise ValueError(f"attention_window must be a positive even int (both sides), "
                             f"got {attention_window!r}")
        self.dropout = check_dropout(dropout)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.attention_window = attention_window
        self.one_sided_attn_window_size = attention_window // 2
        self.backend = backend
        w = self.one_sided_attn_window_size
        if dilation is None:
            self.window = SlidingWindowMask(w, w)
        else:
            self.window = DilatedMask(w, w, dilation)
            if self.window.num_heads not in (None, num_heads):
                raise ValueError(f"dilation has {self.window.num_heads} entries but there are "
                                 f"{num_heads} heads")
        f = dict(bias=bias, device=device, dtype=dtype)
        E = embed_dim
        self.query = nn.Linear(E, E, **f)
        self.key = nn.Linear(E, E, **f)
        self.value = nn.Linear(E, E, **f)
        #: how global rows get K_g and V_g: "projected" (every token, as HuggingFace),
        #: "absorbed" (W_k into the queries, W_v after, see _absorbed_global_attention)
        #: or "auto" (absorbed while cheaper: G * (H - 1) < E)
        self.global_path = "auto"
        self.query_global = nn.Linear(E, E, **f)
        self.key_global = nn.Linear(E, E, **f)
        self.value_global = nn.Linear(E, E, **f)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"attention_window={self.attention_window}, window={self.window!r}")

    def _heads(self, x: Tensor) -> Tensor:
        """(B, n, E) -> (B, H, n, d)"""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: Tensor, key_padding_mask: Tensor | None = None,
                global_attention_mask: Tensor | None = None) -> Tensor:
        """``hidden_states`` (B, L, E) -> (B, L, E).

        ``key_padding_mask`` (B, L): True marks padding (those rows output zeros).
        ``global_attention_mask`` (B, L): True/1 marks global tokens (padding wins).
        L need not be a multiple of the window.
        """
        x = hidden_states
        B, L, E = check_hidden(x, self.embed_dim)
        pad = bool_mask("key_padding_mask", key_padding_mask, B, L)
        is_global = bool_mask("global_attention_mask", global_attention_mask, B, L)
        if pad is not None and not pad.any():
            pad = None
        if is_global is not None and pad is not None:
            is_global = is_global & ~pad
        if is_global is not None and not is_global.any():
            is_global = None
        p = self.dropout if self.training else 0.0

        q = self._heads(self.query(x))
        local_keys = None if pad is None else ~pad
        if is_global is None:
            k, v = self._heads(self.key(x)), self._heads(self.value(x))
            mask = self.window if local_keys is None else LongformerMask(self.window, L, local_keys)
            out = scaled_dot_product_attention(q, k, v, mask, dropout_p=p, backend=self.backend)
        else:
            # keys [the L tokens | the G global tokens]: project the tokens and, appended,
            # the global tokens' hidden states again (one copy of x, not of K and V)
            index, slots = global_slots(is_global)
            x_all = torch.cat([x, x.gather(1, index.unsqueeze(-1).expand(-1, -1, E))], 1)
            k_all, v_all = self._heads(self.key(x_all)), self._heads(self.value(x_all))
            local_keys = ~is_global if local_keys is None else local_keys & ~is_global
            mask = LongformerMask(self.window, L, local_keys, slots)
            out = scaled_dot_product_attention(q, k_all, v_all, mask, dropout_p=p,
                                               backend=self.backend)
        out = out.transpose(1, 2).reshape(B, L, E)
        if is_global is not None:
            out = self._global_rows(x, out, index, slots, pad, p)
        if pad is not None:
            out = out.masked_fill(pad.unsqueeze(-1), 0.0)
        return out

    def _global_rows(self, x, out, index, slots, pad, p):
        """Replace the global tokens' rows by full attention with the global projections."""
        B, L, E = x.shape
        at = index.unsqueeze(-1).expand(-1, -1, E)  # (B, G, E)
        q = self._heads(self.query_global(x.gather(1, at)))  # (B, H, G, d)
        keep = None if pad is None else ~pad.view(B, 1, 1, L)
        G = q.shape[2]
        absorb = self.global_path == "absorbed" or (
            self.global_path == "auto" and G * (self.num_heads - 1) < E)
        if absorb:
            rows = self._absorbed_global_attention(q, x, keep, p)
        else:
            k, v = self._heads(self.key_global(x)), self._heads(self.value_global(x))
            rows = scaled_dot_product_attention(q, k, v, keep, dropout_p=p)
        rows = rows.transpose(1, 2).reshape(B, -1, E)
        rows = torch.where(slots.unsqueeze(-1), rows, out.gather(1, at))  # empty slots: keep
        if out.requires_grad:  # autograd saved this output: write a new tensor
            return out.scatter(1, at, rows)
        return out.scatter_(1, at, rows)  # inference: G rows written in place, no copy

    def _absorbed_global_attention(self, q, x, keep, p):
        """softmax(q K_g^T / sqrt(d)) V_g without projecting every token to K_g and V_g.

        With K_g = X W_k^T + b_k and V_g = X W_v^T + b_v (head h: rows h*d..h*d+d-1),

            q K_g^T = (q W_k) X^T + q . b_k      (the last term shifts a row equally:
                                                  the softmax ignores it)
            P V_g   = (P X) W_v^T + rowsum(P) b_v

        so each head's G queries become ``q W_k`` (width E) and attend over the hidden
        states X themselves, shared by all heads like multi-query attention; the value
        projection is applied to the G x E result. Cost 2 * H * G * L * E multiply-adds
        instead of 2 * L * E^2 for projecting K_g and V_g: cheaper while G * (H - 1) < E
        (4x fewer multiply-adds at H = 8, G = 16, E = 512). ``rowsum(P)`` is 1, 0 for a
        row that sees nothing, and varies under dropout: it comes out of the same call as
        an extra value column of ones.
        """
        B, H, G, d = q.shape
        E = x.shape[-1]
        w_k = self.key_global.weight.view(H, d, E)
        w_v = self.value_global.weight.view(H, d, E)
        q_x = torch.einsum("bhgd,hde->bhge", q, w_k)          # (B, H, G, E)
        values = x.unsqueeze(1)                                # (B, 1, L, E)
        b_v = self.value_global.bias
        ones = b_v is not None and (p > 0 or keep is not None)
        if ones:
            values = torch.cat([values, values.new_ones(B, 1, x.shape[1], 1)], -1)
        # one key/value head for all H * G queries: fold the heads into rows, so the
        # call is one (H*G, E) x (E, L) problem rather than H tiny ones
        o = scaled_dot_product_attention(q_x.reshape(B, 1, H * G, E), x.unsqueeze(1), values,
                                         keep, dropout_p=p, scale=1.0 / math.sqrt(d))
        o = o.view(B, H, G, -1)
        rows = torch.einsum("bhge,hde->bhgd", o[..., :E], w_v)  # (B, H, G, d)
        if b_v is not None:
            weight = o[..., E:] if ones else 1.0
            rows = rows + weight * b_v.view(1, H, 1, d)
        return rows


def global_slots(is_global: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of each batch element's global tokens, in order, padded to the largest
    count G: ``index`` (B, G) long and ``slots`` (B, G) bool (False: no token there;
    its index then points at some non-global token and is never attended)."""
    counts = is_global.sum(1)
    G = int(counts.max())
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)
    index = order[:, :G]
    slots = torch.arange(G, device=is_global.device) < counts.unsqueeze(1)
    return index, slots
