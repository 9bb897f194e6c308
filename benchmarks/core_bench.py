"""Issue 2 targets, measured in one run against torch SDPA (float32, B=1, H=8, D=64).

    python benchmarks/core_bench.py            # all targets
    python benchmarks/core_bench.py --quick    # smaller sizes, a smoke run

Time: best of N repeats after a warm-up (min is the least noisy estimate on a shared
machine). Memory: each case runs in a fresh subprocess; the peak resident set (VmHWM) is
reset through /proc/self/clear_refs after the inputs exist, so "growth" is what the
attention call itself added on top of Q, K, V.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnkit

GEMM_PEAK_SIZE = 4096


def best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_peak() -> float:
    a = torch.randn(GEMM_PEAK_SIZE, GEMM_PEAK_SIZE)
    t = best_time(lambda: a @ a, 3)
    return 2 * GEMM_PEAK_SIZE ** 3 / t / 1e9


def qkv(L, H=8, D=64, requires_grad=False):
    return [torch.randn(1, H, L, D, requires_grad=requires_grad) for _ in range(3)]


def dense_cases(sizes):
    rows = []
    for L in sizes:
        q, k, v = qkv(L)
        t_torch = best_time(lambda: F.scaled_dot_product_attention(q, k, v))
        t_auto = best_time(lambda: attnkit.scaled_dot_product_attention(q, k, v))
        t_chunk = best_time(lambda: attnkit.scaled_dot_product_attention(q, k, v, backend="chunked"))
        flops = 4 * 8 * L * L * 64
        rows.append(dict(case="dense", L=L, torch_ms=t_torch * 1e3, auto_ms=t_auto * 1e3,
                         chunked_ms=t_chunk * 1e3, auto_ratio=t_auto / t_torch,
                         chunked_ratio=t_chunk / t_torch,
                         chunked_gflops=flops / t_chunk / 1e9, torch_gflops=flops / t_torch / 1e9))
    return rows


MEMORY_SNIPPET = r"""
import sys, torch, attnkit
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
case, L, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
grad = case.endswith('fwdbwd')
q, k, v = [torch.randn(1, H, L, 64, requires_grad=grad) for _ in range(3)]
backend = 'torch' if case.startswith('torch') else 'chunked'
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
o = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
if grad:
    o.backward(torch.ones_like(o))
print(status('VmHWM') - base)
"""


def memory_growth(case: str, L: int, H: int) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, case, str(L), str(H)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    peak = gemm_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"torch.mm peak {peak:.0f} GFLOP/s")
    sizes = (1024, 2048) if args.quick else (2048, 4096)
    rows = dense_cases(sizes)
    for r in rows:
        print(f"dense L={r['L']}: torch {r['torch_ms']:.1f} ms, auto {r['auto_ratio']:.3f}x "
              f"(target <= 1.05), chunked {r['chunked_ratio']:.2f}x (target <= 1.6) at "
              f"{r['chunked_gflops']:.0f} GFLOP/s (target >= 90; torch {r['torch_gflops']:.0f})")
    L_fwd, L_bwd = (4096, 2048) if args.quick else (16384, 8192)
    mem = {
        f"chunked causal fwd L={L_fwd} H=4": memory_growth("chunked_fwd", L_fwd, 4),
        f"chunked causal fwd L={L_fwd} H=8": memory_growth("chunked_fwd", L_fwd, 8),
        f"chunked causal fwd+bwd L={L_bwd} H=8": memory_growth("chunked_fwdbwd", L_bwd, 8),
        f"torch causal fwd+bwd L={L_bwd} H=8": memory_growth("torch_fwdbwd", L_bwd, 8),
    }
    for name, mib in mem.items():
        print(f"peak memory growth, {name}: {mib:.0f} MiB")
    print("targets: causal fwd at 16384 < 600 MiB; fwd+bwd at 8192 < 400 MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gemm_peak_gflops=peak, dense=rows, memory_mib=mem), f, indent=2)


if __name__ == "__main__":
    main()
