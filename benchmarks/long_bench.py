"""Issue 4 targets for the long-sequence layers, measured in one run (float32, B=1, H=8,
D=64, d_model=512).

    python benchmarks/long_bench.py              # everything below
    python benchmarks/long_bench.py --quick      # n=2048 vs HF, memory at 4096/8192 only
    python benchmarks/long_bench.py --profile    # also: where the time goes (torch.profiler)

* LongformerAttention vs HF LongformerSelfAttention at 4096 tokens (attention window 512,
  i.e. +-256, the first 16 tokens global): time and peak memory. Target >= 4x faster
  with lower peak memory.
* BigBirdAttention vs HF BigBirdBlockSparseAttention at 4096 tokens (block 64, 3 random
  blocks, eval): both attnkit patterns, "hf" (HF's exact layout) and "bigbird" (the
  generic seeded per-head pattern). Target >= 3x faster.
* Peak memory of both layers at n = 8192, 16384, 32768. Target: roughly doubling per
  step, < 1.5 GiB at 32768.

Time: the implementations are called alternately in one process (so they share the
machine's load), best of N after a warm-up, with OpenMP waiting passively
(OMP_WAIT_POLICY=PASSIVE unless set); CPU seconds are printed next to wall seconds.
Memory: every (implementation, n) runs in a fresh subprocess; the peak resident set
(VmHWM) is reset through /proc/self/clear_refs after the layer and its input exist, so
"growth" is what the forward call added (the layer's weights and the (1, n, 512) input
are not counted; the input is 2 MiB per 1024 tokens). Useful GFLOP/s = 4 * H * D * (allowed score entries) / time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# spinning OpenMP threads turn every small op into a wait when other work shares the two
# cores; passive waiting keeps the ratios honest (set before torch starts its pool)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

E, H, D = 512, 8, 64
WINDOW, NUM_GLOBAL = 512, 16
BLOCK, RANDOM = 64, 3


# ------------------------------------------------------------------ the layers

def longformer(impl: str, n: int):
    """(layer call, allowed score entries); impl "peer" (HF) or "attnkit"."""
    torch.manual_seed(0)
    x = torch.randn(1, n, E)
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[:, :NUM_GLOBAL] = True
    w = WINDOW // 2
    band = sum(min(n - 1, i + w) - max(0, i - w) + 1 for i in range(n))
    entries = band + 2 * NUM_GLOBAL * n  # windows, plus global rows and global columns
    if impl == "peer":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
        cfg = LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[WINDOW],
                               num_hidden_layers=1, attention_probs_dropout_prob=0.0)
        layer = LongformerSelfAttention(cfg, 0).eval()
        am = torch.zeros(1, n)
        am[glob] = 10000.0
        return (lambda: layer(x, attention_mask=am, is_index_masked=am < 0,
                              is_index_global_attn=am > 0, is_global_attn=True)), entries
    from attnkit.layers.longformer import LongformerAttention
    layer = LongformerAttention(E, H, WINDOW).eval()
    return (lambda: layer(x, global_attention_mask=glob)), entries


def bigbird(impl: str, n: int):
    """impl "peer" (HF), "attnkit-hf" (HF's exact layout) or "attnkit-bigbird" (generic)."""
    torch.manual_seed(0)
    x = torch.randn(1, n, E)
    nb = n // BLOCK
    if impl == "peer":
        from transformers import BigBirdConfig
        from transformers.models.big_bird.modeling_big_bird import (BigBirdBlockSparseAttention,
                                                                    BigBirdModel)
        cfg = BigBirdConfig(hidden_size=E, num_attention_heads=H, block_size=BLOCK,
                            num_random_blocks=RANDOM, attention_type="block_sparse",
                            max_position_embeddings=max(n, 4096))
        layer = BigBirdBlockSparseAttention(cfg, seed=0).eval()
        bm, band, fm, tm = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, n), BLOCK)
        # key blocks listed per query block (duplicates included): 2 global rows see all,
        # blocks 1 and n-2 list 4 + r, the middle ones 5 + r
        entries = (2 * nb + 2 * (4 + RANDOM) + (nb - 4) * (5 + RANDOM)) * BLOCK * BLOCK
        return (lambda: layer(x, band, fm, tm, bm, bm)), entries
    from attnkit.layers.bigbird import BigBirdAttention
    from attnkit.masks import BigBirdMask
    layer = BigBirdAttention(E, H, BLOCK, RANDOM, pattern=impl.split("-")[1]).eval()
    mask, _ = layer.pattern_for(n)
    lay = mask.layout(n) if isinstance(mask, BigBirdMask) else mask.layout
    entries = float(lay.sum()) / lay.shape[0] * BLOCK * BLOCK  # per head, averaged
    return (lambda: layer(x)), entries


LAYERS = {"longformer": longformer, "bigbird": bigbird}


# ------------------------------------------------------------------ measurements

def best_times(calls: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Best time of each call, calling them alternately so they share the machine's load.
    ``clock=time.process_time`` gives CPU seconds (all threads), less sensitive to other
    work on the machine when torch runs one thread."""
    best = {k: float("inf") for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for k, fn in calls.items():
                t = clock()
                fn()
                best[k] = min(best[k], clock() - t)
    return best


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(layer: str, impl: str, n: int) -> dict:
    """In a fresh process: peak RSS growth (MiB) of one forward call."""
    fn, _ = LAYERS[layer](impl, n)
    with torch.no_grad():
        open("/proc/self/clear_refs", "w").write("5")
        base = _status("VmRSS")
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
        return dict(growth_mib=_status("VmHWM") - base, total_mib=_status("VmHWM"),
                    seconds=seconds)


def memory(layer: str, impl: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", layer, impl, str(n)],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        return dict(error=out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(layer: str, impl: str, n: int, rows: int = 12) -> str:
    from torch.profiler import profile as prof
    fn, _ = LAYERS[layer](impl, n)
    with torch.no_grad():
        fn()
        with prof() as p:
            fn()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ------------------------------------------------------------------ the run

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 steadies a busy machine)")
    ap.add_argument("--worker", nargs=3, metavar=("LAYER", "IMPL", "N"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    if args.worker:
        layer, impl, n = args.worker
        print(json.dumps(worker(layer, impl, int(n))))
        return

    n_cmp = 2048 if args.quick else 4096
    mem_ns = (4096, 8192) if args.quick else (8192, 16384, 32768)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, B=1, H={H}, "
          f"D={D}, d_model={E}; load average {os.getloadavg()[0]:.1f}")
    report = dict(compare={}, memory={})
    targets = dict(longformer=4.0, bigbird=3.0)
    for layer, impls in (("longformer", ("attnkit",)),
                         ("bigbird", ("attnkit-hf", "attnkit-bigbird"))):
        calls, entries = {}, {}
        for impl in ("peer",) + impls:
            calls[impl], entries[impl] = LAYERS[layer](impl, n_cmp)
        best = best_times(calls, args.repeats)
        cpu = best_times(calls, args.repeats, time.process_time)
        mem = {impl: memory(layer, impl, n_cmp) for impl in calls}
        report["compare"][layer] = dict(n=n_cmp, seconds=best, cpu_seconds=cpu, memory=mem)
        peer = best["peer"]
        for impl in calls:
            gf = 4 * H * D * entries[impl] / best[impl] / 1e9
            name = "HF" if impl == "peer" else impl
            speed = "" if impl == "peer" else (
                f"  {peer / best[impl]:.2f}x faster than HF (CPU time: "
                f"{cpu['peer'] / cpu[impl]:.2f}x; target >= {targets[layer]:.0f}x)")
            m = mem[impl]
            mtxt = m.get("error") or f"peak growth {m['growth_mib']:.0f} MiB"
            print(f"{layer} n={n_cmp} {name:16s} {best[impl] * 1e3:8.1f} ms "
                  f"(CPU {cpu[impl] * 1e3:7.1f} ms)  {gf:6.1f} useful GFLOP/s  {mtxt}{speed}")
    for layer, impl in (("longformer", "attnkit"), ("bigbird", "attnkit-hf"),
                        ("bigbird", "attnkit-bigbird")):
        row = {n: memory(layer, impl, n) for n in mem_ns}
        report["memory"][f"{layer} {impl}"] = row
        parts = []
        for n, m in row.items():
            parts.append(f"n={n}: " + (m.get("error") or f"{m['growth_mib']:.0f} MiB "
                                                         f"({m['seconds']:.1f} s)"))
        print(f"peak memory growth {layer} {impl}: " + ", ".join(parts))
    print("targets: memory roughly doubles per step and stays < 1536 MiB at 32768")
    if args.profile:
        for layer, impl in (("longformer", "attnkit"), ("bigbird", "attnkit-hf"),
                            ("bigbird", "attnkit-bigbird")):
            print(f"\n== profile {layer} {impl} n={n_cmp}")
            print(profile(layer, impl, n_cmp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
