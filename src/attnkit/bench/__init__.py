"""``attnkit bench``: every attention variant against its peers, in one run.

    attnkit bench [--quick] [--dtype float32|bfloat16|float16] [--json FILE] [--plot FILE.png]

The parent process describes the machine, measures the GEMM peak of the run's dtype
(torch.mm, 4096 x 4096) and the memory bandwidth of a large copy, plans which (case,
length, implementation) fit the time and memory budgets, and hands the plan to worker
processes (``attnkit.bench.worker``): one fresh process per case in a full run, one for
all cases with ``--quick`` (process start-up would otherwise eat the two minutes). It
then adds the derived figures (useful GFLOP/s, share of the dtype's GEMM peak, decode's
share of the copy bandwidth, speedups over each peer, the issues' targets), prints the
table and writes the JSON and the plot. Methods: ``benchmarks/README.md``.

The focused scripts in ``benchmarks/`` run their own case lists through the same
:func:`run` (a :class:`~attnkit.bench.spec.Suite`; command line: :mod:`attnkit.bench.script`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from .cases import CASES, SOURCE
from .measurement import (WORKER_ENV, WORKER_ENV_DEFAULTS, PeakRSS, describe_machine,
                          worker_env)
from .report import (Progress, format_profiles, format_table, format_targets, outcome,
                     write_json)
from .spec import D, DTYPES, FULL_LENGTHS, Case, Suite, missing_optional
from .targets import TARGETS, evaluate

__all__ = ["run", "SETTINGS", "SUITE", "Suite", "settings"]

#: what ``attnkit bench`` measures
SUITE = Suite("attnkit bench", CASES, TARGETS, SOURCE)

GiB = 1 << 30

#: time and memory budgets: calls estimated beyond them are skipped with a note
SETTINGS = {
    # --quick is a smoke test: one thread, so that a machine busy with other work does
    # not turn every small op into a wait for the second core
    "quick": {"budget_s": 0.1, "min_repeats": 2, "max_repeats": 5, "max_call_s": 0.6,
              "max_bytes": 1.5 * GiB, "worker_timeout_s": 240, "threads": 1},
    "full": {"budget_s": 1.2, "min_repeats": 3, "max_repeats": 15, "max_call_s": 4.0,
             "max_bytes": 6 * GiB, "worker_timeout_s": 900, "threads": None},
}


def settings(mode: str, threads: int | None = None, repeats: int | None = None) -> dict:
    """The budgets of a mode ("quick" or "full"), with ``threads`` torch threads per
    worker and exactly ``repeats`` timed calls per implementation when given."""
    cfg = dict(SETTINGS[mode])
    if threads:
        cfg["threads"] = threads
    if repeats:
        cfg.update(min_repeats=repeats, max_repeats=repeats)
    return cfg


def _estimate(case: Case, variant, n: int, gemm_peak: float) -> tuple[float, float]:
    """(seconds per call, extra bytes) a variant is expected to need at length n."""
    per_entry = case.batch * case.heads * case.head_dim * case.layers * (
        3 if case.kind == "train" else 1)
    if variant.work == "dense":
        flops = 4 * per_entry * n * n
    elif variant.work == "causal":
        flops = 2 * per_entry * n * n
    else:
        flops = case.useful_flops(n)
    seconds = flops / (0.6 * gemm_peak * 1e9) * (case.steps if case.kind == "decode" else 1)
    return seconds, variant.mem(n)


def plan_runs(mode: str, gemm_peak: float, cases=CASES, targets=TARGETS,
              cfg: dict | None = None) -> tuple[list, list, dict]:
    """(jobs for the workers, rows skipped up front, case notes).

    A job is {"case": name, "lengths": [[n, [variant labels]], ...]}."""
    cfg = cfg or SETTINGS[mode]
    # rows a target is about are run whatever their estimated time (not their memory)
    wanted = {(t.case, t.n, t.variant) for t in targets} | {
        (t.peer_case or t.case, t.peer_n or t.n, peer) for t in targets if t.peer
        for peer in t.peer.split("|")}
    jobs, skipped, case_notes = [], [], {}
    for case in cases:
        why = missing_optional(case.needs, import_transformers=False)
        if why:
            case_notes[case.name] = why
            continue
        lengths = case.quick_lengths if mode == "quick" else case.lengths
        job = {"case": case.name, "lengths": []}
        dropped = set()  # left out for time or memory: said once, not at every longer length
        for n in lengths:
            labels = []
            for v in case.variants:
                if not v.runs_at(n, quick=mode == "quick"):
                    continue
                if mode == "quick" and v.compiled and n != max(lengths):
                    continue
                if v.label in dropped and (case.name, n, v.label) not in wanted:
                    continue
                note = missing_optional(v.needs, import_transformers=False)
                missing = note is not None
                if note is None and v.max_length is not None and n > v.max_length:
                    note = f"run up to n={v.max_length} only (time)"
                    dropped.add(v.label)
                if note is None:
                    secs, mem = _estimate(case, v, n, gemm_peak)
                    if mem > cfg["max_bytes"]:
                        note = (f"needs ~{mem / GiB:.1f} GiB > budget {cfg['max_bytes'] / GiB:.1f}"
                                f"{' (and more beyond)' if n < max(lengths) else ''}")
                        dropped.add(v.label)
                    elif secs > cfg["max_call_s"] and (case.name, n, v.label) not in wanted:
                        note = (f"~{secs:.0f} s per call > budget {cfg['max_call_s']:g} s"
                                f"{' (and more beyond)' if n < max(lengths) else ''}")
                        dropped.add(v.label)
                if note:
                    skipped.append({"case": case.name, "n": n, "variant": v.label,
                                    "role": v.role, "status": "skipped", "note": note,
                                    **({"missing_package": True} if missing else {})})
                else:
                    labels.append(v.label)
            if labels:
                job["lengths"].append([n, labels])
        if job["lengths"]:
            jobs.append(job)
    return jobs, skipped, case_notes


def _env() -> dict:
    env = worker_env()
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _gemm_peak(cfg: dict, repeats: int, dtype: str = "float32"
               ) -> tuple[float, int, float, int]:
    """The GEMM peak in ``dtype`` and the copy bandwidth, measured in a worker process
    (same environment and threads as the measurements): (GFLOP/s, threads, GB/s, the
    product size n: 4096 unless the dtype is too slow here, see ``gemm_size``)."""
    plan = {"jobs": [], "threads": cfg["threads"],
            "gemm": {"n": 4096, "repeats": repeats, "dtype": dtype}}
    proc = subprocess.run([sys.executable, "-m", "attnkit.bench.worker"], input=json.dumps(plan),
                          capture_output=True, text=True, env=_env(), timeout=300)
    for line in proc.stdout.splitlines():
        event = json.loads(line)
        if event["type"] == "gemm":
            return event["gflops"], event["threads"], event["copy_gbs"], event["n"]
    raise OSError(f"the GEMM peak measurement failed: {proc.stderr.strip()[-300:]}")


def _run_worker(jobs: list, cfg: dict, progress: Progress, on_result, source: str = SOURCE,
                profile: bool = False, on_profile=None, dtype: str = "float32") -> None:
    """One worker process for these jobs; results streamed back line by line."""
    env = _env()
    plan = {"jobs": jobs, "budget": cfg, "threads": cfg["threads"], "source": source,
            "profile": profile, "dtype": dtype}
    pending = {(j["case"], n, label) for j in jobs for n, labels in j["lengths"]
               for label in labels}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "attnkit.bench.worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        timer = threading.Timer(cfg["worker_timeout_s"], proc.kill)
        timer.start()
        try:
            proc.stdin.write(json.dumps(plan))
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event["type"] == "start":
                    progress.start(f"{event['case']} n={event['n']} {event['variant']}")
                elif event["type"] == "result":
                    pending.discard((event["case"], event["n"], event["variant"]))
                    on_result(event)
                elif event["type"] == "profile" and on_profile is not None:
                    on_profile(event)
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            raise
        finally:
            timer.cancel()
        if pending:
            err.seek(0)
            tail = [ln for ln in err.read().strip().splitlines() if ln.strip()][-1:]
            why = (f"worker stopped (exit {proc.returncode}"
                   f"{', killed after ' + str(cfg['worker_timeout_s']) + ' s' if proc.returncode == -9 else ''})"
                   f"{': ' + tail[0][:150] if tail else ''}")
            for case, n, label in sorted(pending):
                on_result({"type": "result", "case": case, "n": n, "variant": label,
                           "status": "failed", "note": why})


def _derive(rows: list, cases: dict, gemm_peak: float, copy_gbs: float | None = None) -> None:
    """Useful GFLOP/s, share of the GEMM peak, decode's share of the copy bandwidth,
    speedup over each peer (same case and n)."""
    for row in rows:
        case = cases[row["case"]]
        row["entries"] = case.entries(row["n"])
        row["useful_flops"] = case.useful_flops(row["n"])
        if row["status"] == "ok":
            row["useful_gflops"] = row["useful_flops"] / row["median_s"] / 1e9
            row["useful_gflops_best"] = row["useful_flops"] / row["min_s"] / 1e9
            row["peak_share"] = row["useful_gflops"] / gemm_peak
            if copy_gbs and "cache_read_gbs" in row:
                row["bandwidth_share"] = row["cache_read_gbs"] / copy_gbs
    by_key: dict = {}
    for row in rows:
        by_key.setdefault((row["case"], row["n"]), []).append(row)
    for group in by_key.values():
        peers = [r for r in group if r["role"] == "peer" and r["status"] == "ok"]
        for row in group:
            if row["role"] == "attnkit" and row["status"] == "ok":
                row["speedup_vs"] = {p["variant"]: p["median_s"] / row["median_s"] for p in peers}
                # the same from the least disturbed calls, for runs on a busy machine
                row["speedup_vs_min"] = {p["variant"]: p["min_s"] / row["min_s"] for p in peers}
                # and in CPU (process) time, which other processes disturb less
                row["speedup_vs_cpu"] = {p["variant"]: p["cpu_median_s"] / row["cpu_median_s"]
                                         for p in peers if row.get("cpu_median_s")}


def run(quick: bool = False, json_path: str | None = None, plot_path: str | None = None,
        cases=None, stream=None, *, suite: Suite = SUITE, threads: int | None = None,
        repeats: int | None = None, profile: bool = False, command: str | None = None,
        dtype: str = "float32") -> int:
    """Run a suite (default: ``attnkit bench``'s), print the table; returns the exit code
    (0 unless nothing ran). ``cases``: names to run (default: all of the suite's);
    ``threads``, ``repeats``: see :func:`settings`; ``profile``: also print where
    attnkit's time goes at each case's first length; ``dtype``: what inputs, modules and
    peers run in (float32, bfloat16, float16), and whose GEMM peak the shares are of."""
    stream = stream or sys.stdout
    mode = "quick" if quick else "full"
    cfg = settings(mode, threads, repeats)
    if cases is not None:
        unknown = set(cases) - {c.name for c in suite.cases}
        if unknown:
            raise ValueError(f"unknown cases: {', '.join(sorted(unknown))}")
    selected = suite.cases if cases is None else tuple(c for c in suite.cases
                                                       if c.name in set(cases))
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if plot_path and not plot_path.lower().endswith(".png"):
        raise ValueError(f"--plot must name a .png file, got {plot_path!r}")
    t_start = time.time()
    machine = describe_machine()
    print(f"{suite.name} ({mode}) on {machine['cpu_model']}, {machine['cores']} cores, "
          f"torch {machine['torch_version']}, load average {machine['load_average_at_start'][0]:.1f}",
          file=stream, flush=True)
    gemm_peak, machine["torch_threads"], copy_gbs, gemm_n = _gemm_peak(cfg, 1 if quick else 3,
                                                                        dtype)
    machine["worker_environment"] = {k: _env()[k] for k in (*WORKER_ENV_DEFAULTS, *WORKER_ENV)}
    print(f"{dtype} GEMM peak (torch.mm {gemm_n}x{gemm_n}, {machine['torch_threads']} threads): "
          f"{gemm_peak:.0f} GFLOP/s; copy bandwidth {copy_gbs:.1f} GB/s", file=stream,
          flush=True)
    if quick:
        n = machine["torch_threads"]
        print(f"--quick times everything on {n} torch thread{'s' if n != 1 else ''}, so "
              f"that a machine busy with other work distorts it little; the full run uses "
              f"the {machine['cores']} cores. Sparse masks and ALiBi are timed at 512 and "
              f"2048: at 512 their patterns cover most of the matrix, and the gain over the "
              f"dense peers starts with length", file=stream, flush=True)

    targets = tuple(t for t in suite.targets if t.dtype == dtype)
    jobs, rows, case_notes = plan_runs(mode, gemm_peak, selected, targets, cfg)
    total = sum(len(labels) for j in jobs for _, labels in j["lengths"])
    progress = Progress(total)
    roles = {(c.name, v.label): v.role for c in selected for v in c.variants}
    profiles: list = []

    def on_result(event):
        event.pop("type", None)
        event["role"] = roles[(event["case"], event["variant"])]
        rows.append(event)
        progress.finish(f"{event['case']} n={event['n']} {event['variant']}", outcome(event))

    def on_profile(event):
        profiles.append({k: event[k] for k in ("case", "n", "variant", "table")})

    groups = [jobs] if quick else [[j] for j in jobs]
    for group in groups:
        if group:
            _run_worker(group, cfg, progress, on_result, suite.source, profile, on_profile,
                        dtype)
    progress.close()

    by_name = {c.name: c for c in selected}
    gemm_runs = [gemm_peak]
    if not quick:  # the load may have changed: the peak is the best the machine showed
        again, _, copy_again, _ = _gemm_peak(cfg, 3, dtype)
        gemm_runs.append(again)
        gemm_peak, copy_gbs = max(gemm_runs), max(copy_gbs, copy_again)
        print(f"{dtype} GEMM peak measured again at the end: {gemm_runs[-1]:.0f} GFLOP/s; "
              f"using the best, {gemm_peak:.0f}", file=stream, flush=True)
    _derive(rows, by_name, gemm_peak, copy_gbs)
    order = {(c.name, v.label): (i, j) for i, c in enumerate(selected)
             for j, v in enumerate(c.variants)}
    rows.sort(key=lambda r: (order[(r["case"], r["variant"])][0], r["n"],
                             order[(r["case"], r["variant"])][1]))
    machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "mode": mode,
        "command": command or (suite.name + (" --quick" if quick else "")),
        "machine": machine,
        "gemm_peak_gflops": gemm_peak,
        "gemm_measurements_gflops": gemm_runs,
        "copy_bandwidth_gbs": copy_gbs,
        "settings": {"heads": 8, "head_dim": D, "dtype": dtype,
                     "lengths": list(FULL_LENGTHS), **cfg, "memory_method": PeakRSS.method,
                     "cpu_time": suite.cpu_time,
                     "useful_gflops": "4 * B * H * allowed score entries * head_dim / median "
                                      "time (x3 for forward+backward)"},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "duration_s": None,
        "cases": [],
    }
    for c in selected:
        entry = {"name": c.name, "title": c.title, "kind": c.kind, "batch": c.batch,
                 "heads": c.heads, "head_dim": c.head_dim, "layers": c.layers,
                 "note": c.note,
                 "lengths": list(c.quick_lengths if quick else c.lengths),
                 "implementations": {v.label: v.role for v in c.variants},
                 "results": [r for r in rows if r["case"] == c.name]}
        if c.name in case_notes:
            entry["skipped"] = case_notes[c.name]
        report["cases"].append(entry)
    index = {(r["case"], r["n"], r["variant"]): r for r in rows}
    labels = {(c.name, v.label) for c in selected for v in c.variants}
    report["targets"] = [evaluate(t, index) for t in targets if (t.case, t.variant) in labels]
    report["profiles"] = profiles
    report["duration_s"] = time.time() - t_start

    print(format_table(report), file=stream)
    print(format_targets(report), file=stream)
    if profiles:
        print(format_profiles(report), file=stream)
    print(f"\n{sum(r['status'] == 'ok' for r in rows)} measurements, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed in "
          f"{report['duration_s']:.0f} s", file=stream)
    if json_path:
        write_json(report, json_path)
        print(f"figures written to {json_path}", file=stream)
    if plot_path:
        from .plot import plot_report
        plot_report(report, plot_path)
        print(f"plot written to {plot_path}", file=stream)
    return 0 if any(r["status"] == "ok" for r in rows) else 1
