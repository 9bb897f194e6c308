"""Train the encoder-decoder variants on the same budget and measure accuracy against
length: the experiment behind "attention fixes the bottleneck".

Every variant gets the same seed (so the same training batches, in the same order), the
same sizes and the same number of Adam steps; each is evaluated on the same held-out
sentences, exact match (every output token right), per bucket of source lengths.
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
    """``count`` equal-width ranges of source lengths covering the task's."""
    lo, hi = task.min_len, task.max_len
    width = (hi - lo + 1) / count
    edges = [lo + round(i * width) for i in range(count + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(count)]


def train_variant(task: ReverseTask, attention: str | None, *, steps: int, batch: int = 64,
                  hidden: int = 64, embed_dim: int = 32, lr: float = 3e-3, seed: int = 0,
                  label: str | None = None, eval_size: int = 200, buckets=None) -> Result:
    """Train one variant for ``steps`` Adam steps on fresh batches; evaluate on
    ``eval_size`` held-out sentences per bucket."""
    torch.manual_seed(seed)
    model = Seq2Seq(task.vocab_size, attention, embed_dim=embed_dim, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    g = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        src, n, tgt = task.batch(batch, g)
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
        src, n, tgt = task.batch(eval_size, held_out, (lo, hi))
        out, _ = model.generate(src, n, tgt.shape[1])
        accuracy[(lo, hi)] = float(task.exact_match(out, tgt).float().mean())
    return Result(label or str(attention), attention, accuracy, losses, seconds, model)


def run_experiment(task: ReverseTask | None = None, *, steps: int = 400, seed: int = 0,
                   variants=VARIANTS, **kwargs) -> list[Result]:
    """Every variant on the same task, budget and seed."""
    task = task or ReverseTask()
    return [train_variant(task, attention, steps=steps, seed=seed, label=label, **kwargs)
            for label, attention in variants]
