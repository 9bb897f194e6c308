"""Section 2 of the tour: where attention came from. Three GRU encoder-decoders (no
attention, Bahdanau's additive, Luong's general) trained live on the same budget to
reverse sequences, accuracy per length, and the additive model's alignment."""

from __future__ import annotations

import torch

from .. import viz
from ..seq2seq import ReverseTask, run_experiment
from ..seq2seq.task import EOS
from .session import Tour
from .terminal import table

#: the tour's budget: 20-30 s for the three variants on one thread
TASK = ReverseTask(symbols=10, min_len=3, max_len=12)
STEPS, HIDDEN, BATCH = 200, 48, 64


def alignment_example(result, seed: int, length: int = 10):
    """(source tokens, output tokens, weights (T, S), mean weight on the source letter
    each output step should write) for one fresh sentence of ``length`` tokens: step t
    should write source letter ``length - 1 - t``; the EOS step is not counted."""
    g = torch.Generator().manual_seed(seed * 1000 + 2)
    src, n, tgt = TASK.batch(1, g, (length, length))
    out, w = result.model.generate(src, n, tgt.shape[1])
    eos = (out[0] == EOS).nonzero()
    steps = int(eos[0]) + 1 if len(eos) else out.shape[1]
    w = w[0, :steps]
    letters = min(steps - (1 if len(eos) else 0), length)  # output steps that write a letter
    share = float(w[torch.arange(letters), length - 1 - torch.arange(letters)].mean())
    return src[0], out[0, :steps], w, share


def words(tour: Tour, results) -> dict:
    """The section's claims, computed from its numbers: each trend sentence says what
    the measured accuracies show, whatever the seed."""
    buckets = list(results[0].accuracy)
    first, last = buckets[0], buckets[-1]
    bottleneck, attended = results[0], results[1:]
    a0, a1 = bottleneck.accuracy[first], bottleneck.accuracy[last]
    span = dict(a0=a0, a1=a1, b0=_b(first), b1=_b(last))
    if a0 < 0.2:
        plain = tour.t("s2s_untrained", **span)
    elif a1 <= a0 / 2:
        plain = tour.t("s2s_falls", **span)
    else:
        plain = tour.t("s2s_not_falls", **span)
    lines = []
    for r in attended:
        low = min(r.accuracy.values())
        gain = (r.accuracy[last] - a1) * 100
        lines.append(tour.t("s2s_holds" if low >= 0.6 else "s2s_weak", name=r.label, low=low,
                            last=r.accuracy[last], b1=_b(last), gain=abs(gain),
                            side=tour.t("s2s_over" if gain >= 0 else "s2s_below")))
    return {"plain": plain, "attended": "\n".join(lines)}


def _b(bucket) -> str:
    return f"{bucket[0]}-{bucket[1]}"


def section_seq2seq(tour: Tour) -> None:
    """Train the three variants, print accuracy per length, draw it and the alignment."""
    tour.say("s2s_intro", steps=STEPS, batch=BATCH, hidden=HIDDEN, lo=TASK.min_len,
             hi=TASK.max_len, v=TASK.symbols)
    results = run_experiment(TASK, steps=STEPS, seed=tour.seed, hidden=HIDDEN, batch=BATCH)
    for r in results:
        r.label = tour.t(f"s2s_label_{r.attention}")
    buckets = list(results[0].accuracy)
    rows = [[r.label] + [f"{r.accuracy[b]:.2f}" for b in buckets]
            + [f"{sum(r.losses[-20:]) / 20:.3f}", f"{r.seconds:.1f} s"] for r in results]
    tour.show(table([tour.t("s2s_variant")] + [tour.t("s2s_bucket", b=_b(b)) for b in buckets]
                    + [tour.t("s2s_loss"), tour.t("s2s_time")], rows))
    said = words(tour, results)
    tour.say("s2s_result", plain=said["plain"], attended=said["attended"])
    additive = next(r for r in results if r.attention == "additive")
    src, out, w, share = alignment_example(additive, tour.seed)
    tour.say("s2s_alignment", n=len(src), share=share, uniform=1 / len(src))
    tour.say("s2s_outro")

    fig = viz.new_figure(11.5, 4.4)
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    centres = [(lo + hi) / 2 for lo, hi in buckets]
    for r, marker in zip(results, "osD"):
        a.plot(centres, [r.accuracy[k] for k in buckets], marker + "-", label=r.label)
    a.set_xticks(centres, [_b(k) for k in buckets])
    a.set_ylim(-0.03, 1.05)
    a.set_xlabel(tour.t("fig_s2s_length"))
    a.set_ylabel(tour.t("fig_s2s_accuracy"))
    a.set_title(tour.t("fig_s2s_title1", steps=STEPS))
    a.legend()
    a.grid(alpha=0.3)
    letters = [chr(ord("a") + int(t) - 3) for t in src]
    outs = [chr(ord("a") + int(t) - 3) if int(t) >= 3 else "</s>" for t in out]
    viz.heatmap(b, w, outs, letters, title=tour.t("fig_s2s_title2"), vmin=0, vmax=1,
                annotate=False, xlabel=tour.t("fig_s2s_source"),
                ylabel=tour.t("fig_s2s_output"), cbar_label=tour.t("fig_weight"))
    tour.picture(fig, "02_seq2seq.png")
