"""Issue 5 targets for ``attnkit.integrations.hf.patch(model)``, attention module against
attention module, measured in one run.

    python benchmarks/hf_patch_bench.py            # the targets below
    python benchmarks/hf_patch_bench.py --quick    # shorter inputs (1024 / 512 tokens)

Each case builds a one-layer transformers model (float32, batch 1, d_model 512, 8 heads of
64, random weights with initializer_range=0.2, eval mode) twice from one seed, patches one
of them, and calls the attention module of layer 0 of each with exactly the arguments the
model passes it:

* ``longformer``: ``LongformerSelfAttention`` (window 512, i.e. 256 each side, 16 global
  tokens) vs the patched ``AttnkitLongformerSelfAttention``, 4096 tokens.
  Target: >= 4x faster, lower peak memory.
* ``bigbird``: ``BigBirdBlockSparseAttention`` (block 64, 3 random blocks, eval plan) vs
  the patched ``AttnkitBigBirdBlockSparseAttention``, 4096 tokens.
  Target: >= 3x faster, lower peak memory.
* ``t5``: the first encoder layer's ``T5Attention`` (relative position bias + attention,
  no padding) under "sdpa" vs the patched ``AttnkitT5Attention``, 1024 tokens.
  Target: not slower. ``t5-long`` repeats it at 4096 tokens, where T5's dense
  (1, 8, L, L) bias alone is 512 MiB.

Time: both modules run alternately in one process (so they share the machine's load),
best of N after a warm-up; ratios compare best wall-clock and best CPU (process) times.
OpenMP waits passively (OMP_WAIT_POLICY=PASSIVE unless set), as in long_bench.py.
Memory: each (case, implementation) runs in a fresh subprocess; the peak resident set
(VmHWM) is reset through /proc/self/clear_refs once the model and inputs exist, so
"growth" is what one call of the module added. The load average is printed before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# spinning OpenMP threads turn every small op into a wait when other work shares the two
# cores; passive waiting keeps the ratios honest (set before torch starts its pool)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

D_MODEL, HEADS = 512, 8
IMPLS = ("hf", "attnkit")


# ------------------------------------------------------------------ the modules

def _longformer(n: int):
    import transformers
    config = transformers.LongformerConfig(
        vocab_size=256, hidden_size=D_MODEL, num_attention_heads=HEADS, num_hidden_layers=1,
        intermediate_size=4 * D_MODEL, attention_window=[512], max_position_embeddings=n + 8,
        attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = transformers.LongformerModel(config).eval()
    # the layer-level mask LongformerModel builds: -10000 padding, 0 local, +10000 global
    mask = torch.zeros(1, n)
    mask[:, :16] = 10000.0
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=True)
    return model, "encoder.layer.0.attention.self", kwargs


def _bigbird(n: int):
    import transformers
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel
    config = transformers.BigBirdConfig(
        vocab_size=256, hidden_size=D_MODEL, num_attention_heads=HEADS, num_hidden_layers=1,
        intermediate_size=4 * D_MODEL, attention_type="block_sparse", block_size=64,
        num_random_blocks=3, max_position_embeddings=n + 8, attention_probs_dropout_prob=0.0,
        initializer_range=0.2)
    model = BigBirdModel(config).eval()
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, n), 64)
    kwargs = dict(band_mask=band, from_mask=from_mask, to_mask=to_mask,
                  from_blocked_mask=blocked, to_blocked_mask=blocked)
    return model, "encoder.layer.0.attention.self", kwargs


def _t5(n: int):
    import transformers
    config = transformers.T5Config(vocab_size=256, d_model=D_MODEL, d_kv=D_MODEL // HEADS,
                                   d_ff=4 * D_MODEL, num_layers=1, num_heads=HEADS,
                                   dropout_rate=0.0)
    model = transformers.T5EncoderModel._from_config(config, attn_implementation="sdpa").eval()
    return model, "encoder.block.0.layer.0.SelfAttention", {}


CASES = {"longformer": (_longformer, 4096, 4.0), "bigbird": (_bigbird, 4096, 3.0),
         "t5": (_t5, 1024, 1.0), "t5-long": (_t5, 4096, 1.0)}


def _module(model, path: str):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def build(case: str, impl: str, n: int):
    """A call of one attention module on (1, n, d_model) hidden states."""
    import attnkit.integrations.hf as ak_hf
    torch.manual_seed(0)
    model, path, kwargs = CASES[case][0](n)
    if impl == "attnkit":
        ak_hf.patch(model)
    module = _module(model, path)
    hidden = torch.randn(1, n, D_MODEL, generator=torch.Generator().manual_seed(0))
    return lambda: module(hidden, **kwargs), type(module).__name__


# ------------------------------------------------------------------ measurements

def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(case: str, impl: str, n: int) -> dict:
    """In a fresh process: peak RSS growth (MiB) of the first call (a later one would hide
    its peak in blocks the allocator kept); for attnkit it includes building the
    per-length layouts and tile caches, so it is the conservative figure."""
    if os.environ.get("HF_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["HF_BENCH_THREADS"]))
    fn, _ = build(case, impl, n)
    with torch.no_grad():
        open("/proc/self/clear_refs", "w").write("5")
        base = _status("VmRSS")
        fn()
        return dict(growth_mib=_status("VmHWM") - base)


def memory(case: str, impl: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", case, impl, str(n)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timings(calls: dict, rounds: int) -> tuple[dict, dict]:
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


def compare(case: str, n: int, rounds: int) -> dict:
    target = CASES[case][2]
    calls, names = {}, {}
    for impl in IMPLS:
        calls[impl], names[impl] = build(case, impl, n)
    wall, cpu = timings(calls, rounds)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    mem = {impl: memory(case, impl, n) for impl in IMPLS}
    print(f"\n{case} at {n} tokens (best of {rounds} wall [median], CPU time; peak RSS "
          f"growth of one call in a fresh process)")
    for impl in IMPLS:
        m = mem[impl]
        mtxt = m.get("error") or f"peak growth {m['growth_mib']:8.1f} MiB"
        print(f"  {names[impl]:36s} {best[impl] * 1e3:8.1f} ms "
              f"[{statistics.median(wall[impl]) * 1e3:8.1f}]  cpu {best_cpu[impl] * 1e3:8.1f} ms"
              f"  {mtxt}")
    speed, speed_cpu = best["hf"] / best["attnkit"], best_cpu["hf"] / best_cpu["attnkit"]
    mem_ratio = None
    if "growth_mib" in mem["hf"] and "growth_mib" in mem["attnkit"]:
        mem_ratio = mem["hf"]["growth_mib"] / max(mem["attnkit"]["growth_mib"], 1e-3)
    print(f"  attnkit is {speed:.2f}x as fast ({speed_cpu:.2f}x in CPU time; target >= "
          f"{target:g}x)" + (f", uses {mem_ratio:.1f}x less peak memory" if mem_ratio else ""))
    return dict(n=n, modules=names, seconds=wall, cpu_seconds=cpu, memory=mem,
                speedup=dict(wall=speed, cpu=speed_cpu), memory_ratio=mem_ratio, target=target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 tokens (T5: 512)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None, help="write all timings to this file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 makes ratios robust on a shared, loaded machine)")
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "IMPL", "N"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["HF_BENCH_THREADS"] = str(args.threads)  # for the memory workers
    if args.worker:
        case, impl, n = args.worker
        print(json.dumps(worker(case, impl, int(n))))
        return
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; float32, batch 1; load average "
          f"{os.getloadavg()[0]:.2f}")
    report = {}
    for case in args.cases:
        n = CASES[case][1]
        if args.quick:
            n = 512 if case == "t5" else 1024
        rounds = args.rounds if n >= 4096 or not case.startswith("t5") else 3 * args.rounds
        report[case] = compare(case, n, rounds)
        report[case]["load_after"] = os.getloadavg()[0]
        print(f"  (load average {report[case]['load_after']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
