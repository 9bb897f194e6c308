"""Issue 5 targets for ``attnkit.integrations.hf.register()``, measured in one run.

    python benchmarks/hf_bench.py             # the targets below
    python benchmarks/hf_bench.py --quick     # shorter inputs (2048 / 512 tokens)

* Mistral with sliding_window=512 at 4096 tokens (float32, B=1, tiny widths: hidden 128,
  4 query heads and 2 key/value heads of 32, 2 layers, so attention dominates): the base
  model's forward under "attnkit" vs "eager" and "sdpa". Targets: >= 2x faster than
  eager, not slower than sdpa.
* T5 self-attention at 1024 tokens (d_model 128, 4 heads of 32) under "attnkit" vs
  "sdpa" (and "eager" for reference): the first encoder layer's T5Attention module
  (relative position bias + attention), and the whole 2-layer T5EncoderModel. Target:
  not slower than sdpa.

Time: the implementations run alternately in one process (so they share the machine's
load, which other people's jobs make noisy), best of N after a warm-up; ratios compare
best wall-clock times and best CPU (process) times; medians are printed too. On a
shared machine ``--threads 1`` gives the steadiest ratios. Memory: each (model,
implementation) runs in a fresh subprocess; the peak resident set (VmHWM) is reset
through /proc/self/clear_refs once the model and input exist, so "growth" is what the
first forward call added.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MISTRAL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
               sliding_window=512, initializer_range=0.2)
T5 = dict(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
          dropout_rate=0.0)
IMPLS = ("eager", "sdpa", "attnkit")


# ------------------------------------------------------------------ the models

def _model(cls_name: str, config, impl: str):
    import transformers

    import attnkit.integrations.hf as ak_hf
    ak_hf.register()
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    return cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()


def mistral(impl: str, n: int):
    """A forward call of MistralModel on n tokens, and the score entries the window allows."""
    import transformers
    model = _model("MistralModel", transformers.MistralConfig(**MISTRAL), impl)
    ids = torch.randint(0, MISTRAL["vocab_size"], (1, n),
                        generator=torch.Generator().manual_seed(0))
    w = MISTRAL["sliding_window"]
    entries = sum(min(i + 1, w) for i in range(n))
    return (lambda: model(input_ids=ids)), entries


def t5(impl: str, n: int):
    """A forward call of T5EncoderModel on n tokens (every score entry allowed)."""
    import transformers
    model = _model("T5EncoderModel", transformers.T5Config(**T5), impl)
    ids = torch.randint(0, T5["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    return (lambda: model(input_ids=ids)), n * n


def t5_attention(impl: str, n: int):
    """One T5 self-attention module (the first encoder layer's: it computes the relative
    position bias, then attends) on n hidden states, as the encoder calls it without
    padding: with no mask."""
    import transformers
    model = _model("T5EncoderModel", transformers.T5Config(**T5), impl)
    layer = model.encoder.block[0].layer[0].SelfAttention
    hidden = torch.randn(1, n, T5["d_model"], generator=torch.Generator().manual_seed(0))
    return (lambda: layer(hidden, mask=None)), n * n


MODELS = {"mistral": (mistral, MISTRAL["num_attention_heads"], 32, 2),
          "t5-encoder": (t5, T5["num_heads"], T5["d_kv"], 2),
          "t5-self-attention": (t5_attention, T5["num_heads"], T5["d_kv"], 1)}


# ------------------------------------------------------------------ measurements

def timings(calls: dict, rounds: int) -> tuple[dict, dict]:
    """Wall-clock and CPU times of each call, calling them alternately so they share the
    machine's load. With one thread, CPU time is what other people's jobs disturb least."""
    wall, cpu = {k: [] for k in calls}, {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for impl, fn in calls.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                cpu[impl].append(time.process_time() - c)
                wall[impl].append(time.perf_counter() - t)
    return wall, cpu


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(model: str, impl: str, n: int) -> dict:
    """In a fresh process: peak RSS growth (MiB) of one forward call."""
    if os.environ.get("HF_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["HF_BENCH_THREADS"]))
    fn, _ = MODELS[model][0](impl, n)
    with torch.no_grad():
        # the first call: after it the allocator keeps freed blocks and would hide a peak
        open("/proc/self/clear_refs", "w").write("5")
        base = _status("VmRSS")
        fn()
        return dict(growth_mib=_status("VmHWM") - base)


def memory(model: str, impl: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", model, impl, str(n)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the run

def compare(model: str, n: int, impls, rounds: int, targets: dict) -> dict:
    make, heads, head_dim, layers = MODELS[model]
    calls, entries = {}, 0
    for impl in impls:
        calls[impl], entries = make(impl, n)
    times, cpu = timings(calls, rounds)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    mem = {impl: memory(model, impl, n) for impl in impls}
    print(f"\n{model} at {n} tokens (best of {rounds} wall [median] and CPU time; useful "
          f"GFLOP/s over {layers} attention layer{'s' if layers > 1 else ''})")
    for impl in impls:
        gf = 4 * heads * head_dim * entries * layers / best[impl] / 1e9
        m = mem[impl]
        mtxt = m.get("error") or f"peak growth {m['growth_mib']:7.1f} MiB"
        median = statistics.median(times[impl])
        print(f"  {impl:16s} {best[impl] * 1e3:8.1f} ms [{median * 1e3:8.1f}]"
              f"  cpu {best_cpu[impl] * 1e3:8.1f} ms  {gf:6.2f} GFLOP/s  {mtxt}")
    ratios = {}
    for ours in (i for i in impls if i == "attnkit"):
        for peer, target in targets.items():
            r, r_cpu = best[peer] / best[ours], best_cpu[peer] / best_cpu[ours]
            ratios[f"{ours} vs {peer}"] = dict(wall=r, cpu=r_cpu)
            print(f"  {ours} is {r:.2f}x as fast as {peer} ({r_cpu:.2f}x in CPU time; "
                  f"target >= {target:g}x)")
    return dict(n=n, seconds=times, cpu_seconds=cpu, memory=mem, ratios=ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2048 / 512 tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="write all timings to this file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 makes ratios robust on a shared, loaded machine)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "IMPL", "N"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["HF_BENCH_THREADS"] = str(args.threads)  # for the memory workers
    if args.worker:
        model, impl, n = args.worker
        print(json.dumps(worker(model, impl, int(n))))
        return
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; float32, batch 1")
    n_mistral, n_t5 = (2048, 512) if args.quick else (4096, 1024)
    report = {
        "mistral": compare("mistral", n_mistral, IMPLS, args.rounds,
                           targets={"eager": 2.0, "sdpa": 1.0}),
        "t5-self-attention": compare("t5-self-attention", n_t5, IMPLS, 3 * args.rounds,
                                     targets={"sdpa": 1.0}),
        "t5-encoder": compare("t5-encoder", n_t5, IMPLS, args.rounds, targets={"sdpa": 1.0}),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
