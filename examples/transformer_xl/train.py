"""A tiny Transformer-XL character language model on Pride and Prejudice (chapters 1-33).

    python examples/transformer_xl/train.py                 # 300 steps, a few minutes on CPU
    python examples/transformer_xl/train.py --steps 50      # a quick look

Segment-level recurrence (Dai et al. 2019, section 3.2): the text is cut into segments
of ``--seg-len`` characters; every layer keeps the hidden states of the last ``--mem-len``
characters it saw as memory, and attends to [memory ; segment] with relative positions,
so context flows across segment boundaries without gradients flowing back into it.

The run trains on the first 90% of the text, then evaluates the held-out 10% twice with
the same weights: carrying memory from segment to segment, and with every segment on its
own (no memory). It prints both losses and writes a plot of the training loss and of the
held-out loss at each position of a segment.
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

from attnkit.layers.transformer_xl import TransformerXLAttention  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "pride_and_prejudice.txt")


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(LN(h), LN(mem)), then h + FFN(LN(h))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = TransformerXLAttention(d_model, num_heads, d_model // num_heads)
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, mem):
        mem = None if mem is None else self.ln_attn(mem)
        h = h + self.drop(self.attn(self.ln_attn(h), mem))
        return h + self.drop(self.ff(self.ln_ff(h)))


class TransformerXLLM(nn.Module):
    def __init__(self, vocab: int, d_model=128, num_heads=4, num_layers=3, d_ff=384,
                 dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff, dropout)
                                    for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens, mems=None, mem_len=0):
        """tokens (B, L) -> (logits (B, L, vocab), new mems: one (B, <=mem_len, d) per layer).

        Layer n's memory holds the inputs of layer n (h^(n-1)) for the last mem_len tokens,
        detached: the next segment reads it but sends no gradient into it."""
        h = self.embed(tokens)
        new_mems = []
        for n, block in enumerate(self.blocks):
            mem = None if mems is None else mems[n]
            if mem_len > 0:
                seen = h if mem is None else torch.cat([mem, h], 1)
                new_mems.append(seen[:, -mem_len:].detach())
            h = block(h, mem)
        return self.head(self.ln_out(h)), (new_mems if mem_len > 0 else None)


def streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Cut one long sequence into ``batch`` contiguous streams (batch, T): row b continues
    from one segment to the next, which is what lets memory carry context."""
    T = ids.numel() // batch
    return ids[:batch * T].view(batch, T)


@torch.no_grad()
def evaluate(model, data, seg_len, mem_len):
    """Mean loss per character over ``data`` (B, T), segment after segment, and the mean
    loss at each position of a segment (seg_len,)."""
    model.eval()
    mems, total, count = None, 0.0, 0
    per_pos = torch.zeros(seg_len)
    n_seg = 0
    for s in range(0, data.shape[1] - 1 - seg_len + 1, seg_len):
        x, y = data[:, s:s + seg_len], data[:, s + 1:s + 1 + seg_len]
        logits, mems = model(x, mems if mem_len else None, mem_len)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, L)
        total += loss.sum().item()
        count += loss.numel()
        per_pos += loss.mean(0)
        n_seg += 1
    model.train()
    return total / count, per_pos / n_seg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seg-len", type=int, default=48, help="segment length L")
    ap.add_argument("--mem-len", type=int, default=48, help="memory length M")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    ap.add_argument("--out", default=os.path.join(HERE, "loss.png"), help="plot file")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seg_len < 1 or args.mem_len < 0 or args.batch < 1:
        ap.error("--steps, --batch and --seg-len must be >= 1 and --mem-len >= 0")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = open(TEXT, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * ids.numel())
    train, held_out = streams(ids[:split], args.batch), streams(ids[split:], 8)
    print(f"{len(text)} characters, vocabulary {len(chars)}; train streams "
          f"{tuple(train.shape)}, held-out streams {tuple(held_out.shape)}")

    model = TransformerXLLM(len(chars))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"segment {args.seg_len}, memory {args.mem_len}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    losses, mems, pos = [], None, 0
    t0 = time.time()
    for step in range(args.steps):
        if pos + args.seg_len + 1 > train.shape[1]:  # one pass over the text: start again
            pos, mems = 0, None
        x = train[:, pos:pos + args.seg_len]
        y = train[:, pos + 1:pos + 1 + args.seg_len]
        pos += args.seg_len
        logits, mems = model(x, mems, args.mem_len)
        loss = F.cross_entropy(logits.transpose(1, 2), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")

    with_mem, pos_with = evaluate(model, held_out, args.seg_len, args.mem_len)
    without, pos_without = evaluate(model, held_out, args.seg_len, 0)
    ln2 = math.log(2)
    print(f"held-out loss with memory    (M={args.mem_len}): {with_mem:.4f} nats/char "
          f"({with_mem / ln2:.3f} bits/char)")
    print(f"held-out loss without memory (M=0):  {without:.4f} nats/char "
          f"({without / ln2:.3f} bits/char)")
    gain = without - with_mem
    verb = "lowers" if gain > 0 else "raises" if gain < 0 else "does not change"
    print(f"memory {verb} the held-out loss" + (f" by {abs(gain):.4f} nats/char "
          f"({100 * abs(gain) / without:.1f}%)" if gain else "") + "; at the first position "
          f"of a segment: {pos_without[0]:.3f} without vs {pos_with[0]:.3f} with memory")
    if args.steps < 200 and gain <= 0:
        print(f"({args.steps} steps are a quick look, likely too few for the model to learn to "
              f"use its memory; the README's figures are from 300 steps)")
    plot(losses, pos_with, pos_without, with_mem, without, args)
    print(f"wrote {args.out}  ({time.time() - t0:.0f} s in all)")
    return with_mem, without


def plot(losses, pos_with, pos_without, with_mem, without, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(losses, lw=0.8, color="tab:gray", label="per step")
    k = max(1, len(losses) // 30)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1])
              for i in range(len(losses))]
    a.plot(smooth, color="tab:blue", label=f"running mean ({k} steps)")
    a.set(title="training loss (with memory)", xlabel="step", ylabel="nats / character")
    a.legend()
    b.plot(range(1, args.seg_len + 1), pos_without.numpy(), color="tab:red",
           label=f"without memory: mean {without:.3f}")
    b.plot(range(1, args.seg_len + 1), pos_with.numpy(), color="tab:green",
           label=f"with memory (M={args.mem_len}): mean {with_mem:.3f}")
    b.set(title="held-out loss at each position of a segment", xlabel="position in segment",
          ylabel="nats / character")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
