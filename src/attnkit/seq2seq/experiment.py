"""Train the encoder-decoder variants on the same budget and measure accuracy against
length: the experiment behind "attention fixes the bottleneck".

Every variant gets the same seed (so the same training batches, in the same order), the
same sizes and the same number of Adam steps; each is evaluated on sentences its
training never drew, exact match (every output token right), per bucket of source
lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import Seq2Seq
from .task import PAD, ReverseTask

__all__ = ["VARIANTS", "Result", "train_variant", "run_experiment", "buckets_of"]

#: the variants compared: the label and the decoder's attention
VARIANTS = (("no attention", None), ("additive", "additive"), ("general", "general"))


@dataclass
class Result:
    label: str
    attention: str | None
    accuracy: dict            # bucket (lo, hi) -> exact-match accuracy
    losses: list              # training loss, every step
    seconds: float
    model: Seq2Seq = field(repr=False)


def buckets_of(task: ReverseTask, count: int = 4) -> list[tuple[int, int]]:
    """``count`` ranges of source lengths covering the task's, as equal as integers
    allow (the last ones one longer when the range does not divide)."""
    lo, hi = task.min_len, task.max_len
    size, extra = divmod(hi - lo + 1, count)
    if size == 0:
        raise ValueError(f"cannot split lengths {lo}..{hi} into {count} buckets")
    out, start = [], lo
    for i in range(count):
        end = start + size + (1 if i >= count - extra else 0) - 1
        out.append((start, end))
        start = end + 1
    return out


def _unseen(task: ReverseTask, seen: set, size: int, g: torch.Generator, lengths):
    """``size`` sentences of ``lengths`` that training never drew (fewer if the range
    holds fewer): (source, lengths, target)."""
    keep_src, keep_n = [], []
    for _ in range(20):
        src, n, _ = task.batch(4 * size, g, lengths)
        for row in range(src.shape[0]):
            key = tuple(src[row, :int(n[row])].tolist())
            if key not in seen:
                seen.add(key)  # and no sentence twice in one evaluation
                keep_src.append(src[row, :int(n[row])])
                keep_n.append(int(n[row]))
            if len(keep_src) == size:
                break
        if len(keep_src) == size:
            break
    n = torch.tensor(keep_n)
    src = torch.nn.utils.rnn.pad_sequence(keep_src, batch_first=True, padding_value=PAD)
    return src, n, task.targets(src, n)


def train_variant(task: ReverseTask, attention: str | None, *, steps: int, batch: int = 64,
                  hidden: int = 64, embed_dim: int = 32, lr: float = 3e-3, seed: int = 0,
                  label: str | None = None, eval_size: int = 200, buckets=None) -> Result:
    """Train one variant for ``steps`` Adam steps on fresh batches; evaluate on up to
    ``eval_size`` sentences per bucket that training never saw (short lengths have few
    distinct sentences: 10^3 of length 3). Seeds torch's generator inside a fork, so
    the caller's random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Seq2Seq(task.vocab_size, attention, embed_dim=embed_dim, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    g = torch.Generator().manual_seed(seed)
    losses, seen = [], set()
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        src, n, tgt = task.batch(batch, g)
        seen.update(tuple(row[:k].tolist()) for row, k in zip(src, n.tolist()))
        logits = model(src, n, tgt)
        loss = loss_fn(logits.flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = {}
    for lo, hi in buckets or buckets_of(task):
        held_out = torch.Generator().manual_seed(10_000 + lo)  # the same for every variant
        src, n, tgt = _unseen(task, seen, eval_size, held_out, (lo, hi))
        out, _ = model.generate(src, n, tgt.shape[1])
        accuracy[(lo, hi)] = float(task.exact_match(out, tgt).float().mean())
    return Result(label or str(attention), attention, accuracy, losses, seconds, model)


def run_experiment(task: ReverseTask | None = None, *, steps: int = 400, seed: int = 0,
                   variants=VARIANTS, **kwargs) -> list[Result]:
    """Every variant on the same task, budget and seed."""
    task = task or ReverseTask()
    return [train_variant(task, attention, steps=steps, seed=seed, label=label, **kwargs)
            for label, attention in variants]
