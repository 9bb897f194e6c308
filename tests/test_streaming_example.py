"""examples/streaming/train.py on a tiny budget: the caches agree while nothing has been
evicted, sink and window caches stay at constant memory, and sinks change the losses
once the window has filled."""

import importlib.util
import pathlib

import pytest
import torch

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "streaming" / "train.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("streaming_example", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(ex):
    torch.manual_seed(0)
    train_ids, held, chars = ex.load_text()
    model = ex.CharLM(len(chars), d_model=32, num_heads=2, num_layers=2, d_ff=64)
    losses = ex.train(model, train_ids, steps=8, batch=4, seq_len=32, lr=3e-3,
                      log=lambda *a: None)
    return model, held, losses


def test_training_lowers_the_loss(trained):
    _, _, losses = trained
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2


def test_every_cache_equals_the_full_one_before_the_window_fills(ex, trained):
    model, held, _ = trained
    tokens = ex.held_out_streams(held, 2, 12)
    results = ex.evaluate(model, tokens, window=16, sinks=2, seq_len=32)
    full = results["full cache"]["losses"]
    assert full.shape == (2, 12)
    for name, r in results.items():
        torch.testing.assert_close(r["losses"], full, atol=1e-5, rtol=1e-5, msg=name)


def test_sinks_change_the_loss_past_the_window_and_memory_stays_constant(ex, trained):
    model, held, _ = trained
    W, S, N = 8, 2, 40
    tokens = ex.held_out_streams(held, 2, N)
    r = ex.evaluate(model, tokens, window=W, sinks=S, seq_len=16)
    window, sinks = r["window only"]["losses"], r[f"{S} sinks + window"]["losses"]
    full = r["full cache"]["losses"]
    torch.testing.assert_close(window[:, :W], full[:, :W], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sinks[:, :W + S], full[:, :W + S], atol=1e-5, rtol=1e-5)
    assert (sinks[:, W + S:] - window[:, W + S:]).abs().max() > 1e-4
    assert (full[:, W + S:] - sinks[:, W + S:]).abs().max() > 1e-4
    # RoPE is relative: a window at absolute positions scores as one inside the cache
    torch.testing.assert_close(r["window, absolute pos."]["losses"], window,
                               atol=1e-4, rtol=1e-4)
    per_kv = 2 * 2 * model.blocks[0].attn.num_kv_heads * model.blocks[0].attn.head_dim * 4
    for name, kept in (("window only", W - 1), (f"{S} sinks + window", S + W - 1)):
        sizes = r[name]["nbytes"]
        assert set(sizes[kept:]) == {kept * per_kv * len(model.blocks)}, name
    grows = r["full cache"]["nbytes"]
    assert all(b - a == per_kv * len(model.blocks) for a, b in zip(grows, grows[1:]))


def test_first_token_attention_and_regions(ex, trained):
    model, held, _ = trained
    probe = ex.held_out_streams(held, 3, 32)[:, :-1]
    share, ordinary, uniform = ex.first_token_attention(model, probe, first=2)
    assert share.shape == ordinary.shape == (2, 2)
    assert ((share > 0) & (share < 1)).all()
    assert uniform == pytest.approx((2 / torch.arange(17, 33.)).mean().item())
    assert [name for name, _, _ in ex.regions(8, 16, 40)] == [
        "before W", "W..T_train", "past T_train", "all"]
    assert [name for name, _, _ in ex.regions(8, 16, 12)] == ["before W", "W..T_train", "all"]


def test_main_runs_end_to_end(ex, tmp_path, capsys):
    out = tmp_path / "plot.png"
    results = ex.main(["--steps", "2", "--seq-len", "32", "--window", "8", "--sinks", "2",
                       "--stream-len", "40", "--streams", "1", "--layers", "1",
                       "--out", str(out)])
    assert out.stat().st_size > 0
    assert set(results) == {"window only", "2 sinks + window", "full cache",
                            "window, absolute pos.", "recomputed window"}
    assert "past T_train" in capsys.readouterr().out
