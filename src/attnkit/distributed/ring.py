"""Ring attention (Liu, Zaharia & Abbeel, 2023): the sequence is split across the ranks
of a group; each rank keeps its query shard and K/V blocks travel around the ring.

Forward, on rank r of W, for each K/V block that arrives:

    (O_b, lse_b) = attention(Q_r, K_b, V_b)                 one core-engine call per block
    lse = logaddexp(lse, lse_b);  O = exp(lse_old - lse) O + exp(lse_b - lse) O_b

and the next block is already on its way (isend/irecv posted before the computation,
waited after it), so communication hides behind compute.

Streaming. Each rank's K/V shard is cut into P pieces of at most ``kv_piece`` keys
(default :data:`KV_PIECE`), and the ring runs P rounds: in round j piece j of every
shard travels W - 1 hops. Only two pieces are in flight per rank (the one being used and
the one arriving), and engine calls cover at most ``q_rows`` query rows (default
:data:`Q_ROWS`), so beyond its own Q, K, V and output a rank holds O(piece + q_rows)
memory, not another shard.

Backward (a custom autograd Function; collective like the forward): the K/V pieces go
around the ring again in the same order, and with each piece travels the accumulator of
its dK/dV, to which every rank adds its queries' share; after a full circle the
accumulator is back at its owner. Besides the inputs, the forward keeps only the *global*
output O and log-sum-exp of this rank's query rows: each block's gradients come from them
through the engine's split backward
(:func:`attnkit.backends.chunked.chunked_attention_backward`, FlashAttention's):

    P_b = exp(scale * Q K_b^T + mask - lse)          the block's share of the softmax
    dS_b = P_b * (dO V_b^T - rowsum(dO * O))
    dQ += scale * dS_b K_b,   dK_b = scale * dS_b^T Q,   dV_b = P_b^T dO

so a block costs one recomputation of its scores, no forward of its own; summed over
the blocks these are the gradients of the whole attention. Memory stays O(N / W): the
two K/V messages of the forward, and three dK/dV messages (the one arriving, the one
being filled, the one in flight).

Causal attention skips blocks entirely in the future; with ``layout="zigzag"``
(see :mod:`.sharding`) every rank does the same amount of causal work.

Public pieces: :func:`ring_attention`; :class:`RingPlan` (who computes what) and
:class:`RingForward` (one rank's forward, step by step: the ring's messages and its
block computations can be run, and timed, apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends.chunked import chunked_attention_backward
from ..dtypes import compute_dtype, stat_dtype
from ..masks import KeyPaddingMask, causal
from .blocks import Call, block_attention, causal_calls, merge_into
from .group import Ring, exchange, ring_of, wait_all
from .inputs import check_sizes, prepare
from .sharding import Interval, check_layout, shard_intervals

__all__ = ["ring_attention", "RingPlan", "RingForward", "Q_ROWS", "KV_PIECE"]

#: default query rows per engine call (bounds the per-call output and gradient
#: temporaries)
Q_ROWS = 512
#: default keys per ring message (bounds the K/V pieces in flight on each rank, and the
#: engine's tile temporaries; smaller pieces mean more, shorter engine calls)
KV_PIECE = 512

NEG_INF = float("-inf")
KV_TAG, DKV_TAG = 0, 1


def _split(iv: Interval, size: int) -> list[Interval]:
    """Cut an interval into near-equal parts of at most ``size``."""
    parts = max(1, -(-iv.length // size))
    cuts = [iv.length * i // parts for i in range(parts + 1)]
    return [Interval(iv.local + a, iv.start + a, b - a) for a, b in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class RingPlan:
    """Who computes what: this rank's query intervals, and the K/V pieces of every shard.

    ``q_rows``: this rank's query intervals, at most ``q_rows`` rows each (the query
    rows of one engine call). ``pieces[j]`` is the j-th piece of a K/V shard as
    ``(Interval(local index, offset in its shard interval, length), index of that shard
    interval)``: the same local cut on every rank, so a piece's global positions follow
    from its origin rank. Build it with :meth:`build`.
    """
    ring: Ring
    layout: str
    is_causal: bool
    scale: float | None
    q_rows: tuple        # this rank's query intervals
    kv_len: int
    pieces: tuple        # (Interval with start = offset inside its shard interval, chunk)

    @staticmethod
    def build(q_len: int, kv_len: int, *, group=None, layout: str = "contiguous",
              is_causal: bool = False, scale: float | None = None, q_rows: int = Q_ROWS,
              kv_piece: int = KV_PIECE) -> RingPlan:
        """The plan of this rank of ``group`` for shards of ``q_len`` queries and
        ``kv_len`` keys (the arguments as for :func:`ring_attention`; every rank of the
        group must pass the same). Needs an initialised process group."""
        check_layout(layout)
        check_sizes({"q_rows": q_rows, "kv_piece": kv_piece})
        ring = ring_of(group)
        own_q = shard_intervals(q_len, ring.rank, ring.world, layout)
        rows = tuple(p for iv in own_q for p in _split(iv, q_rows))
        chunks = shard_intervals(kv_len, 0, ring.world, layout)
        pieces = tuple((p, ci) for ci, iv in enumerate(chunks)
                       for p in _split(Interval(iv.local, 0, iv.length), kv_piece))
        return RingPlan(ring, layout, is_causal, scale, rows, kv_len, pieces)

    @property
    def steps(self) -> int:
        """Steps of one pass around the ring: every piece of every shard on this rank."""
        return self.ring.world * len(self.pieces)

    def step(self, t: int) -> tuple[int, int]:
        """(piece j, hop) of step t: piece j of the shard of the rank ``hop`` places back."""
        return divmod(t, self.ring.world)

    def keys_of(self, origin: int, j: int) -> Interval:
        """Global positions of piece j of rank ``origin``'s shard (local index 0: the
        piece is its own buffer)."""
        piece, ci = self.pieces[j]
        chunk = shard_intervals(self.kv_len, origin, self.ring.world, self.layout)[ci]
        return Interval(0, chunk.start + piece.start, piece.length)

    def calls(self, origin: int, j: int) -> list[Call]:
        """The engine calls of this rank's queries against piece j of ``origin``'s shard."""
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


class RingForward:
    """The forward pass of ring attention on one rank, one step at a time.

    ``q`` (B, Hq, L, D), ``k`` (B, Hkv, S, D), ``v`` (B, Hkv, S, Dv) are this rank's
    shards, ``keep`` (B, S) bool (True = may attend) or None, ``plan`` their
    :class:`RingPlan`. Step t (of ``plan.steps``) handles piece j of the shard of the rank
    ``hop`` places back, ``(j, hop) = plan.step(t)``. :meth:`run` is the forward pass:

        for t in range(plan.steps):
            load(t); works = pass_on(t); compute(t); wait_all(works); advance(t)

    The steps are public so that the parts can be run apart, e.g. to time them: without
    :meth:`pass_on` and :meth:`advance` every step computes on this rank's own piece (the
    same computations, no messages); without :meth:`compute`, only the messages travel.
    Every rank of the group must run the same sequence of :meth:`pass_on` calls.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, plan: RingPlan):
        self.q, self.k, self.v, self.keep, self.plan = q, k, v, keep, plan
        B, Hq, L, _ = q.shape
        self.out = q.new_zeros(B, Hq, L, v.shape[-1], dtype=compute_dtype(q.dtype))
        self.lse = torch.full((B, Hq, L), NEG_INF, dtype=stat_dtype(q.dtype), device=q.device)
        self._slots, self._mine = _message_slots(plan, k, v, keep), 0   # mine: slot in hand

    def _message(self, t: int, slot: int) -> Tensor:
        piece = self.plan.pieces[self.plan.step(t)[0]][0]
        size = _message_numel(self.k, self.v, self.keep is not None, piece.length)
        return self._slots[slot][:size]

    def load(self, t: int) -> None:
        """At the first hop of a round, put this rank's own piece of the round in hand
        (later hops compute on what :meth:`advance` put there)."""
        j, hop = self.plan.step(t)
        if hop == 0:
            _pack(self._slots[self._mine], self.k, self.v, self.keep, self.plan.pieces[j][0])

    def pass_on(self, t: int) -> list:
        """Start sending the piece in hand to the next rank and receiving the next step's
        piece from the previous one (nothing at the last hop of a round); returns the
        works, to be waited for once each (:func:`~.group.wait_all`) before :meth:`advance`."""
        if self.plan.step(t)[1] == self.plan.ring.world - 1:
            return []
        return exchange(self.plan.ring, sends=[self._message(t, self._mine)],
                        recvs=[self._message(t, 1 - self._mine)], tag=KV_TAG)

    def compute(self, t: int) -> None:
        """Step t's engine calls on the piece in hand, merged into the output."""
        j, hop = self.plan.step(t)
        piece = self.plan.pieces[j][0]
        kb, vb, keep_b = _unpack(self._message(t, self._mine), self.k, self.v,
                                 self.keep is not None, piece.length)
        q, out, lse = self.q, self.out, self.lse
        for c in self.plan.calls((self.plan.ring.rank - hop) % self.plan.ring.world, j):
            o, l = block_attention(q[:, :, c.q0:c.q1], kb[:, :, c.k0:c.k1],
                                   vb[:, :, c.k0:c.k1],
                                   None if keep_b is None else keep_b[:, c.k0:c.k1],
                                   c.causal, self.plan.scale)
            merge_into(out[:, :, c.q0:c.q1], lse[:, :, c.q0:c.q1], o, l)
            del o, l                          # before the next call allocates its own

    def advance(self, t: int) -> None:
        """The piece received by :meth:`pass_on` (t) becomes the piece in hand."""
        if self.plan.step(t)[1] < self.plan.ring.world - 1:
            self._mine = 1 - self._mine

    def result(self) -> tuple[Tensor, Tensor]:
        """(out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L)) of the steps so far."""
        return self.out.to(self.q.dtype), self.lse

    def run(self) -> tuple[Tensor, Tensor]:
        """All steps, each piece's messages overlapped with its computation: (out, lse)
        of this rank's queries over the whole sequence."""
        for t in range(self.plan.steps):
            self.load(t)
            works = self.pass_on(t)
            self.compute(t)
            wait_all(works)                   # gloo: a P2P work must be waited once only
            self.advance(t)
        return self.result()


# ----------------------------------------------------------------------------- backward

def _block_grads(q, k, v, keep, call: Call, scale, dout, out, lse):
    """(dq, dk, dv) of one block given the *global* output and ``lse`` of its query rows:
    the engine's split backward recomputes this block's share of the softmax."""
    mask = None if keep is None else KeyPaddingMask(keep)
    if call.causal:
        mask = causal() if mask is None else causal() & mask
    return chunked_attention_backward(dout, q, k, v, out, lse, mask=mask,
                                      scale=q.shape[-1] ** -0.5 if scale is None else scale)


def _ring_backward(dout, q, k, v, keep, out, lse, plan: RingPlan):
    ring = plan.ring
    W = ring.world
    acc = compute_dtype(q.dtype)
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
        out, lse = RingForward(q, k, v, keep, plan).run()
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
                   layout: str = "contiguous", q_rows: int = Q_ROWS,
                   kv_piece: int = KV_PIECE) -> Tensor:
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
        q_rows: query rows per engine call (default :data:`Q_ROWS`): bounds the
            temporaries of each call, forward and backward.
        kv_piece: keys per ring message (default :data:`KV_PIECE`): bounds the K/V (and,
            backward, dK/dV) in flight on each rank. Every rank must pass the same.

    Returns:
        (..., Hq, L, Dv): this rank's shard of the output, in the same layout.

    Raises ``ValueError`` on every rank when the shards differ between ranks (unequal
    lengths, heads, head dims, piece sizes) or when any rank's inputs are invalid.
    """
    ring = ring_of(group)
    s = prepare("ring_attention", ring, query, key, value, is_causal=is_causal, scale=scale,
                key_padding_mask=key_padding_mask, layout=layout,
                sizes={"q_rows": q_rows, "kv_piece": kv_piece})
    plan = RingPlan.build(s.q.shape[2], s.k.shape[2], group=group, layout=layout,
                          is_causal=is_causal, scale=scale, q_rows=q_rows, kv_piece=kv_piece)
    out = _RingAttention.apply(s.q, s.k, s.v, s.keep, plan)
    return out.reshape(*s.batch, *out.shape[1:])
