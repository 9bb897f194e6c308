"""Attention sinks on a tiny character LM: window only vs sinks + window vs full cache.

    python examples/streaming/train.py           # 600 steps + evaluation, ~5 min on 2 CPU cores
    python examples/streaming/train.py --steps 30 --stream-len 512 --streams 2   # smoke, 20 s

A small decoder-only transformer (pre-norm blocks, attnkit.MultiHeadAttention with
RoPE) is trained with full causal attention on sequences of ``--seq-len`` characters of
the first 90% of Pride and Prejudice (examples/transformer_xl/). Then ``--streams``
stretches of ``--stream-len`` characters of the held-out last 10% (far longer than the
window and than the training length) are fed one character per call, with one cache per
layer of each kind:

* ``SinkCache(0, W)``: window only, positions inside the cache;
* ``SinkCache(S, W)``: S attention sinks (the stream's first characters) + window, as
  StreamingLLM (Xiao et al. 2023);
* ``KVCache()``: everything, so positions run past the trained length;
* ``SlidingWindowCache(W)`` + ``masks.sliding_window(W - 1, 0)``: window only at absolute
  positions (RoPE is relative, so this should equal the first up to rounding);

and, as the paper's reference, a sliding window recomputed from scratch for every
character (no cache: the oldest character of the window sees nothing before it).

It prints the mean next-character loss before the window fills, from the window to the
training length, past the training length, and overall; wall time per step; cache bytes
at the end; and the share of attention the first characters of a sequence receive in a
full causal forward (do sinks emerge at all?). It writes loss_vs_position.png.
"""

from __future__ import annotations

import argparse
import math
import os
import time

# idle OpenMP threads wait passively: spinning ones slow the many small kernels of a tiny
# model badly when other jobs share the cores (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import attnkit  # noqa: E402
from attnkit.positional import RotaryEmbedding  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "transformer_xl", "pride_and_prejudice.txt")


# ------------------------------------------------------------------------------ model

class Block(nn.Module):
    """Pre-norm decoder block: h + attn(LN(h)), then h + FFN(LN(h))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = attnkit.MultiHeadAttention(
            d_model, num_heads, positional=RotaryEmbedding(d_model // num_heads))
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, h, cache=None, attn_mask=None, need_weights=False):
        a, w = self.attn(self.ln_attn(h), cache=cache, attn_mask=attn_mask, is_causal=True,
                         need_weights=need_weights)
        h = h + a
        return h + self.ff(self.ln_ff(h)), w


class CharLM(nn.Module):
    def __init__(self, vocab: int, d_model=128, num_heads=4, num_layers=3, d_ff=384):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff) for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens, caches=None, attn_mask=None, need_weights=False):
        """tokens (B, n) -> (logits (B, n, vocab), per-layer weights or Nones). With
        ``caches`` (one per layer) the n tokens continue what the caches hold."""
        h, weights = self.embed(tokens), []
        for i, block in enumerate(self.blocks):
            h, w = block(h, None if caches is None else caches[i], attn_mask, need_weights)
            weights.append(w)
        return self.head(self.ln_out(h)), weights


# ------------------------------------------------------------------------------- data

def load_text(path=TEXT):
    """(train ids, held-out ids, vocabulary): the first 90% of the text and the rest."""
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * ids.numel())
    return ids[:split], ids[split:], chars


def held_out_streams(held, count: int, length: int) -> torch.Tensor:
    """(count, length + 1): non-overlapping stretches spread over the held-out text."""
    span = held.numel() - (length + 1)
    if span < 0 or count * (length + 1) > held.numel():
        raise ValueError(f"{count} streams of {length} characters do not fit in the "
                         f"{held.numel()} held-out characters")
    starts = [i * span // max(1, count - 1) for i in range(count)]
    return torch.stack([held[s:s + length + 1] for s in starts])


# ------------------------------------------------------------------------------ train

def train(model, ids, steps: int, batch=16, seq_len=256, lr=2e-3, seed=0, log=print):
    """Full causal attention on random windows of ``seq_len`` characters; returns losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        start = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        chunk = torch.stack([ids[s:s + seq_len + 1] for s in start.tolist()])
        logits, _ = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    model.eval()
    return losses


# --------------------------------------------------------------------------- evaluate

@torch.no_grad()
def stream(model, tokens, make_cache, attn_mask=None):
    """Feed ``tokens`` (B, N + 1) one character per call with one ``make_cache()`` per
    layer. Returns (losses (B, N) of each next character, seconds per call, cache bytes
    summed over layers after each call (N,))."""
    model.eval()
    caches = [make_cache() for _ in model.blocks]
    B, N = tokens.shape[0], tokens.shape[1] - 1
    losses, nbytes = torch.empty(B, N), []
    t0 = time.perf_counter()
    for t in range(N):
        logits, _ = model(tokens[:, t:t + 1], caches, attn_mask)
        losses[:, t] = F.cross_entropy(logits[:, 0], tokens[:, t + 1], reduction="none")
        nbytes.append(sum(c.nbytes for c in caches))
    return losses, (time.perf_counter() - t0) / N, nbytes


@torch.no_grad()
def recompute(model, tokens, window: int, chunk=256):
    """The paper's reference: each character predicted from the last ``window``
    characters alone, run from scratch (positions 0..window-1). Returns (losses (B, N),
    seconds per position)."""
    model.eval()
    B, N = tokens.shape[0], tokens.shape[1] - 1
    x, y = tokens[:, :-1], tokens[:, 1:]
    t0 = time.perf_counter()
    head = min(window, N)  # before the window fills: one causal forward over the prefix
    logits, _ = model(x[:, :head])
    out = [F.cross_entropy(logits.transpose(1, 2), y[:, :head], reduction="none")]
    if N > window:
        wins = x.unfold(1, window, 1)[:, 1:]  # (B, N - window, window): ends at window..N-1
        flat = wins.reshape(-1, window)
        last = torch.cat([model(flat[i:i + chunk])[0][:, -1] for i in range(0, len(flat), chunk)])
        out.append(F.cross_entropy(last, y[:, window:].reshape(-1),
                                   reduction="none").view(B, -1))
    return torch.cat(out, 1), (time.perf_counter() - t0) / N


@torch.no_grad()
def first_token_attention(model, tokens, first=4):
    """Share of attention weight the first ``first`` keys get in a full causal forward of
    ``tokens`` (B, T), from queries in the second half (T/2 .. T-1), per layer and head
    (L, H); with the share that keys ``first .. 2 first - 1`` (as old, ordinary text) get,
    and the share uniform attention would give, for comparison."""
    model.eval()
    T = tokens.shape[1]
    _, weights = model(tokens, need_weights=True)
    q = slice(T // 2, T)
    sink = torch.stack([w[:, :, q, :first].sum(-1).mean((0, 2)) for w in weights])
    next_ = torch.stack([w[:, :, q, first:2 * first].sum(-1).mean((0, 2)) for w in weights])
    uniform = (first / torch.arange(T // 2 + 1, T + 1, dtype=torch.float)).mean().item()
    return sink, next_, uniform


def regions(window: int, seq_len: int, n: int):
    """Named position ranges of a stream of n predictions."""
    cut = [("before W", 0, min(window, n)), ("W..T_train", window, min(seq_len, n)),
           ("past T_train", seq_len, n), ("all", 0, n)]
    return [(name, a, b) for name, a, b in cut if b > a]


def evaluate(model, tokens, window: int, sinks: int, seq_len: int, with_reference=True):
    """{name: dict(losses (B, N), sec per call, nbytes list)} for every cache kind."""
    kinds = {
        "window only": (lambda: attnkit.SinkCache(0, window), None),
        f"{sinks} sinks + window": (lambda: attnkit.SinkCache(sinks, window), None),
        "full cache": (attnkit.KVCache, None),
        "window, absolute pos.": (lambda: attnkit.cache.SlidingWindowCache(window),
                                  attnkit.masks.sliding_window(window - 1, 0)),
    }
    out = {}
    for name, (make, mask) in kinds.items():
        losses, sec, nbytes = stream(model, tokens, make, mask)
        out[name] = dict(losses=losses, sec=sec, nbytes=nbytes)
    if with_reference:
        losses, sec = recompute(model, tokens, window)
        out["recomputed window"] = dict(losses=losses, sec=sec, nbytes=[0])
    return out


def table(results, window: int, seq_len: int) -> str:
    n = next(iter(results.values()))["losses"].shape[1]
    cuts = regions(window, seq_len, n)
    head = f"{'':24s}" + "".join(f"{c:>12s}" for c, _, _ in cuts) + f"{'all':>10s}"
    sub = f"{'cache':24s}" + "".join(f"{f'[{a},{b})':>12s}" for _, a, b in cuts)
    sub += f"{'bits/char':>10s}{'ms/step':>9s}{'KiB end':>9s}"
    rows = [head, sub, "-" * len(sub)]
    for name, r in results.items():
        loss = r["losses"]
        cells = "".join(f"{loss[:, a:b].mean().item():12.4f}" for _, a, b in cuts)
        rows.append(f"{name:24s}{cells}{loss.mean().item() / math.log(2):10.3f}"
                    f"{1e3 * r['sec']:9.2f}{r['nbytes'][-1] / 1024:9.1f}")
    return "\n".join(rows)


def running_mean(x, k: int):
    """Mean of the last k values (fewer at the start) at each index of x (N,)."""
    run = torch.cumsum(torch.cat([torch.zeros(1), x]), 0)
    idx = torch.arange(1, x.numel() + 1)
    return (run[idx] - run[(idx - k).clamp(min=0)]) / idx.clamp(max=k)


def plot(results, window: int, seq_len: int, path: str, smooth=64):
    """Left: smoothed loss at each stream position; right: minus the window-only loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {"window only": ("tab:red", "-"), "full cache": ("tab:gray", "-"),
              "window, absolute pos.": ("tab:orange", ":"),
              "recomputed window": ("tab:blue", "--")}
    base = results["window only"]["losses"].mean(0)
    x = torch.arange(1, base.numel() + 1).numpy()
    for name, r in results.items():
        per_pos = r["losses"].mean(0)
        color, ls = styles.get(name, ("tab:green", "-"))
        a.plot(x, running_mean(per_pos, smooth).numpy(), color=color, ls=ls, lw=1.2, label=name)
        if name not in ("window only", "full cache"):
            b.plot(x, running_mean(per_pos - base, smooth).numpy(), color=color, ls=ls,
                   lw=1.2, label=name)
    for ax in (a, b):
        for pos, label in ((window, "W"), (seq_len, "T_train")):
            ax.axvline(pos, color="k", lw=0.6, alpha=0.5)
            ax.text(pos, 0.98, f" {label}", va="top", fontsize=8,
                    transform=ax.get_xaxis_transform())
        ax.set(xscale="log", xlabel="position in the stream (characters)")
        ax.legend(fontsize=8)
    a.set(ylabel=f"next-character loss, nats (running mean of {smooth})",
          title=f"held-out streams, one character per call (W = {window})")
    b.axhline(0, color="tab:red", lw=0.8)
    b.set(ylabel="minus the window-only loss, nats", title="difference from window only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256, help="training length T_train")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--window", type=int, default=64, help="cache window W")
    ap.add_argument("--sinks", type=int, default=4, help="attention sinks S")
    ap.add_argument("--stream-len", type=int, default=4096, help="characters per stream")
    ap.add_argument("--streams", type=int, default=4, help="held-out streams, one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--out", default=os.path.join(HERE, "loss_vs_position.png"))
    args = ap.parse_args(argv)
    if min(args.steps, args.batch, args.seq_len, args.window, args.stream_len,
           args.streams, args.layers) < 1 or args.sinks < 0:
        ap.error("sizes must be >= 1 (--sinks >= 0)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    train_ids, held, chars = load_text()
    model = CharLM(len(chars), num_layers=args.layers)
    print(f"{train_ids.numel()} training / {held.numel()} held-out characters, vocabulary "
          f"{len(chars)}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {args.layers} layers, {torch.get_num_threads()} threads")
    train(model, train_ids, args.steps, args.batch, args.seq_len, args.lr, args.seed)
    t_train = time.time() - t_start

    tokens = held_out_streams(held, args.streams, args.stream_len)
    print(f"\nstreaming {args.streams} held-out stretches of {args.stream_len} characters, "
          f"W = {args.window}, {args.sinks} sinks, T_train = {args.seq_len}; loss in nats/char")
    results = evaluate(model, tokens, args.window, args.sinks, args.seq_len)
    print(table(results, args.window, args.seq_len))
    w_only = results["window only"]["losses"]
    sink = results[f"{args.sinks} sinks + window"]["losses"]
    far = slice(min(4 * args.window, args.stream_len - 1), None)
    d = (sink[:, far] - w_only[:, far]).mean().item()
    per_stream = (sink[:, far] - w_only[:, far]).mean(1)
    print(f"\nsinks - window only, positions >= {far.start}: {d:+.4f} nats/char "
          f"({100 * d / w_only[:, far].mean().item():+.2f}%); per stream "
          + " ".join(f"{v:+.4f}" for v in per_stream.tolist()))
    diff = (results["window, absolute pos."]["losses"] - w_only).abs().max().item()
    print(f"window at absolute positions vs inside the cache: max |difference| {diff:.2e}")

    probe = held_out_streams(held, 16, args.seq_len)[:, :-1]
    share, ordinary, uniform = first_token_attention(model, probe, max(1, args.sinks))
    k = max(1, args.sinks)
    print(f"\nattention to the first {k} keys from queries {args.seq_len // 2}..{args.seq_len - 1}"
          f" of a full causal forward (16 held-out sequences of {args.seq_len}); uniform "
          f"attention would give {uniform:.3f}; keys {k}..{2 * k - 1} for comparison:")
    for i, (s, o) in enumerate(zip(share, ordinary)):
        print(f"  layer {i}: first {k} keys " + " ".join(f"{v:.3f}" for v in s.tolist())
              + f"   keys {k}..{2 * k - 1} " + " ".join(f"{v:.3f}" for v in o.tolist()))

    plot(results, args.window, args.seq_len, args.out)
    print(f"\nwrote {args.out}; training {t_train:.0f} s, {time.time() - t_start:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
