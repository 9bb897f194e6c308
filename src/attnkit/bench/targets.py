"""The speed and memory targets the mechanisms' issues set, checked against a run.

Times are medians; memory targets about "peak memory growth" use the growth during one
call (``peak_bytes``), comparisons between implementations use setup + call
(``mem_bytes``: a precomputed dense mask or bias counts against the one that needs it).
A target whose rows were not measured in this run (``--quick``, a skipped variant, an
optional package not installed) is "n/a", never "met".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Target", "TARGETS", "evaluate", "format_value"]

MiB = 1 << 20
DECODE_CASES = ("decode_mha", "decode_gqa", "decode_mqa")


@dataclass(frozen=True)
class Target:
    issue: int              # the tracker number that set it, printed as "#n"
    case: str
    n: int
    variant: str            # the attnkit row the target is about
    kind: str               # speedup | within | within_best | rate_share | gflops
                            # | growth_mib | mem_below | mem_linear | mem_mib | bandwidth
                            # | mem_share | per_token
    threshold: float
    peer: str | None = None  # within_best: the candidates, separated by "|"
    dtype: str = "float32"   # the run's dtype (``attnkit bench --dtype``) it is about
    peer_case: str | None = None  # the peer's row is in this case (default: the same)
    peer_n: int | None = None     # ... at this length (default: the same)

    @property
    def text(self) -> str:
        t, p = self.threshold, self.peer
        return {
            "speedup": f"{self.variant} >= {t:g}x faster than {p}{self._where}",
            "within": f"{self.variant} time <= {t:g}x {p}{self._where}",
            "rate_share": f"{self.variant} useful GFLOP/s >= {t:.0%} of {p}'s{self._where}",
            "within_best": f"{self.variant} time <= {t:g}x the fastest of {p}",
            "gflops": f"{self.variant} >= {t:g} useful GFLOP/s",
            "bandwidth": f"{self.variant} reads its cache at >= {t:.0%} of the copy bandwidth",
            "mem_share": f"{self.variant} memory <= {t:.0%} of {p}'s{self._where}",
            "per_token": f"{self.variant} time per token <= {t:g}x its own at n={self.peer_n}",
            "growth_mib": f"{self.variant} peak memory growth < {t:g} MiB",
            "mem_mib": f"{self.variant} peak memory < {t:g} MiB",
            "mem_below": f"{self.variant} peak memory below {p}",
            "mem_linear": f"{self.variant} memory roughly doubles n/2 -> n (x{t:g} at most)",
        }[self.kind]


    @property
    def _where(self) -> str:
        if self.peer_case is None and self.peer_n is None:
            return ""
        return f" ({self.peer_case or self.case}, n={self.peer_n or self.n})"


def _t(issue, case, n, variant, kind, threshold, peer=None, **where):
    return Target(issue, case, n, variant, kind, threshold, peer, **where)


def _bf16(issue, case, n, variant, kind, threshold, peer=None, **where):
    return Target(issue, case, n, variant, kind, threshold, peer, dtype="bfloat16", **where)


TARGETS: tuple[Target, ...] = (
    # the core engine
    _t(2, "dense", 2048, "attnkit", "within", 1.05, "torch sdpa"),
    _t(2, "dense", 4096, "attnkit", "within", 1.05, "torch sdpa"),
    _t(2, "dense", 4096, "attnkit chunked", "within", 1.6, "torch sdpa"),
    _t(2, "dense", 4096, "attnkit chunked", "gflops", 90),
    _t(2, "causal", 16384, "attnkit chunked", "growth_mib", 600),
    _t(2, "causal_train", 8192, "attnkit chunked", "growth_mib", 400),
    # positional biases through the chunked engine
    _t(3, "alibi", 8192, "attnkit", "growth_mib", 400),
    _t(3, "alibi", 8192, "attnkit", "within", 1.5, "sdpa+bias"),
    _t(3, "t5", 8192, "attnkit", "growth_mib", 400),
    _t(3, "t5", 8192, "attnkit", "within", 1.5, "sdpa+bias"),
    # long sequences
    _t(4, "sliding_window", 8192, "attnkit", "speedup", 8, "sdpa+mask"),
    _t(4, "sliding_window", 16384, "attnkit", "speedup", 1.3, "flex"),
    _t(4, "sliding_window", 16384, "attnkit", "gflops", 100),
    _t(4, "longformer_layer", 4096, "attnkit layer", "speedup", 4, "hf Longformer"),
    _t(4, "longformer_layer", 4096, "attnkit layer", "mem_below", 0, "hf Longformer"),
    _t(4, "bigbird_layer", 4096, "attnkit layer", "speedup", 3, "hf BigBird"),
    _t(4, "longformer_layer", 16384, "attnkit layer", "mem_linear", 2.6),
    _t(4, "longformer_layer", 32768, "attnkit layer", "mem_linear", 2.6),
    _t(4, "longformer_layer", 32768, "attnkit layer", "mem_mib", 1536),
    _t(4, "bigbird_layer", 16384, "attnkit layer", "mem_linear", 2.6),
    _t(4, "bigbird_layer", 32768, "attnkit layer", "mem_linear", 2.6),
    _t(4, "bigbird_layer", 32768, "attnkit layer", "mem_mib", 1536),
    # HF interop, attention module against attention module
    _t(5, "longformer_layer", 4096, "attnkit patched", "speedup", 4, "hf Longformer"),
    _t(5, "longformer_layer", 4096, "attnkit patched", "mem_below", 0, "hf Longformer"),
    _t(5, "bigbird_layer", 4096, "attnkit patched", "speedup", 3, "hf BigBird"),
    _t(5, "bigbird_layer", 4096, "attnkit patched", "mem_below", 0, "hf BigBird"),
    _t(5, "t5_layer", 1024, "attnkit patched", "within", 1.0, "hf t5 sdpa"),
    _t(5, "mistral_layer", 4096, "attnkit", "speedup", 2, "hf mistral eager"),
    _t(5, "mistral_layer", 4096, "attnkit", "within", 1.0, "hf mistral sdpa"),
    # half precision: ratios against torch in bfloat16, in one bfloat16 run
    *(_bf16(15, case, n, "attnkit", "within", 1.05, peer)
      for case, peer in (("dense", "torch sdpa"), ("causal", "torch sdpa"),
                         ("gqa", "sdpa gqa"), ("mqa", "sdpa gqa"))
      for n in (4096, 16384) if not (case != "causal" and n > 8192)),
    _bf16(15, "causal", 4096, "attnkit chunked", "within", 1.25, "torch sdpa"),
    _bf16(15, "causal", 16384, "attnkit chunked", "within", 1.25, "torch sdpa"),
    _bf16(15, "causal_train", 4096, "attnkit", "within", 1.2, "torch sdpa"),
    _bf16(15, "alibi", 8192, "attnkit", "within", 1.3, "torch sdpa", peer_case="causal"),
    _bf16(15, "alibi", 8192, "attnkit", "mem_linear", 2.6),
    # the t5 case is bidirectional: its bias-free peer is torch's dense kernel (the
    # issue's "causal" peer does half the work, below what any kernel here can reach)
    _bf16(15, "t5", 8192, "attnkit", "within", 1.3, "torch sdpa", peer_case="dense"),
    _bf16(15, "t5", 8192, "attnkit", "mem_linear", 2.6),
    _bf16(15, "softcap", 8192, "attnkit", "within", 2.0, "torch sdpa", peer_case="causal"),
    _bf16(15, "sliding_window", 16384, "attnkit", "rate_share", 0.5, "torch sdpa",
          peer_case="dense", peer_n=8192),
    _bf16(15, "longformer_layer", 4096, "attnkit layer", "speedup", 4, "hf Longformer"),
    _bf16(15, "bigbird_layer", 4096, "attnkit layer", "speedup", 3, "hf BigBird"),
    _bf16(15, "mistral_layer", 4096, "attnkit", "within", 1.0, "hf mistral sdpa"),
    # decoding on the bandwidth roofline, in float32 and bfloat16 runs
    *(Target(19, case, 16384, "attnkit", "bandwidth", 0.6, dtype=dtype)
      for dtype in ("float32", "bfloat16") for case in DECODE_CASES),
    *(Target(19, case, n, "attnkit", "speedup", 1.0, "torch.cat+sdpa", dtype=dtype)
      for dtype in ("float32", "bfloat16") for case in DECODE_CASES
      for n in (1024, 2048, 4096, 8192, 16384)),
)


def _row(rows: dict, case: str, n: int, variant: str | None):
    r = rows.get((case, n, variant))
    return r if r is not None and r.get("status") == "ok" else None


def evaluate(target: Target, rows: dict) -> dict:
    """``rows``: {(case, n, variant): row}. Returns the target with its measured value
    and status "met", "missed" or "n/a" (and why)."""
    out = {"issue": target.issue, "case": target.case, "n": target.n,
           "variant": target.variant, "peer": target.peer, "kind": target.kind,
           "threshold": target.threshold, "text": target.text, "measured": None}
    me = _row(rows, target.case, target.n, target.variant)
    if me is None:
        return {**out, "status": "n/a", "why": f"{target.variant} not measured at n={target.n}"}
    k = target.kind
    if k == "within_best":
        measured = {name: _row(rows, target.case, target.n, name)
                    for name in target.peer.split("|")}
        measured = {name: r for name, r in measured.items() if r is not None}
        if not measured:
            return {**out, "status": "n/a", "why": f"none of {target.peer} measured"}
        best = min(measured, key=lambda name: measured[name]["median_s"])
        value = me["median_s"] / measured[best]["median_s"]
        return {**out, "measured": value, "best": best,
                "status": "met" if value <= target.threshold else "missed"}
    if k in ("speedup", "within", "mem_below", "rate_share"):
        peer = _row(rows, target.peer_case or target.case, target.peer_n or target.n,
                    target.peer)
        if peer is None:
            return {**out, "status": "n/a", "why": f"{target.peer} not measured at n={target.n}"}
        if k == "speedup":
            value = peer["median_s"] / me["median_s"]
            ok = value >= target.threshold
        elif k == "within":
            value = me["median_s"] / peer["median_s"]
            ok = value <= target.threshold
        elif k == "rate_share":
            value = me["useful_gflops"] / peer["useful_gflops"]
            ok = value >= target.threshold
        else:
            value = me["mem_bytes"] / MiB
            ok = me["mem_bytes"] < peer["mem_bytes"]
            out["peer_value"] = peer["mem_bytes"] / MiB
    elif k == "gflops":
        value = me["useful_gflops"]
        ok = value >= target.threshold
    elif k == "mem_share":
        peer = _row(rows, target.peer_case or target.case, target.peer_n or target.n,
                    target.peer)
        if peer is None:
            return {**out, "status": "n/a", "why": f"{target.peer} not measured at n={target.n}"}
        value = me["mem_bytes"] / max(peer["mem_bytes"], 1)
        ok = value <= target.threshold
    elif k == "per_token":
        base = _row(rows, target.case, target.peer_n, target.variant)
        if base is None:
            return {**out, "status": "n/a", "why": f"not measured at n={target.peer_n}"}
        value = (me["median_s"] / target.n) / (base["median_s"] / target.peer_n)
        ok = value <= target.threshold
    elif k == "bandwidth":
        if "bandwidth_share" not in me:
            return {**out, "status": "n/a", "why": "no copy bandwidth measured"}
        value = me["bandwidth_share"]
        ok = value >= target.threshold
    elif k == "growth_mib":
        value = me["peak_bytes"] / MiB
        ok = value < target.threshold
    elif k == "mem_mib":
        value = me["mem_bytes"] / MiB
        ok = value < target.threshold
    elif k == "mem_linear":
        half = _row(rows, target.case, target.n // 2, target.variant)
        if half is None:
            return {**out, "status": "n/a", "why": f"not measured at n={target.n // 2}"}
        value = me["mem_bytes"] / max(half["mem_bytes"], 1)
        ok = value <= target.threshold
    else:  # pragma: no cover
        raise ValueError(k)
    return {**out, "measured": value, "status": "met" if ok else "missed"}


def format_value(result: dict) -> str:
    v, k = result["measured"], result["kind"]
    if v is None:
        return "-"
    if k == "within_best":
        return f"{v:.2f}x ({result['best']})"
    if k in ("rate_share", "bandwidth", "mem_share"):
        return f"{v:.0%}"
    if k in ("speedup", "within", "mem_linear", "per_token"):
        return f"{v:.2f}x"
    if k == "gflops":
        return f"{v:.0f} GFLOP/s"
    if k == "mem_below":
        return f"{v:.0f} vs {result.get('peer_value', 0):.0f} MiB"
    return f"{v:.0f} MiB"
