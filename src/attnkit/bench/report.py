"""Turning results into something to read: a progress bar while the run goes, the table
at the end, the JSON file with every figure."""

from __future__ import annotations

import json
import sys
import time

from .targets import format_value

__all__ = ["Progress", "format_table", "format_targets", "format_profiles", "format_markdown",
           "outcome", "write_json"]

MiB = 1 << 20
#: a row whose median exceeds its min by this factor is flagged: load came and went
NOISY = 1.3


class Progress:
    """A one-line progress bar on a terminal; one line per finished item elsewhere."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def _bar(self) -> str:
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done:3d}/{self.total} "
                f"{elapsed:5.0f}s")

    def start(self, label: str) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self._bar()}  {label}")
            self.stream.flush()

    def finish(self, label: str, outcome: str) -> None:
        self.done += 1
        if self.tty:
            self.stream.write(f"\r\033[K{self._bar()}  {label}: {outcome}")
        else:
            self.stream.write(f"{self._bar()}  {label}: {outcome}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def outcome(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('note', '')}"
    return f"{_ms(row['median_s'])} ms"


def _speedups(row: dict) -> str:
    parts = [f"{peer} {x:.2f}x" for peer, x in row.get("speedup_vs", {}).items()]
    return ", ".join(parts)


def _notes(row: dict, marks: list, cpu_time: bool = False) -> str:
    notes = []
    if row["status"] != "ok":
        notes.append(f"{row['status']}: {row.get('note', '')}")
    else:
        if cpu_time and row.get("cpu_median_s") is not None:
            cpu = ", ".join(f"{peer} {x:.2f}x" for peer, x in row.get("speedup_vs_cpu", {}).items())
            notes.append(f"cpu {_ms(row['cpu_median_s'])} ms" + (f" ({cpu})" if cpu else ""))
        if row.get("compile_s") is not None:
            notes.append(f"compile {row['compile_s']:.1f}s excluded")
        if row.get("cache_bytes_per_token") is not None:
            notes.append(f"cache {row['cache_bytes_per_token']:.0f} B/token")
        if row["median_s"] > NOISY * row["min_s"]:
            notes.append(f"noisy: median {row['median_s'] / row['min_s']:.1f}x min")
        if row.get("peak_share", 0) > 1:
            notes.append("above the GEMM peak: the cores were busier when it was measured")
        if row.get("setup_bytes", 0) >= 64 * MiB:
            notes.append(f"incl. {row['setup_bytes'] / MiB:.0f} MiB precomputed")
        if row.get("note"):
            notes.append(row["note"])
    notes.extend(marks)
    return "; ".join(notes)


HEADER = (f"{'n':>7}  {'implementation':<17}{'median ms':>10}{'min ms':>9}{'GFLOP/s':>9}"
          f"{'%peak':>7}{'mem MiB':>9}  {'attnkit speedup over peers':<40}  notes")


def format_table(report: dict) -> str:
    """Every case as a block: one line per (length, implementation)."""
    marks: dict = {}
    for t in report.get("targets", []):
        if t["status"] in ("met", "missed"):
            word = "MISSED" if t["status"] == "missed" else "met"
            marks.setdefault((t["case"], t["n"], t["variant"]), []).append(
                f"{word} #{t['issue']}: {t['text'].replace(t['variant'] + ' ', '', 1)}"
                f" ({format_value(t)})")
    cpu_time = report.get("settings", {}).get("cpu_time", False)
    dtype = report.get("settings", {}).get("dtype", "float32")
    lines = []
    for case in report["cases"]:
        unit = "per token" if case["kind"] == "decode" else (
            "forward+backward" if case["kind"] == "train" else "forward")
        loads = [r["load_average"] for r in case.get("results", [])
                 if r.get("load_average") is not None]
        busy = f", load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        lines.append("")
        layers = f", {case['layers']} layers" if case.get("layers", 1) > 1 else ""
        decode = case["kind"] == "decode"
        lines.append(f"== {case['name']}: {case['title']}  (B={case['batch']}, H={case['heads']}, "
                     f"D={case['head_dim']}{layers}, {dtype}, {unit}{busy})")
        if decode:
            lines.append("   (GFLOP/s and %peak: GB/s of KV cache read per token, and its share "
                         "of the copy bandwidth)")
        if case.get("skipped"):
            lines.append(f"   skipped: {case['skipped']}")
            continue
        lines.append(HEADER)
        last_n = None
        for row in case["results"]:
            n = f"{row['n']:>7}" if row["n"] != last_n else " " * 7
            last_n = row["n"]
            ok = row["status"] == "ok"
            if decode and ok and "bandwidth_share" in row:
                gf = f"{row['cache_read_gbs']:.1f}"
                share = f"{100 * row['bandwidth_share']:.0f}%"
            else:
                gf = f"{row['useful_gflops']:.1f}" if ok else "-"
                share = f"{100 * row['peak_share']:.0f}%" if ok else "-"
            mem = f"{row['mem_bytes'] / MiB:.1f}" if ok else "-"
            lines.append(
                f"{n}  {row['variant']:<17}{_ms(row.get('median_s')):>10}"
                f"{_ms(row.get('min_s')):>9}{gf:>9}{share:>7}{mem:>9}  "
                f"{_speedups(row):<40}  "
                f"{_notes(row, marks.get((case['name'], row['n'], row['variant']), []), cpu_time)}"
                .rstrip())
    return "\n".join(lines)


def format_targets(report: dict) -> str:
    """The targets this run measured, one line each, and one line for the rest."""
    targets = report.get("targets", [])
    lines = ["", "== targets from the issues (median times)"]
    for t in targets:
        if t["status"] != "n/a":
            status = {"met": "met   ", "missed": "MISSED"}[t["status"]]
            lines.append(f"  {status} #{t['issue']} {t['case']} n={t['n']}: {t['text']}: "
                         f"{format_value(t)}")
    unmeasured = [t for t in targets if t["status"] == "n/a"]
    if unmeasured and report.get("mode") == "quick":
        sizes = ", ".join(map(str, sorted({t["n"] for t in unmeasured})))
        lines.append(f"  {len(unmeasured)} more targets, at n = {sizes}, not measured in this "
                     f"run (`attnkit bench` without --quick measures them)")
    else:  # a full run: each one says why (an optional package missing, say)
        for t in unmeasured:
            lines.append(f"  n/a    #{t['issue']} {t['case']} n={t['n']}: {t['text']} "
                         f"({t['why']})")
    return "\n".join(lines)


def format_profiles(report: dict) -> str:
    """Where attnkit's time went (torch.profiler, top operators), per profiled row."""
    lines = []
    for p in report.get("profiles", []):
        lines += ["", f"== profile: {p['case']} n={p['n']} {p['variant']}", p["table"].rstrip()]
    return "\n".join(lines)


def format_markdown(report: dict, lengths: tuple | None = None) -> str:
    """A condensed Markdown table for the README: per case and length, each attnkit
    implementation's median time, useful GFLOP/s, peak memory and speedup over the peers
    measured beside it; then the issues' targets."""
    m = report["machine"]
    dtype = report.get("settings", {}).get("dtype", "float32")
    lines = [
        f"Measured on {m['cpu_model']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch_version']}, {dtype}, B=1, H=8, D=64 unless the case says otherwise; "
        f"{dtype} GEMM peak {report['gemm_peak_gflops']:.0f} GFLOP/s; "
        f"load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{m['load_average_at_end'][0]:.1f} at end (the cores are shared: compare ratios "
        f"within a row, not across runs).",
        "",
        "| case | n | attnkit | median ms | GFLOP/s (% peak) | peak MiB | speedup over peers | load |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for case in report["cases"]:
        if case.get("skipped"):
            lines.append(f"| {case['name']} | | skipped: {case['skipped']} | | | | | |")
            continue
        for row in case["results"]:
            if row["role"] != "attnkit" or (lengths and row["n"] not in lengths):
                continue
            if row["status"] == "skipped" and row.get("missing_package"):
                continue  # an optional package not installed: the targets below say n/a
            if row["status"] != "ok":
                lines.append(f"| {case['name']} | {row['n']} | {row['variant']} | "
                             f"{row['status']}: {row.get('note', '')} | | | | |")
                continue
            unit = " /token" if case["kind"] == "decode" else ""
            mem = (f"{row['cache_bytes'] / MiB:.1f} (cache)" if case["kind"] == "decode"
                   else f"{row['mem_bytes'] / MiB:.0f}")
            noisy = " (noisy)" if row["median_s"] > NOISY * row["min_s"] else ""
            lines.append(
                f"| {case['name']} | {row['n']} | {row['variant']} | {_ms(row['median_s'])}{unit}{noisy} | "
                f"{row['useful_gflops']:.0f} ({100 * row['peak_share']:.0f}%) | {mem} | "
                f"{_speedups(row)} | {row.get('load_average') or 0:.1f} |")
    lines += ["", "Targets from the issues (median times):", ""]
    for t in report.get("targets", []):
        if t["status"] == "n/a":
            lines.append(f"- n/a: #{t['issue']} {t['case']} n={t['n']}: {t['text']} ({t['why']})")
        else:
            word = "**MISSED**" if t["status"] == "missed" else "met"
            lines.append(f"- {word}: #{t['issue']} {t['case']} n={t['n']}: {t['text']}: "
                         f"{format_value(t)}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
