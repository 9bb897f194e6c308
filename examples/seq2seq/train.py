"""The bottleneck, measured: GRU encoder-decoders with no attention, additive
(Bahdanau) and general (Luong) attention, trained on the same budget to reverse
sequences, then evaluated by exact match per source length.

    python examples/seq2seq/train.py                 # 1500 steps each, lengths 4-16
    python examples/seq2seq/train.py --steps 200     # a quick look
    python examples/seq2seq/train.py --threads 2

Writes accuracy.png (git-ignored) beside this script: accuracy against length, one line
per variant. The tour (`attnkit tour`, section 2) runs the same experiment on a
smaller budget.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attnkit.seq2seq import ReverseTask, run_experiment


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="Adam steps per variant")
    p.add_argument("--hidden", type=int, default=64, help="decoder state width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=16, help="longest source (4x the shortest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest "
                   "for these small steps on 2 cores)")
    p.add_argument("--out", default=str(Path(__file__).with_name("accuracy.png")))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = ReverseTask(symbols=10, min_len=args.min_len, max_len=args.max_len)
    start = time.perf_counter()
    results = run_experiment(task, steps=args.steps, seed=args.seed, hidden=args.hidden,
                             batch=args.batch, eval_size=500)
    buckets = list(results[0].accuracy)
    head = "".join(f"{f'len {lo}-{hi}':>11}" for lo, hi in buckets)
    print(f"reverse {args.min_len}-{args.max_len} letters, {args.steps} steps of {args.batch}, "
          f"hidden {args.hidden}, seed {args.seed}: exact match on up to 500 sentences per "
          f"bucket that training never drew")
    print(f"{'decoder':<14}{head}  final loss  train s")
    for r in results:
        cells = "".join(f"{r.accuracy[b]:>11.3f}" for b in buckets)
        print(f"{r.label:<14}{cells}  {sum(r.losses[-50:]) / 50:>10.3f}  {r.seconds:>7.1f}")
    print(f"total {time.perf_counter() - start:.0f} s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    centres = [(lo + hi) / 2 for lo, hi in buckets]
    for r, marker in zip(results, "osD"):
        ax.plot(centres, [r.accuracy[b] for b in buckets], marker + "-", label=r.label)
    ax.set_xticks(centres, [f"{lo}-{hi}" for lo, hi in buckets])
    ax.set(xlabel="source length", ylabel="exact-match accuracy", ylim=(-0.03, 1.05),
           title=f"Reversing sequences, {args.steps} steps each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
