"""The arithmetic of a benchmark run, on `Timing` records (all times in seconds from the run's start).

Per request: TTFT = first text chunk - send; TPOT = (last chunk - first chunk) / (output tokens - 1),
the mean gap per token after the first (undefined for one token); ITL = the gaps between consecutive
chunks (a chunk may carry several tokens); end-to-end = finish - send.
Longest pause = a request's largest ITL (the stall a reader sees; a per-request mean TPOT hides it).
Per run: request and token throughput over the run's wall time; mean, p50, p90, p99, p99.9 of each latency
(linear interpolation between order statistics, as numpy's default); goodput = requests per second that
finished and met every SLO given (TTFT <= slo.ttft_s and TPOT <= slo.tpot_s; a one-token request has no
TPOT and meets a TPOT SLO), and SLO attainment = their share of all requests. Where the server reports
them: prefix-cache hits (prompt tokens served from cache, and against the ideal of a multi-turn workload) and
pdserve's KV sources (the placement mix).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.tools.bench.client import Timing

QUANTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def label(self) -> str:
        parts = [f"TTFT <= {self.ttft_s * 1000:g} ms" if self.ttft_s is not None else "",
                 f"TPOT <= {self.tpot_s * 1000:g} ms" if self.tpot_s is not None else ""]
        return " and ".join(p for p in parts if p) or "none"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between order statistics; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ttft(t: Timing) -> float:
    return t.chunk_times[0] - t.sent_at


def tpot(t: Timing) -> float | None:
    if t.num_output_tokens < 2 or len(t.chunk_times) < 2:
        return None
    return (t.chunk_times[-1] - t.chunk_times[0]) / (t.num_output_tokens - 1)


def itls(t: Timing) -> list[float]:
    return [b - a for a, b in zip(t.chunk_times, t.chunk_times[1:], strict=False)]


def longest_pause(t: Timing) -> float | None:
    gaps = itls(t)
    return max(gaps) if gaps else None


def e2e(t: Timing) -> float:
    return t.finished_at - t.sent_at


def meets(t: Timing, slo: SLO) -> bool:
    if not t.ok:
        return False
    if slo.ttft_s is not None and ttft(t) > slo.ttft_s:
        return False
    per_token = tpot(t)
    return slo.tpot_s is None or per_token is None or per_token <= slo.tpot_s


def _describe(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, **{f"p{q}": percentile(values, q) for q in QUANTILES}}


def summarize(timings: list[Timing], duration_s: float, slo: SLO = SLO()) -> dict[str, Any]:
    """The run's numbers (latencies in seconds), ready for JSON."""
    done = [t for t in timings if t.ok]
    tpots = [v for v in (tpot(t) for t in done) if v is not None]
    num_good = sum(meets(t, slo) for t in timings)
    num_out = sum(t.num_output_tokens for t in done)
    num_in = sum(t.num_prompt_tokens for t in done)
    return {
        "num_requests": len(timings),
        "num_ok": len(done),
        "num_failed": len(timings) - len(done),
        "errors": sorted({t.error for t in timings if t.error})[:5],
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": num_out / duration_s,
        "total_token_throughput": (num_in + num_out) / duration_s,
        "ttft_s": _describe([ttft(t) for t in done]),
        "tpot_s": _describe(tpots),
        "itl_s": _describe([gap for t in done for gap in itls(t)]),
        "longest_pause_s": _describe([p for p in (longest_pause(t) for t in done) if p is not None]),
        "e2e_s": _describe([e2e(t) for t in done]),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "label": slo.label()},
        "goodput": num_good / duration_s,
        "slo_attainment": num_good / len(timings) if timings else math.nan,
        **_cache_and_placement(done),
    }


def _cache_and_placement(done: list[Timing]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reported = [t for t in done if t.cached_tokens is not None]
    if reported:
        hits, ideal = sum(t.cached_tokens or 0 for t in reported), sum(t.ideal_cached_tokens for t in reported)
        prompts = sum(t.num_prompt_tokens for t in reported)
        out["prefix_cache"] = {"hit_tokens": hits, "hit_rate": hits / max(1, prompts),
                               "of_ideal": hits / ideal if ideal else math.nan}
    if any(t.kv_source for t in done):
        out["kv_sources"] = dict(Counter(t.kv_source or "none" for t in done))
    return out
