"""Ring attention (Liu, Zaharia & Abbeel, 2023): the sequence is split across the ranks
of a group; each rank keeps its query shard and K/V blocks travel around the ring.

Forward, on rank r of W, for each K/V block that arrives:

    (O_b, lse_b) = attention(Q_r, K_b, V_b)                 one core-engine call per block
    lse = logaddexp(lse, lse_b);  O = exp(lse_old - lse) O + exp(lse_b - lse) O_b

and the next block is already on its way (isend/irecv posted before the computation,
waited after it), so communication hides behind compute.

Streaming. Each rank's K/V shard is cut into P pieces of at most ``KV_PIECE`` keys, and
the ring runs P rounds: in round j piece j of every shard travels W - 1 hops. Only two
pieces are in flight per rank (the one being used and the one arriving), and engine calls
cover at most ``Q_ROWS`` query rows, so beyond its own Q, K, V and output a rank holds
O(piece + Q_ROWS) memory, not another shard.

Backward (a custom autograd Function): the K/V pieces go around the ring again, and with
each piece travels the accumulator of its dK/dV; after a full circle the accumulator is
back at its owner. Each block's gradient is recomputed from the saved global output O and
log-sum-exp: with the block's own (O_b, lse_b) and w_b = exp(lse_b - lse), the chain rule
through the merge gives

    dL/dO_b = w_b dO,    dL/dlse_b = w_b (rowsum(dO * O_b) - rowsum(dO * O))

which the core engine's backward turns into dQ, dK_b, dV_b. Memory stays O(N / W). (The
recomputation costs one more forward per block, and a gradient through lse keeps the
engine on its eager kernel: on CPU the ring backward takes ~2.5x the single-process
chunked backward for the same blocks. An engine entry point "backward of a block given
the global O and lse", as FlashAttention's kernels have, would remove both.)

Causal attention skips blocks entirely in the future; with ``layout="zigzag"``
(see :mod:`.sharding`) every rank does the same amount of causal work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends.chunked import chunked_attention_backward
from ..dtypes import stat_dtype
from ..masks import KeyPaddingMask, causal
from .blocks import Call, block_attention, causal_calls, merge_into
from .group import Ring, exchange, ring_of, wait_all
from .inputs import prepare
from .sharding import Interval, shard_intervals

__all__ = ["ring_attention", "Q_ROWS", "KV_PIECE"]

#: query rows per engine call (bounds the per-call output and gradient temporaries)
Q_ROWS = 512
#: keys per ring message (bounds the K/V pieces in flight on each rank, and the engine's
#: tile temporaries); measured on CPU: 512-key pieces cost ~5% over one engine call
KV_PIECE = 512

NEG_INF = float("-inf")
KV_TAG, DKV_TAG = 0, 1


def _split(iv: Interval, size: int) -> list[Interval]:
    """Cut an interval into near-equal parts of at most ``size``."""
    parts = max(1, -(-iv.length // size))
    cuts = [iv.length * i // parts for i in range(parts + 1)]
    return [Interval(iv.local + a, iv.start + a, b - a) for a, b in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class _Plan:
    """Who computes what: this rank's query intervals, and the K/V pieces of every shard.

    ``pieces[j]`` is the j-th piece of a K/V shard as ``(Interval(local index, offset in
    its shard interval, length), index of that shard interval)``: the same local cut on
    every rank, so a piece's global positions follow from its origin rank.
    """
    ring: Ring
    layout: str
    is_causal: bool
    scale: float | None
    q_rows: tuple        # this rank's query intervals, at most Q_ROWS rows each
    kv_len: int
    pieces: tuple        # (Interval with start = offset inside its shard interval, chunk)

    @staticmethod
    def build(ring, layout, is_causal, scale, q_len, kv_len):
        own_q = shard_intervals(q_len, ring.rank, ring.world, layout)
        rows = tuple(p for iv in own_q for p in _split(iv, Q_ROWS))
        chunks = shard_intervals(kv_len, 0, ring.world, layout)
        pieces = tuple((p, ci) for ci, iv in enumerate(chunks)
                       for p in _split(Interval(iv.local, 0, iv.length), KV_PIECE))
        return _Plan(ring, layout, is_causal, scale, rows, kv_len, pieces)

    def keys_of(self, origin: int, j: int) -> Interval:
        """Global positions of piece j of rank ``origin``'s shard (local index 0: the
        piece is its own buffer)."""
        piece, ci = self.pieces[j]
        chunk = shard_intervals(self.kv_len, origin, self.ring.world, self.layout)[ci]
        return Interval(0, chunk.start + piece.start, piece.length)

    def calls(self, origin: int, j: int) -> list[Call]:
        keys = self.keys_of(origin, j)
        return [c for q in self.q_rows for c in causal_calls(q, keys, self.is_causal)]


# ----------------------------------------------------------------- K/V pieces as messages

def _views(buf: Tensor, k: Tensor, v: Tensor, has_keep: bool, m: int):
    """(K, V, keep-as-float or None) views of a [K | V | keep] message of ``m`` keys."""
    B, H, _, D = k.shape
    nk, nv = B * H * m * D, B * H * m * v.shape[-1]
    kb = buf[:nk].view(B, H, m, D)
    vb = buf[nk:nk + nv].view(B, H, m, v.shape[-1])
    keep = buf[nk + nv:].view(B, m) if has_keep else None
    return kb, vb, keep


def _message_numel(k: Tensor, v: Tensor, has_keep: bool, m: int) -> int:
    B, H = k.shape[:2]
    return B * H * m * (k.shape[-1] + v.shape[-1]) + (B * m if has_keep else 0)


def _pack(buf: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, piece: Interval) -> Tensor:
    """Write the message [K | V | keep] for keys ``piece`` of this rank's shard into the
    front of ``buf`` (keep travels as 0/1 in K's dtype); returns that message."""
    lo, m = piece.local, piece.length
    buf = buf[:_message_numel(k, v, keep is not None, m)]
    kb, vb, keep_b = _views(buf, k, v, keep is not None, m)
    kb.copy_(k[:, :, lo:lo + m])
    vb.copy_(v[:, :, lo:lo + m])
    if keep is not None:
        keep_b.copy_(keep[:, lo:lo + m])
    return buf


def _message_slots(plan, k, v, keep) -> list[Tensor]:
    """The two K/V message buffers each rank needs (the piece in use, the one arriving),
    allocated once per call and used in turn, so the ring allocates nothing per step."""
    m = max(p.length for p, _ in plan.pieces)
    n = _message_numel(k, v, keep is not None, m)
    return [torch.empty(n, dtype=k.dtype, device=k.device) for _ in range(2)]


def _unpack(buf: Tensor, k: Tensor, v: Tensor, has_keep: bool, m: int):
    """(K, V, keep or None): keep is None also when no key of the piece is padding."""
    kb, vb, keep = _views(buf, k, v, has_keep, m)
    if keep is not None:
        keep = keep > 0.5
        if bool(keep.all()):
            keep = None
    return kb, vb, keep


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype



# ----------------------------------------------------------------------------- forward

def _ring_forward(q, k, v, keep, plan: _Plan, *, communicate: bool = True,
                  overlap: bool = True, compute: bool = True):
    """(out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L)) of this rank's queries over the
    whole sequence. For the benchmark: ``communicate=False`` computes the very same
    blocks with a local stand-in for every received piece, ``overlap=False`` waits for
    each message before computing, ``compute=False`` only passes the messages."""
    ring = plan.ring
    W = ring.world
    B, Hq, L, _ = q.shape
    out = q.new_zeros(B, Hq, L, v.shape[-1], dtype=_acc_dtype(q.dtype))
    lse = torch.full((B, Hq, L), NEG_INF, dtype=stat_dtype(q.dtype), device=q.device)
    slots, mine = _message_slots(plan, k, v, keep), 0     # mine: the slot in use
    for t in range(W * len(plan.pieces)):
        j, hop = divmod(t, W)                 # round j: piece j; hop: how far it came
        piece = plan.pieces[j][0]
        size = _message_numel(k, v, keep is not None, piece.length)
        if hop == 0:
            _pack(slots[mine], k, v, keep, piece)
        cur, works = slots[mine][:size], []
        if hop < W - 1 and communicate:       # forward it, and receive the next one
            works = exchange(ring, sends=[cur], recvs=[slots[1 - mine][:size]], tag=KV_TAG)
            if not overlap:
                wait_all(works)
                works = []                    # gloo: a P2P work must be waited once only
        kb, vb, keep_b = _unpack(cur, k, v, keep is not None, piece.length)
        for c in plan.calls((ring.rank - hop) % W, j) if compute else ():
            o, l = block_attention(q[:, :, c.q0:c.q1], kb[:, :, c.k0:c.k1],
                                   vb[:, :, c.k0:c.k1],
                                   None if keep_b is None else keep_b[:, c.k0:c.k1],
                                   c.causal, plan.scale)
            merge_into(out[:, :, c.q0:c.q1], lse[:, :, c.q0:c.q1], o, l)
            del o, l                          # before the next call allocates its own
        wait_all(works)
        if hop < W - 1 and communicate:
            mine = 1 - mine
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- backward

def _block_grads(q, k, v, keep, call: Call, scale, dout, out, lse):
    """(dq, dk, dv) of one block given the *global* output and ``lse`` of its query rows:
    the engine's split backward recomputes this block's share of the softmax."""
    mask = None if keep is None else KeyPaddingMask(keep)
    if call.causal:
        mask = causal() if mask is None else causal() & mask
    return chunked_attention_backward(dout, q, k, v, out, lse, mask=mask,
                                      scale=q.shape[-1] ** -0.5 if scale is None else scale)


def _ring_backward(dout, q, k, v, keep, out, lse, plan: _Plan):
    ring = plan.ring
    W = ring.world
    acc = _acc_dtype(q.dtype)
    B, Hkv = k.shape[:2]
    D, Dv = k.shape[-1], v.shape[-1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)

    def dkv_views(buf, j):
        """The [dK | dV] message of piece j at the front of ``buf``, and its dK, dV."""
        m = plan.pieces[j][0].length
        nk, nv = B * Hkv * m * D, B * Hkv * m * Dv
        msg = buf[:nk + nv]
        return msg, msg[:nk].view(B, Hkv, m, D), msg[nk:].view(B, Hkv, m, Dv)

    def store(j, msg):                        # a piece's finished dK/dV is back home
        p = plan.pieces[j][0]
        _, gk, gv = dkv_views(msg, j)
        dk[:, :, p.local:p.local + p.length] += gk
        dv[:, :, p.local:p.local + p.length] += gv

    slots, mine = _message_slots(plan, k, v, keep), 0     # K/V messages, as forward
    # dK/dV messages: the one arriving, the one being filled, the one in flight
    n_dkv = B * Hkv * max(p.length for p, _ in plan.pieces) * (D + Dv) if W > 1 else 0
    got_slot, *travel_slots = (torch.empty(n_dkv, dtype=acc, device=k.device)
                               for _ in range(3))
    sending = []
    for t in range(W * len(plan.pieces)):
        j, hop = divmod(t, W)
        piece = plan.pieces[j][0]
        size = _message_numel(k, v, keep is not None, piece.length)
        if hop == 0:
            _pack(slots[mine], k, v, keep, piece)
        cur = slots[mine][:size]
        got = dkv_views(got_slot, (t - 1) // W)[0] if W > 1 and t > 0 else None
        # a peer sends dK/dV of its step t-1 before K/V of its step t: receive in that order
        works = exchange(ring, recvs=[got] if got is not None else [], tag=DKV_TAG)
        if hop < W - 1:
            works += exchange(ring, sends=[cur], recvs=[slots[1 - mine][:size]], tag=KV_TAG)

        if W == 1:                            # no ring: accumulate in place
            lo, hi = piece.local, piece.local + piece.length
            travelling, dkb, dvb = None, dk[:, :, lo:hi], dv[:, :, lo:hi]
        else:
            travelling, dkb, dvb = dkv_views(travel_slots[t % 2], j)
            travelling.zero_()
        kb, vb, keep_b = _unpack(cur, k, v, keep is not None, piece.length)
        for c in plan.calls((ring.rank - hop) % W, j):
            gq, gk, gv = _block_grads(q[:, :, c.q0:c.q1], kb[:, :, c.k0:c.k1],
                                      vb[:, :, c.k0:c.k1],
                                      None if keep_b is None else keep_b[:, c.k0:c.k1],
                                      c, plan.scale, dout[:, :, c.q0:c.q1],
                                      out[:, :, c.q0:c.q1], lse[:, :, c.q0:c.q1])
            dq[:, :, c.q0:c.q1] += gq
            dkb[:, :, c.k0:c.k1] += gk
            dvb[:, :, c.k0:c.k1] += gv
            del gq, gk, gv
        wait_all(works)
        wait_all(sending)
        sending = []
        if travelling is not None:
            if got is not None and hop == 0:   # the previous round's piece came home
                store(j - 1, got)
            elif got is not None:               # add what the earlier ranks gathered
                travelling += got
            sending = exchange(ring, sends=[travelling], tag=DKV_TAG)
        if hop < W - 1:
            mine = 1 - mine
    if W > 1:
        last = dkv_views(got_slot, len(plan.pieces) - 1)[0]
        wait_all(exchange(ring, recvs=[last], tag=DKV_TAG))
        store(len(plan.pieces) - 1, last)
        wait_all(sending)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, plan):
        out, lse = _ring_forward(q, k, v, keep, plan)
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, keep, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, keep, out, lse, ctx.plan)
        return dq, dk, dv, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None,
                   is_causal: bool = False, scale: float | None = None,
                   key_padding_mask: Tensor | None = None,
                   layout: str = "contiguous") -> Tensor:
    r"""Attention over a sequence split across the ranks of ``group``.

    Every rank passes its shard and gets back its shard of
    ``softmax(scale * Q K^T, masked) V`` computed over the *whole* sequence; the result
    equals single-process ``attnkit.scaled_dot_product_attention`` on the gathered
    sequence, and is differentiable (the backward pass is collective too: every rank of
    the group must backpropagate through the call).

    Args:
        query: (..., Hq, L, D), this rank's shard of the queries (sequence dim -2).
        key: (..., Hkv, S, D), Hq % Hkv == 0 (grouped-query / multi-query attention).
        value: (..., Hkv, S, Dv).
        group: the process group whose ranks hold the shards (default: the world).
        is_causal: query at global position p sees keys at positions <= p; then the
            query and key shards are one sequence and L == S.
        scale: score scale, default 1/sqrt(D).
        key_padding_mask: this rank's (..., S) slice of the key padding mask, True =
            padding (as in ``nn.MultiheadAttention``), in the same layout as the keys;
            it travels around the ring with its keys. A query that sees no key gets zeros.
        layout: "contiguous" (rank r holds the r-th of W equal slices) or "zigzag" (rank
            r holds slices r and 2W-1-r of 2W: equal causal work on every rank); see
            :func:`attnkit.distributed.shard_sequence`.

    Returns:
        (..., Hq, L, Dv): this rank's shard of the output, in the same layout.

    Raises ``ValueError`` on every rank when the shards differ between ranks (unequal
    lengths, heads, head dims) or when any rank's inputs are invalid.
    """
    ring = ring_of(group)
    s = prepare("ring_attention", ring, query, key, value, is_causal=is_causal, scale=scale,
                key_padding_mask=key_padding_mask, layout=layout)
    plan = _Plan.build(ring, layout, is_causal, scale, s.q.shape[2], s.k.shape[2])
    out = _RingAttention.apply(s.q, s.k, s.v, s.keep, plan)
    return out.reshape(*s.batch, *out.shape[1:])
