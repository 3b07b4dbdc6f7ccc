"""Benchmark results as JSON, and their plots (matplotlib, headless).

A results file is `{"meta": {...}, "runs": [run, ...]}`; a run is `{"system", "workload", "rate",
"summary": stats.summarize(...), "requests": [per-request ttft/tpot/e2e/tokens/ok]}`. Plots:
`cdf_<workload>.png` (TTFT, TPOT and end-to-end latency CDFs, one line per system) and `goodput.png`
(goodput against offered rate, one line per system, for workloads run at several rates). The notebook
`notebooks/02_benchmarks.ipynb` draws the same figures from the JSON with these functions.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from app.tools.bench import stats
from app.tools.bench.client import Timing


def run_record(system: str, workload: str, rate: float | None, timings: list[Timing], duration_s: float,
               slo: stats.SLO) -> dict[str, Any]:
    return {
        "system": system, "workload": workload, "rate": rate,
        "summary": stats.summarize(timings, duration_s, slo),
        "requests": [{"ok": t.ok, "sent_at": t.sent_at, "ttft_s": stats.ttft(t) if t.ok else None,
                      "tpot_s": stats.tpot(t) if t.ok else None, "e2e_s": stats.e2e(t) if t.ok else None,
                      "num_prompt_tokens": t.num_prompt_tokens, "num_output_tokens": t.num_output_tokens,
                      "kv_source": t.kv_source, "error": t.error} for t in timings],
    }


# (label, summary key, quantile, which way is better): the metrics a comparison reports.
KEYS = (("TTFT p50", "ttft_s", "p50", "lower"), ("TTFT p99", "ttft_s", "p99", "lower"),
        ("TPOT p50", "tpot_s", "p50", "lower"), ("TPOT p99", "tpot_s", "p99", "lower"),
        ("ITL p99.9", "itl_s", "p99.9", "lower"), ("longest pause", "longest_pause_s", "mean", "lower"),
        ("e2e p50", "e2e_s", "p50", "lower"), ("req/s", "request_throughput", None, "higher"),
        ("goodput", "goodput", None, "higher"))
TOLERANCE = 0.05  # a ratio within 5% of 1 is a tie on a noisy machine


def comparisons(runs: list[dict[str, Any]], ours: str, baselines: tuple[str, ...]) -> list[dict[str, Any]]:
    """ours / baseline for each workload (and rate) both ran, per metric in KEYS; `behind` marks where
    ours is worse by more than TOLERANCE (higher latency, lower throughput or goodput)."""
    by = {(r["system"], r["workload"], r["rate"]): r["summary"] for r in runs}
    rows = []
    for (system, workload, rate), mine in by.items():
        if system != ours:
            continue
        for baseline in baselines:
            theirs = by.get((baseline, workload, rate))
            if theirs is None:
                continue
            for label, key, q, better in KEYS:
                if key not in mine or key not in theirs:  # a run from before that metric existed
                    continue
                a, b = (s[key][q] if q else s[key] for s in (mine, theirs))
                if a != a or b != b or b == 0:  # nan or zero: no ratio
                    continue
                ratio = a / b
                behind = ratio > 1 + TOLERANCE if better == "lower" else ratio < 1 - TOLERANCE
                rows.append({"workload": workload, "rate": rate, "baseline": baseline, "metric": label,
                             "ratio": ratio, "behind": behind, "better": better})
    return rows


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def save(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=True))
    return path


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _sorted_cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return Path(out)


def plot_cdfs(runs: list[dict[str, Any]], workload: str, out: str | Path) -> Path:
    """TTFT, TPOT and end-to-end CDFs of one workload, a line per system (the highest rate if several)."""
    plt = _pyplot()
    chosen: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["workload"] == workload and (run["system"] not in chosen
                                            or (run["rate"] or 0) > (chosen[run["system"]]["rate"] or 0)):
            chosen[run["system"]] = run
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "end-to-end"), strict=True):
        for system, run in sorted(chosen.items()):
            values = [r[key] * 1000 for r in run["requests"] if r.get(key) is not None]
            if values:
                xs, ys = _sorted_cdf(values)
                ax.step(xs, ys, where="post", label=system)
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{title}: {workload}")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def plot_goodput(runs: list[dict[str, Any]], workload: str, out: str | Path) -> Path:
    """Goodput (and request throughput, dashed) against offered rate for one workload, a line per system."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    systems = sorted({r["system"] for r in runs if r["workload"] == workload})
    for system in systems:
        points = sorted(((r["rate"], r["summary"]) for r in runs
                         if r["workload"] == workload and r["system"] == system and r["rate"] is not None),
                        key=lambda point: point[0])
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1]["goodput"] for p in points], marker="o", label=system)
        ax.plot([p[0] for p in points], [p[1]["request_throughput"] for p in points], linestyle="--",
                color=line.get_color(), alpha=0.5)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("goodput (requests/s meeting the SLO)")
    ax.set_title(f"goodput vs rate: {workload} (dashed: throughput)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
