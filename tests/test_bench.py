"""attnkit bench: the smoke run end to end, and the pieces its figures rest on.

No timing assertions: the machine is shared. What is checked is that every case is
reported, that every figure is there and consistent, and that the instruments themselves
(allowed-entry counting, peak-memory measurement, target checks) are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attnkit.masks as M
from attnkit.bench import cases as bench_cases
from attnkit.bench.cases import CASES
from attnkit.bench.measurement import (Allocator, PeakRSS, Sample, interleave, peak_live_bytes,
                                       warm_up)
from attnkit.bench.spec import Variant, count_allowed, missing_optional
from attnkit.bench.targets import Target, evaluate, format_value
from attnkit.bench.worker import load_cases

MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _attnkit_command() -> list[str]:
    """The installed console script (what a user runs), else the same entry point."""
    script = Path(sys.executable).with_name("attnkit")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from attnkit.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(_attnkit_command() + ["bench", "--quick", "--json", str(json_path),
                                                "--plot", str(png_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    return proc, json_path, png_path


def test_quick_run_exits_cleanly_and_prints_a_table(quick_run):
    proc, _, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "median ms" in proc.stdout and "GFLOP/s" in proc.stdout
    for case in CASES:
        assert f"== {case.name}:" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_quick_run_says_what_it_measures_and_sums_up_what_it_does_not(quick_run):
    """A new user's first bench: the header says why it runs on one thread and where
    sparse patterns start to pay; the sparse cases run at 512 and 2048, so the table
    itself shows the trend; the targets it cannot measure at its sizes are one line."""
    proc, json_path, _ = quick_run
    assert "--quick times everything on 1 torch thread" in proc.stdout
    assert "the gain over the dense peers starts with length" in proc.stdout
    report = json.loads(json_path.read_text())
    lengths = {c["name"]: c["lengths"] for c in report["cases"]}
    for name in ("sliding_window", "longformer", "bigbird", "alibi"):
        assert lengths[name] == [512, 2048], name
    targets = proc.stdout.split("== targets from the issues")[1]
    assert "n/a" not in targets
    assert sum("more targets, at n =" in line for line in targets.splitlines()) == 1


def test_quick_json_describes_the_machine(quick_run):
    _, json_path, _ = quick_run
    report = json.loads(json_path.read_text())
    assert report["mode"] == "quick"
    m = report["machine"]
    for key in ("cpu_model", "cores", "torch_version", "torch_threads", "memory_method"):
        assert m[key], key
    assert m["torch_version"] == torch.__version__
    assert report["gemm_peak_gflops"] > 0


def test_quick_json_has_every_case_with_sane_figures(quick_run):
    _, json_path, _ = quick_run
    report = json.loads(json_path.read_text())
    by_name = {c["name"]: c for c in report["cases"]}
    assert set(by_name) == {c.name for c in CASES}
    peak = report["gemm_peak_gflops"]
    for case in CASES:
        entry = by_name[case.name]
        assert not entry.get("skipped"), f"{case.name}: {entry.get('skipped')}"
        rows = entry["results"]
        assert rows, case.name
        mine = [r for r in rows if r["role"] == "attnkit"]
        # only an optional package that is not installed may keep attnkit from a case
        assert any(r["status"] == "ok" for r in mine) or all(
            r.get("missing_package") for r in mine), case.name
        assert any(r["status"] == "ok" and r["role"] == "peer" for r in rows), case.name
        ok_peers = {r["variant"] for r in rows if r["status"] == "ok" and r["role"] == "peer"}
        for r in rows:
            where = f"{case.name} n={r['n']} {r['variant']}"
            assert r["status"] in ("ok", "skipped"), f"{where}: {r.get('note')}"
            if r["status"] == "skipped":
                assert r["note"], where
                continue
            assert 0 <= r["cpu_min_s"] <= r["cpu_median_s"], where
            assert 0 < r["min_s"] <= r["median_s"], where
            assert r["repeats"] >= 2 and len(r["times_s"]) == r["repeats"], where
            assert r["setup_bytes"] >= 0 and r["peak_bytes"] >= 0, where
            assert r["mem_bytes"] >= 0, where
            bound = case.batch * case.heads * r["n"] * (1 if case.kind == "decode" else r["n"])
            assert 0 < r["entries"] <= bound, where
            factor = 12 if case.kind == "train" else 4
            assert r["useful_flops"] == factor * 64 * r["entries"], where
            assert r["useful_gflops"] == pytest.approx(r["useful_flops"] / r["median_s"] / 1e9)
            assert r["peak_share"] == pytest.approx(r["useful_gflops"] / peak)
            if case.kind == "decode":
                assert r["cache_bytes"] > 0 and r["cache_bytes_per_token"] > 0, where
            if r["role"] == "attnkit":
                assert set(r["speedup_vs"]) == set(r["speedup_vs_min"]) == ok_peers, where
                for peer, x in r["speedup_vs"].items():
                    other = next(p for p in rows if p["variant"] == peer and p["n"] == r["n"])
                    assert x == pytest.approx(other["median_s"] / r["median_s"]), where


def test_quick_json_kv_cache_bytes_follow_the_kv_heads(quick_run):
    _, json_path, _ = quick_run
    report = json.loads(json_path.read_text())
    per_token = {}
    for c in report["cases"]:
        for r in c["results"]:
            if c["name"] in ("decode_mha", "decode_gqa", "decode_mqa") and r["role"] == "attnkit":
                per_token[c["name"]] = r["cache_bytes_per_token"]
    # keys + values, float32, head_dim 64: 2 * Hkv * 64 * 4 bytes per token
    assert per_token == {"decode_mha": 4096, "decode_gqa": 1024, "decode_mqa": 512}


def test_quick_plot_is_a_png_with_content(quick_run):
    _, _, png_path = quick_run
    data = png_path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png_path))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank canvas


def test_bad_plot_path_is_a_one_line_error_with_exit_code_2(tmp_path):
    proc = subprocess.run(_attnkit_command() + ["bench", "--quick", "--plot",
                                                str(tmp_path / "figure.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and ".png" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- scripts

SCRIPT = '''"""A tiny focused benchmark.

    python tiny_bench.py --quick
"""
from attnkit.bench import script
from attnkit.bench.builders import plain_setup
from attnkit.bench.cases import CHUNKED, SDPA_CAUSAL
from attnkit.bench.spec import Case
from attnkit.bench.targets import Target

CASES = (Case("tiny", "causal, n=64", plain_setup(causal=True), causal=True, lengths=(64,),
              quick_lengths=(64,), variants=(CHUNKED, SDPA_CAUSAL)),)
TARGETS = (Target(0, "tiny", 64, "attnkit chunked", "growth_mib", 1 << 20),)
LOADED = True

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__, cpu_time=True))
'''


def test_a_script_is_a_case_list_run_by_the_shared_worker(tmp_path):
    path = tmp_path / "tiny_bench.py"
    path.write_text(SCRIPT)
    json_path = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(path), "--quick", "--repeats", "2", "--profile",
                           "--json", str(json_path)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== tiny:" in proc.stdout and "cpu " in proc.stdout
    assert "== profile: tiny n=64 attnkit chunked" in proc.stdout
    report = json.loads(json_path.read_text())
    rows = report["cases"][0]["results"]
    assert {r["variant"] for r in rows} == {"attnkit chunked", "torch sdpa"}
    assert all(r["status"] == "ok" and r["repeats"] == 2 for r in rows)
    assert [t["status"] for t in report["targets"]] == ["met"]
    assert report["command"].endswith("tiny_bench.py --quick --repeats 2 --profile --json "
                                      + str(json_path))
    bad = subprocess.run([sys.executable, str(path), "--quick", "--cases", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown cases: nope" in bad.stderr


HALF_SCRIPT = '''"""A bfloat16 run of a causal case and a decoding case."""
from dataclasses import replace
from attnkit.bench import script
from attnkit.bench.builders import plain_setup
from attnkit.bench.cases import CHUNKED, SDPA_CAUSAL, case_by_name
from attnkit.bench.spec import Case
from attnkit.bench.targets import Target

CASES = (Case("tiny", "causal, n=64", plain_setup(causal=True), causal=True, lengths=(64,),
              quick_lengths=(64,), variants=(CHUNKED, SDPA_CAUSAL)),
         replace(case_by_name("decode_gqa"), lengths=(256,), quick_lengths=(256,)))
TARGETS = (Target(0, "tiny", 64, "attnkit chunked", "growth_mib", 1 << 20, dtype="bfloat16"),
           Target(0, "tiny", 64, "attnkit chunked", "gflops", 1e9))

if __name__ == "__main__":
    raise SystemExit(script.main(__file__, CASES, TARGETS, doc=__doc__))
'''


def test_a_bfloat16_run_measures_in_bfloat16_against_its_own_peak(tmp_path):
    """``--dtype bfloat16``: the inputs and peers run in bf16, the GEMM peak is bf16's,
    only the bf16 targets are checked, and decoding reports its cache read bandwidth."""
    path = tmp_path / "half_bench.py"
    path.write_text(HALF_SCRIPT)
    json_path = tmp_path / "half.json"
    proc = subprocess.run([sys.executable, str(path), "--quick", "--repeats", "2", "--dtype",
                           "bfloat16", "--json", str(json_path)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bfloat16 GEMM peak" in proc.stdout and "H=8, D=64, bfloat16" in proc.stdout
    assert "GB/s of KV cache read" in proc.stdout
    report = json.loads(json_path.read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["copy_bandwidth_gbs"] > 0
    assert [t["kind"] for t in report["targets"]] == ["growth_mib"]  # the bf16 target only
    decode = [r for c in report["cases"] if c["name"] == "decode_gqa" for r in c["results"]]
    for row in decode:
        assert row["status"] == "ok", row
        # bf16 halves the cache: 2 kv heads x 256 tokens x 64 x (K and V) x 2 bytes
        if row["variant"] == "attnkit":
            assert row["cache_bytes"] == 2 * 256 * 64 * 2 * 2
        assert row["cache_read_gbs"] == pytest.approx(row["cache_bytes"] / row["median_s"] / 1e9)
        assert 0 < row["bandwidth_share"]


def test_cast_puts_every_float_tensor_and_module_in_the_dtype():
    from attnkit.bench.builders import decode_setup, t5_setup
    from attnkit.bench.spec import cast
    s = cast(t5_setup(32), torch.bfloat16)
    assert s.q.dtype == s.k.dtype == s.v.dtype == torch.bfloat16
    assert s.extra["module"].embedding.weight.dtype == torch.bfloat16
    d = cast(decode_setup(2)(32), torch.float16)
    assert d.extra["k_context"].dtype == d.extra["q_new"].dtype == torch.float16
    assert d.extra["steps"] == 8


def test_rate_share_and_peers_in_another_case():
    rows = {("sliding_window", 16384, "attnkit"): dict(status="ok", median_s=1.0,
                                                       useful_gflops=60.0),
            ("dense", 8192, "torch sdpa"): dict(status="ok", median_s=1.0, useful_gflops=100.0),
            ("causal", 8192, "torch sdpa"): dict(status="ok", median_s=0.5)}
    share = Target(15, "sliding_window", 16384, "attnkit", "rate_share", 0.5, "torch sdpa",
                   peer_case="dense", peer_n=8192)
    result = evaluate(share, rows)
    assert result["status"] == "met" and format_value(result) == "60%"
    assert "(dense, n=8192)" in share.text
    rows[("alibi", 8192, "attnkit")] = dict(status="ok", median_s=0.7)
    near = Target(15, "alibi", 8192, "attnkit", "within", 1.3, "torch sdpa", peer_case="causal")
    assert evaluate(near, rows)["measured"] == pytest.approx(1.4)
    assert evaluate(near, rows)["status"] == "missed"


def test_worker_loads_a_script_without_running_its_main(tmp_path):
    path = tmp_path / "other_bench.py"
    path.write_text(SCRIPT)
    cases = load_cases(f"{path}:CASES")  # its main would parse pytest's argv and exit
    assert [c.name for c in cases] == ["tiny"]
    assert [c.name for c in load_cases("attnkit.bench.cases:CASES")] == [c.name for c in CASES]


def test_only_optional_third_party_packages_may_be_gated():
    build = bench_cases.AUTO.build
    with pytest.raises(ValueError, match="not an optional package"):
        Variant("x", "attnkit", build, needs=("attnkit.layers:LongformerAttention",))
    with pytest.raises(ValueError, match="not an optional package"):
        Variant("x", "peer", build, needs=("numpy",))
    assert Variant("x", "peer", build, needs=("transformers",)).needs == ("transformers",)
    for case in CASES:
        for v in case.variants:
            assert all(not n.startswith("attnkit") for n in case.needs + v.needs), v.label
    note = missing_optional(("torch.nn.attention.flex_attention:no_such_function",))
    assert note and "FlexAttention" in note


def test_variant_lengths_apply_per_mode():
    v = Variant("x", "attnkit", bench_cases.AUTO.build, lengths=(1024,), quick_lengths=(64,))
    assert v.runs_at(1024, quick=False) and not v.runs_at(64, quick=False)
    assert v.runs_at(64, quick=True) and not v.runs_at(1024, quick=True)
    assert not Variant("x", "peer", v.build, quick=False).runs_at(64, quick=True)


# ----------------------------------------------------------------------------- counting

MASKS = [
    (M.causal(), 1),
    (M.sliding_window(40), 1),
    (M.sliding_window(30, 0), 1),
    (M.dilated(9, 5, [1, 2, 3, 4]), 1),
    (M.bigbird(16), 1),
    (M.bigbird(16, num_heads=4), 1),
    (M.sliding_window(20) | M.global_tokens([0, 3, 77]), 1),
    (M.causal() & M.sliding_window(50, 0), 1),
    (M.padding([300, 123]), 2),
]


@pytest.mark.parametrize("mask,batch", MASKS, ids=lambda x: repr(x)[:40])
@pytest.mark.parametrize("L,S", [(300, 300), (257, 300)])
def test_count_allowed_equals_the_materialised_mask(mask, batch, L, S):
    heads = 4
    dense = mask.materialize(L, S)
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    expected = int(dense.expand(batch, heads, L, S).sum())
    assert count_allowed(mask, L, S, batch, heads) == expected
    assert count_allowed(mask, L, S, batch, heads, block=64) == expected


def test_case_entries_count_causal_and_mask_together():
    case = bench_cases.case_by_name("mistral_layer")
    n = 300
    dense = (M.causal() & M.sliding_window(511, 0)).materialize(n, n)
    assert case.entries(n) == case.heads * int(dense.sum())
    assert case.useful_flops(n) == 4 * 64 * case.entries(n)


# ----------------------------------------------------------------------------- memory, timing

def test_peak_rss_sees_a_transient_allocation_and_not_a_quiet_block():
    with PeakRSS() as big:
        x = torch.ones(64 * MiB // 4)  # 64 MiB, written so it is resident
        del x
    with PeakRSS() as quiet:
        y = sum(range(1000))
    assert big.peak >= 60 * MiB
    assert quiet.peak < 16 * MiB and y == 499500


def test_interleave_times_round_robin_until_each_has_its_repeats():
    order = []

    def make(label):
        return lambda: order.append(label)
    a, b = Sample(make("a"), times=[0.0]), Sample(make("b"), times=[0.0])
    interleave([a, b], budget_s=10.0, min_repeats=4, max_repeats=4)
    assert order == ["a", "b"] * 3  # one call each per round, never a run of one
    assert len(a.times) == len(b.times) == 4


def test_interleave_stops_at_the_budget_or_the_cap():
    calls = []
    slow = Sample(lambda: calls.append(1) or time.sleep(0.02), times=[0.02])
    interleave([slow], budget_s=0.05, min_repeats=2, max_repeats=10)
    assert 3 <= len(slow.times) <= 4 and sum(slow.times) >= 0.05
    capped = Sample(lambda: None, times=[0.0])
    interleave([capped], budget_s=100.0, min_repeats=2, max_repeats=5)
    assert len(capped.times) == 5
    very_slow = Sample(lambda: time.sleep(0.04), times=[0.04])  # two calls >= 3 x budget
    interleave([very_slow], budget_s=0.02, min_repeats=3, max_repeats=10)
    assert len(very_slow.times) == 2


def test_warm_up_calls_once_before_the_memory_measured_call():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 2:  # the measured call allocates 64 MiB transiently
            x = torch.ones(64 * MiB // 4)
            del x
    s = warm_up(fn)
    assert len(calls) == 2 and s.times == []  # timed later, under the steady allocator
    assert s.peak_bytes >= 60 * MiB


def test_interleave_with_a_timer_and_exact_repeats_records_cpu_time_too():
    seen = []

    def timer(call):
        seen.append(call)
        call()
        return 5.0  # what a collective timer might report
    a = Sample(lambda: sum(range(10000)))
    interleave([a], budget_s=0.0, min_repeats=3, max_repeats=3, timer=timer)
    assert a.times == [5.0] * 3 and len(a.cpu_times) == 3 and len(seen) == 3


def test_peak_live_bytes_sees_a_transient_tensor():
    def fn():
        x = torch.ones(16 * MiB // 4)
        del x
    assert 15 * MiB <= peak_live_bytes(fn) < 64 * MiB


def test_memory_call_counts_buffers_a_warm_heap_would_hide():
    # 8 MiB is below the steady-state mmap threshold: without Allocator.memory() the
    # measured call would reuse the warm-up's freed heap block and show no growth
    Allocator.speed()

    def fn():
        x = torch.ones(8 * MiB // 4)
        del x
    assert warm_up(fn).peak_bytes >= 7 * MiB


# ----------------------------------------------------------------------------- targets

def _rows(**figures):
    return {(c, n, v): dict(status="ok", **f) for (c, n, v), f in figures.items()}


def test_targets_are_met_missed_or_not_applicable():
    rows = _rows(**{})
    rows[("sliding_window", 8192, "attnkit")] = dict(status="ok", median_s=0.1, mem_bytes=1,
                                                     peak_bytes=1, useful_gflops=120.0)
    rows[("sliding_window", 8192, "sdpa+mask")] = dict(status="ok", median_s=0.9, mem_bytes=9,
                                                       peak_bytes=9, useful_gflops=1.0)
    speed = Target(4, "sliding_window", 8192, "attnkit", "speedup", 8, "sdpa+mask")
    assert evaluate(speed, rows)["status"] == "met"
    assert evaluate(speed, rows)["measured"] == pytest.approx(9.0)
    strict = Target(4, "sliding_window", 8192, "attnkit", "speedup", 10, "sdpa+mask")
    assert evaluate(strict, rows)["status"] == "missed"
    flops = Target(4, "sliding_window", 8192, "attnkit", "gflops", 100)
    assert evaluate(flops, rows)["status"] == "met"
    absent = Target(4, "sliding_window", 16384, "attnkit", "speedup", 1.3, "flex")
    assert evaluate(absent, rows)["status"] == "n/a"
    rows[("sliding_window", 8192, "sdpa+mask")]["status"] = "skipped"
    assert evaluate(speed, rows)["status"] == "n/a"


def test_memory_targets_use_growth_and_linear_scaling():
    rows = {
        ("c", 8192, "attnkit layer"): dict(status="ok", median_s=1, mem_bytes=100 * MiB,
                                           peak_bytes=90 * MiB),
        ("c", 16384, "attnkit layer"): dict(status="ok", median_s=1, mem_bytes=300 * MiB,
                                            peak_bytes=290 * MiB),
    }
    linear = Target(4, "c", 16384, "attnkit layer", "mem_linear", 2.6)
    assert evaluate(linear, rows)["status"] == "missed"  # x3 is not "roughly doubles"
    growth = Target(2, "c", 16384, "attnkit layer", "growth_mib", 600)
    assert evaluate(growth, rows)["status"] == "met"
    assert evaluate(growth, rows)["measured"] == pytest.approx(290)


def test_within_best_compares_with_the_fastest_candidate_measured():
    rows = _rows(**{})
    for name, t in (("attnkit", 0.12), ("chunked", 0.10), ("torch", 0.2)):
        rows[("dilated", 512, name)] = dict(status="ok", median_s=t)
    best = Target(14, "dilated", 512, "attnkit", "within_best", 1.25, "reference|chunked|torch")
    result = evaluate(best, rows)
    assert (result["status"], result["best"]) == ("met", "chunked")
    assert result["measured"] == pytest.approx(1.2)
    assert "1.20x (chunked)" in format_value(result)
    rows[("dilated", 512, "chunked")]["median_s"] = 0.09
    assert evaluate(best, rows)["status"] == "missed"
    for name in ("chunked", "torch"):
        rows[("dilated", 512, name)]["status"] = "skipped"
    assert evaluate(best, rows)["status"] == "n/a"
