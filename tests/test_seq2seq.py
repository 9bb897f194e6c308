"""The RNN encoder-decoder experiment: the reversal task's data, the model's two modes
(teacher forcing, greedy decoding), the pipeline on a tiny budget (it trains and
reports every bucket), and the tour section's sentences, which must say what its
numbers show for every seed."""

import re

import pytest
import torch

from attnkit.seq2seq import ReverseTask, Seq2Seq, run_experiment, train_variant
from attnkit.seq2seq.experiment import buckets_of
from attnkit.seq2seq.task import BOS, EOS, PAD
from attnkit.tour import seq2seq as section
from attnkit.tour.session import Tour


def test_reverse_task_batches():
    task = ReverseTask(symbols=5, min_len=2, max_len=6)
    src, n, tgt = task.batch(50, torch.Generator().manual_seed(0))
    assert src.shape == (50, int(n.max())) and tgt.shape == (50, int(n.max()) + 1)
    for row in range(50):
        k = int(n[row])
        assert torch.equal(tgt[row, :k], src[row, :k].flip(0))
        assert tgt[row, k] == EOS and (tgt[row, k + 1:] == PAD).all() and (src[row, k:] == PAD).all()
        assert ((src[row, :k] >= 3) & (src[row, :k] < 8)).all()
    wrong = tgt.clone()
    wrong[0, 0] = (wrong[0, 0] - 2) % 5 + 3
    assert task.exact_match(tgt, tgt).all() and not task.exact_match(wrong, tgt)[0]
    assert buckets_of(ReverseTask(min_len=3, max_len=12)) == [(3, 4), (5, 6), (7, 9), (10, 12)]
    assert buckets_of(ReverseTask(min_len=4, max_len=16)) == [(4, 6), (7, 9), (10, 12), (13, 16)]
    with pytest.raises(ValueError, match="cannot split"):
        buckets_of(ReverseTask(min_len=3, max_len=4))
    with pytest.raises(ValueError, match="min_len"):
        ReverseTask(min_len=5, max_len=4)


@pytest.mark.parametrize("attention", [None, "additive", "general"])
def test_model_teacher_forcing_and_greedy_decoding(attention):
    task = ReverseTask(symbols=5, max_len=6)
    torch.manual_seed(0)
    model = Seq2Seq(task.vocab_size, attention, hidden=16, embed_dim=8).eval()
    src, n, tgt = task.batch(4, torch.Generator().manual_seed(1))
    logits = model(src, n, tgt)
    assert logits.shape == (4, tgt.shape[1], task.vocab_size)
    out, w = model.generate(src, n, 9)
    assert out.shape == (4, 9)
    if attention is None:
        assert w is None
    else:  # one distribution over the real source tokens per step
        assert w.shape == (4, 9, src.shape[1])
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 9))
        assert (w.masked_select((src == PAD)[:, None, :].expand_as(w)) == 0).all()
    # greedy decoding is teacher forcing fed its own tokens, up to each sentence's EOS
    forced = model(src, n, out).argmax(-1)
    for row in range(4):
        eos = (out[row] == EOS).nonzero()
        end = int(eos[0]) + 1 if len(eos) else out.shape[1]
        assert torch.equal(forced[row, :end], out[row, :end])


def test_dot_needs_a_unidirectional_encoder():
    with pytest.raises(ValueError, match="bidirectional=False"):
        Seq2Seq(10, "dot")
    model = Seq2Seq(13, "dot", bidirectional=False, hidden=8, embed_dim=4)
    src, n, tgt = ReverseTask().batch(2, torch.Generator().manual_seed(0))
    assert model(src, n, tgt).shape[:2] == tgt.shape
    with pytest.raises(ValueError, match="attention must be one of"):
        Seq2Seq(10, "cosine")


def test_the_pipeline_trains_and_reports_every_bucket():
    task = ReverseTask(symbols=5, min_len=2, max_len=9)
    r = train_variant(task, "additive", steps=3, batch=8, hidden=8, embed_dim=4, eval_size=10)
    assert list(r.accuracy) == buckets_of(task) and len(r.losses) == 3
    assert all(0 <= a <= 1 for a in r.accuracy.values()) and r.seconds > 0
    assert all(l == l and l > 0 for l in r.losses)  # finite, positive cross-entropies
    # the same seed gives the same batches, so the same first loss for the same model
    again = train_variant(task, "additive", steps=1, batch=8, hidden=8, embed_dim=4,
                          eval_size=10)
    assert again.losses[0] == r.losses[0]


def _tour(lang="en"):
    return Tour(lang, None, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sections_sentences_follow_its_numbers(seed):
    """Trained briefly, the sentences state the table's own accuracies in both languages
    (the choice of words is checked on fabricated numbers below)."""
    task = section.TASK
    results = run_experiment(task, steps=15, seed=seed, hidden=16, batch=16, eval_size=40)
    for lang in ("en", "zh"):
        tour = _tour(lang)
        said = section.words(tour, results)
        buckets = list(results[0].accuracy)
        a0, a1 = (results[0].accuracy[buckets[k]] for k in (0, -1))
        key = ("s2s_untrained" if a0 < 0.2 else "s2s_falls" if a1 <= a0 / 2
               else "s2s_not_falls")
        span = dict(b0=f"{buckets[0][0]}-{buckets[0][1]}", b1=f"{buckets[-1][0]}-{buckets[-1][1]}")
        assert said["plain"] == tour.t(key, a0=a0, a1=a1, **span)
        got = [int(x) for x in re.findall(r"(\d+)%", said["plain"])]
        assert sorted(got) == sorted([round(a0 * 100), round(a1 * 100)])
        for r in results[1:]:
            low = min(r.accuracy.values())
            assert f"{low:.0%}" in said["attended"]
            assert f"{r.accuracy[buckets[-1]]:.0%}" in said["attended"]
            gain = (r.accuracy[buckets[-1]] - a1) * 100
            side = tour.t("s2s_over" if gain >= 0 else "s2s_below")
            assert (tour.t("s2s_holds", name=r.label, low=low, last=r.accuracy[buckets[-1]],
                           b1=span["b1"], gain=abs(gain), side=side)
                    in said["attended"]) == (low >= 0.6)


def test_fabricated_numbers_choose_the_words():
    """A bottleneck that does not fall, and attention that stays low, are said so."""
    class R:
        def __init__(self, label, acc):
            self.label, self.accuracy = label, acc
    b = [(3, 4), (5, 7), (8, 10), (11, 12)]
    flat = [R("none", dict(zip(b, [0.5, 0.5, 0.45, 0.4]))),
            R("additive", dict(zip(b, [0.9, 0.5, 0.3, 0.2])))]
    said = section.words(_tour(), flat)
    assert "does not show as a fall" in said["plain"] and "reaches only 20%" in said["attended"]
    assert "20 points below no attention" in said["attended"]
    said = section.words(_tour(), [R("none", dict(zip(b, [0.15, 0.1, 0.0, 0.0]))), flat[1]])
    assert "learned too little" in said["plain"]
    steep = [R("none", dict(zip(b, [0.9, 0.5, 0.1, 0.0]))),
             R("additive", dict(zip(b, [1.0, 0.9, 0.8, 0.7])))]
    said = section.words(_tour(), steep)
    assert "falls from 90% on 3-4 letters to 0% on 11-12" in said["plain"]
    assert "stays at 70% or more" in said["attended"] and "70 points over" in said["attended"]
