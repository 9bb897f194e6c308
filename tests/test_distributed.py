"""attnkit.distributed: ring and all-to-all attention across gloo processes equal
single-process attention (forward and backward), sharding round trips, the causal block
plan, and a harness that fails cleanly when a rank raises or hangs.

Multi-process checks run in 2 and 4 processes started from a forkserver that has torch
preloaded (a few seconds instead of ~15 s per spawn on this machine), each on a free
port, under a deadline after which every process is killed.
"""

import functools
import itertools
import multiprocessing
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit.distributed import (gather_sequence, ring_attention, shard_positions,
                                 shard_sequence, ulysses_attention, unshard_sequence)
from attnkit.distributed.blocks import causal_calls, merge_into
from attnkit.distributed.group import wait_all
from attnkit.distributed.ring import RingForward, RingPlan
from attnkit.masks import KeyPaddingMask
from attnkit.distributed.sharding import Interval, shard_intervals
from attnkit.masks import Grid

JOB_TIMEOUT = 90.0        # seconds for one multi-process job, start-up included


# ------------------------------------------------------------------------ the harness

class RankTimeout(TimeoutError):
    def __init__(self, msg, pids):
        super().__init__(msg)
        self.pids = pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=JOB_TIMEOUT))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args, timeout=JOB_TIMEOUT):
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes. Raises the first rank's
    exception (torch's ProcessRaisedException, with its traceback) or ``RankTimeout``
    when the job is not done within ``timeout`` s; every process is gone on return."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "attnkit.distributed"])
    job = mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not job.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise RankTimeout(f"{world}-rank job {fn.__name__} still running after "
                                  f"{timeout} s", [p.pid for p in job.processes])
    finally:
        for p in job.processes:
            if p.is_alive():
                p.kill()
        for p in job.processes:
            p.join(10)


# ---------------------------------------------------------------- reference (float64)

def reference(q, k, v, is_causal=False, keep=None, scale=None):
    """Textbook attention on the full sequence: GQA by repeating K/V heads, padding as
    keep (B, S), rows that see nothing give zeros."""
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    L, S = s.shape[-2:]
    allow = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allow = allow.tril(S - L)
    if keep is not None:
        allow = allow & keep.view(*keep.shape[:-1], 1, 1, S)
    s = s.masked_fill(~allow, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def test_reference_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 4, 10, 8, dtype=torch.float64) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference(q, k, v, True), want)


# ------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(layout, world):
    N = 4 * world * 3
    x = torch.arange(N).view(1, N, 1).expand(2, N, 3)
    shards = [shard_sequence(x, r, world, layout=layout, dim=1) for r in range(world)]
    assert all(s.shape == (2, N // world, 3) for s in shards)
    for r, s in enumerate(shards):      # the values are the positions
        assert torch.equal(s[0, :, 0], shard_positions(N, r, world, layout=layout))
    assert torch.equal(unshard_sequence(shards, layout=layout, dim=1), x)
    covered = torch.cat([shard_positions(N, r, world, layout=layout) for r in range(world)])
    assert torch.equal(covered.sort().values, torch.arange(N))


def test_zigzag_holds_chunks_r_and_mirror():
    pos = shard_positions(16, 1, 4, layout="zigzag")      # chunks of 2: 1 and 6
    assert pos.tolist() == [2, 3, 12, 13]
    assert shard_intervals(4, 1, 4, "zigzag") == [Interval(0, 2, 2), Interval(2, 12, 2)]


def test_zigzag_balances_causal_work():
    world, N = 4, 64
    work = []
    for r in range(world):
        p = shard_positions(N, r, world, layout="zigzag")
        work.append(int((p + 1).sum()))                    # keys seen under causal
    assert len(set(work)) == 1
    contiguous = [int((shard_positions(N, r, world) + 1).sum()) for r in range(world)]
    assert len(set(contiguous)) == world


def test_sharding_errors():
    x = torch.zeros(2, 10, 4)
    with pytest.raises(ValueError, match="does not split into 8 equal"):
        shard_sequence(torch.zeros(2, 12, 4), 0, 4, layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(x, 0, 2, layout="striped")
    with pytest.raises(ValueError, match="rank"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="equal lengths"):
        unshard_sequence([torch.zeros(2, 3), torch.zeros(2, 4)], dim=-1)


def test_ring_attention_needs_an_initialised_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


# ------------------------------------------------------------ block plan and merging

@pytest.mark.parametrize("a,n,c,m", [(a, n, c, m) for a, n, c, m in
                                      itertools.product([0, 3, 8], [1, 4, 6], [0, 2, 5, 9],
                                                        [1, 3, 5])])
def test_causal_calls_cover_exactly_the_causal_entries(a, n, c, m):
    """The calls, read with the engine's bottom-right causal alignment, allow exactly the
    (query p, key j) pairs with j <= p, each once."""
    q, k = Interval(2, a, n), Interval(1, c, m)
    hits = torch.zeros(n, m, dtype=torch.int64)
    for call in causal_calls(q, k, True):
        L, S = call.q1 - call.q0, call.k1 - call.k0
        allow = torch.ones(L, S, dtype=torch.bool)
        if call.causal:
            allow = allow.tril(S - L)
        hits[call.q0 - 2:call.q1 - 2, call.k0 - 1:call.k1 - 1] += allow
    want = (torch.arange(c, c + m).view(1, -1) <= torch.arange(a, a + n).view(-1, 1))
    assert torch.equal(hits, want.long())
    assert causal_calls(q, k, False) == [(2, 2 + n, 1, 1 + m, False)]


def test_key_padding_mask_tiles_and_block_states():
    keep = torch.rand(3, 37) > 0.4
    keep[1] = True
    keep[2, 8:24] = False
    mask = KeyPaddingMask(keep)
    dense = mask.materialize(5, 37)
    assert torch.equal(dense, keep.view(3, 1, 1, 37).expand(3, 1, 5, 37))
    k_lo = torch.tensor([[0, 8, 16, 24, 32]])
    k_hi = torch.tensor([[8, 16, 24, 32, 37]])
    q_lo, q_hi = torch.tensor([[0], [4]]), torch.tensor([[4], [5]])
    st = mask.block_states(Grid(5, 37), q_lo, q_hi, k_lo, k_hi)
    for b in range(3):
        for j in range(5):
            blk = keep[b, k_lo[0, j]:k_hi[0, j]]
            want = 2 if blk.all() else (0 if not blk.any() else 1)
            assert (st[b, 0, :, j] == want).all()


def test_merge_into_equals_attention_over_all_keys_and_handles_empty_rows():
    q = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 10, 5, dtype=torch.float64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :] = False                                       # batch 0 sees nothing at all
    keep[1, 4:] = False                                      # batch 1: second block empty
    out = torch.zeros(2, 3, 6, 5, dtype=torch.float64)
    lse = torch.full((2, 3, 6), float("-inf"), dtype=torch.float64)
    for lo, hi in ((0, 4), (4, 10)):
        o, l = attnkit.scaled_dot_product_attention(
            q, k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=keep[:, None, None, lo:hi],
            return_lse=True, backend="chunked")
        merge_into(out, lse, o, l)
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference(q, k, v, keep=keep))
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


# ------------------------------------------------------------ multi-process workers

def _inputs(B, Hq, Hkv, N, D, seed, dtype=torch.float64, batch=None):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if batch is None else batch
    q = torch.randn(*lead, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(*lead, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(*lead, Hkv, N, D, generator=g, dtype=dtype)
    dout = torch.randn(*lead, Hq, N, D, generator=g, dtype=dtype)
    padding = torch.rand(*lead, N, generator=g) < 0.3
    padding.view(-1, N)[0, :3] = True           # row 0 of batch 0 sees nothing when causal
    return q, k, v, dout, padding


def _check(fn, rank, world, q, k, v, dout, *, is_causal, layout, padding=None, tol=1e-9):
    """fn on this rank's shards vs the float64 reference on the full sequence: output
    and the gradients of q, k, v."""
    keep = None if padding is None else ~padding
    qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = reference(qf, kf, vf, is_causal, keep)
    want_grads = torch.autograd.grad(want, (qf, kf, vf), dout)

    def shard(t, dim=-2):
        return shard_sequence(t, rank, world, layout=layout, dim=dim)

    ql, kl, vl = (shard(t).detach().clone().requires_grad_() for t in (q, k, v))
    kpm = None if padding is None else shard(padding, dim=-1)
    out = fn(ql, kl, vl, is_causal=is_causal, layout=layout, key_padding_mask=kpm)
    what = f"{fn.__name__} layout={layout} causal={is_causal} pad={padding is not None}"
    assert out.shape == ql.shape[:-1] + (v.shape[-1],), what
    torch.testing.assert_close(out, shard(want.detach()), atol=tol, rtol=tol, msg=what)
    grads = torch.autograd.grad(out, (ql, kl, vl), shard(dout))
    for name, got, full in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, shard(full), atol=tol, rtol=tol,
                                   msg=f"d{name}: {what}")


def _ring(q_rows, kv_piece):
    fn = functools.partial(ring_attention, q_rows=q_rows, kv_piece=kv_piece)
    fn.__name__ = f"ring_attention(q_rows={q_rows}, kv_piece={kv_piece})"
    return fn


def _equivalence_job(rank, world):
    # small ring pieces and query blocks, so several pieces and calls per shard are used
    small = _ring(7, 5)
    N = 12 * world
    for Hkv in (2, 1):                                       # GQA and MQA, Hq = 4
        q, k, v, dout, padding = _inputs(2, 4, Hkv, N, 8, seed=Hkv)
        for fn, layout, causal in itertools.product((small, ulysses_attention),
                                                    ("contiguous", "zigzag"), (False, True)):
            _check(fn, rank, world, q, k, v, dout, is_causal=causal, layout=layout)
            if Hkv == 2:
                _check(fn, rank, world, q, k, v, dout, is_causal=causal, layout=layout,
                       padding=padding)
    # extra batch dims and a value head dim different from the query's
    q, k, _, dout, padding = _inputs(3, 2, 2, N, 8, seed=5, batch=(3, 1))
    v = torch.randn(3, 1, 2, N, 6, dtype=torch.float64)
    _check(small, rank, world, q, k, v, dout[..., :6], is_causal=True,
           layout="zigzag", padding=padding)
    # float32, longer pieces
    longer = _ring(32, 16)
    q, k, v, dout, padding = _inputs(1, 2, 1, 80 * world, 8, seed=7, dtype=torch.float32)
    _check(longer, rank, world, q, k, v, dout, is_causal=True, layout="zigzag",
           padding=padding, tol=2e-5)
    # gather_sequence puts the shards back together
    full = gather_sequence(shard_sequence(q, rank, world, layout="zigzag"), layout="zigzag")
    assert torch.equal(full, q)
    if world == 4:                            # two rings of two: ranks {0, 1} and {2, 3}
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group, sub_rank = groups[rank // 2], rank % 2
        q, k, v, dout, padding = _inputs(2, 4, 2, 24, 8, seed=11 + rank // 2)
        for fn in (longer, ulysses_attention):
            attention = functools.partial(fn, group=group)
            attention.__name__ = fn.__name__
            _check(attention, sub_rank, 2, q, k, v, dout, is_causal=True, layout="zigzag",
                   padding=padding)


def _steps_job(rank, world):
    """RingForward's steps, run as the forward does or without overlap, give the forward's
    output; without messages every step computes on the rank's own piece."""
    q, k, v = _inputs(1, 2, 2, 16, 8, seed=3 + rank)[:3]
    plan = RingPlan.build(16, 16, layout="zigzag", is_causal=True, q_rows=3, kv_piece=5)
    assert plan.steps == world * len(plan.pieces) and len(plan.pieces) == 4
    want, want_lse = RingForward(q, k, v, None, plan).run()
    serial = RingForward(q, k, v, None, plan)
    for t in range(plan.steps):
        serial.load(t)
        wait_all(serial.pass_on(t))
        serial.compute(t)
        serial.advance(t)
    out, lse = serial.result()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    ref = ring_attention(q, k, v, is_causal=True, layout="zigzag", q_rows=3, kv_piece=5)
    torch.testing.assert_close(want, ref, atol=0, rtol=0)
    local = RingForward(q, k, v, None, plan)
    for t in range(plan.steps):                  # no messages: no collective, no hang
        local.load(t)
        local.compute(t)
    assert local.result()[0].isfinite().all()


def test_ring_forward_steps_compose_into_the_forward():
    run_ranks(_steps_job, 2)


def _errors_job(rank, world):
    q = torch.randn(1, 2, 6, 8)
    # one rank's shard is longer: every rank raises, none hangs
    L = 8 if rank == 0 else 6
    qr = torch.randn(1, 2, L, 8)
    with pytest.raises(ValueError, match=r"equal shards .*query length per rank \[8, 6"):
        ring_attention(qr, qr, qr)
    with pytest.raises(ValueError, match="equal shards"):
        ulysses_attention(qr, qr, qr)
    # a rank whose own input is invalid raises its error; the others name that rank
    bad = torch.zeros(1, 5, dtype=torch.bool) if rank == 1 else torch.zeros(1, 6, dtype=torch.bool)
    expect = "key_padding_mask must be" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expect):
        ring_attention(q, q, q, key_padding_mask=bad)
    with pytest.raises(ValueError, match="query heads .* multiple of the group size"):
        ulysses_attention(torch.randn(1, world + 1, 6, 8), q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="same length"):
        ring_attention(q, q[:, :, :4], q[:, :, :4], is_causal=True)
    with pytest.raises(ValueError, match="even"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], layout="zigzag")
    # piece sizes: checked on every rank, and they must agree (messages have their size)
    with pytest.raises(ValueError, match="kv_piece must be at least 1"):
        ring_attention(q, q, q, kv_piece=0)
    with pytest.raises(ValueError, match=r"kv_piece per rank \[4, 6\]"):
        ring_attention(q, q, q, kv_piece=4 if rank == 0 else 6)
    with pytest.raises(TypeError, match="q_rows must be an int"):
        RingPlan.build(6, 6, q_rows=2.5)
    # after all of that the group is still in step
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_ulysses_equal_single_process_attention(world):
    run_ranks(_equivalence_job, world)


def test_unequal_or_invalid_shards_raise_value_error_on_every_rank():
    run_ranks(_errors_job, 2)


# --------------------------------------------------------- a failing or hanging rank

def _raise_on_rank1(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()                                           # would wait for rank 1


def _hang_on_rank1(rank, world):
    dist.barrier()
    if rank == 1:
        time.sleep(3600)
    dist.barrier()


def test_a_rank_that_raises_fails_the_job_quickly():
    t0 = time.monotonic()
    # whichever rank's failure torch reports first: rank 1's own error, or rank 0 seeing
    # its peer vanish mid-barrier; either way the job ends with an error, not a hang
    with pytest.raises(mp.ProcessRaisedException,
                       match="rank 1 fails on purpose|Connection reset by peer|Connection closed"):
        run_ranks(_raise_on_rank1, 2)
    assert time.monotonic() - t0 < JOB_TIMEOUT


def test_a_rank_that_hangs_fails_the_job_at_the_deadline_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        run_ranks(_hang_on_rank1, 2, timeout=8.0)
    assert time.monotonic() - t0 < 8.0 + 15.0
    for pid in info.value.pids:                              # reaped: no such process
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
