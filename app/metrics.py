"""Prometheus metrics through `ray.serve.metrics` (exported on each node's Ray metrics port).

`METRICS` is the one list of what pdserve exports: the README table, the Grafana dashboard
(`dashboards/pdserve.json`) and the scrape test are all checked against it. Ray prefixes every name
with `ray_` and adds the `application`, `deployment` and `replica` tags.

Who records what:
- Ingress: request latencies (TTFT, TPOT, end to end), fallbacks, breaker states, the prefill:decode
  time ratio of finished disaggregated requests.
- Prefill replica: KV transfer latency and bytes, its queue and parked KV.
- Decode replica: its queue, running sequences, KV cache usage, recomputes by reason.
Metric objects are created lazily in the process that records them; outside Ray (unit tests) every
call is a no-op.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from app.messages import KVReport

logger = logging.getLogger(__name__)

# Latency buckets in seconds: 1 ms .. 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # as recorded; Prometheus shows it as ray_<name>
    kind: Literal["Counter", "Gauge", "Histogram"]
    unit: str
    tags: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("pdserve_kv_transfer_seconds", "Histogram", "seconds", ("backend",),
              "KV transfer of one request, header + payload, measured on the prefill replica.", TRANSFER_BUCKETS),
    MetricDef("pdserve_kv_transfer_bytes_total", "Counter", "bytes", ("backend",),
              "KV payload bytes sent from prefill to decode replicas."),
    MetricDef("pdserve_ttft_seconds", "Histogram", "seconds", ("mode",),
              "Time to first token, from the ingress receiving the request to its first token.", LATENCY_BUCKETS),
    MetricDef("pdserve_tpot_seconds", "Histogram", "seconds", ("mode",),
              "Time per output token after the first, per request.", TPOT_BUCKETS),
    MetricDef("pdserve_e2e_latency_seconds", "Histogram", "seconds", ("mode",),
              "End-to-end latency of a finished request at the ingress.", LATENCY_BUCKETS),
    MetricDef("pdserve_queue_depth", "Gauge", "requests", ("phase",),
              "Requests on an engine replica not yet running: waiting in the engine, in the prefill batch "
              "window, or (decode) for their KV."),
    MetricDef("pdserve_queued_prompt_tokens", "Gauge", "tokens", ("phase",),
              "Prompt tokens an engine replica has still to compute (waiting and partly computed prompts)."),
    MetricDef("pdserve_running_requests", "Gauge", "requests", ("phase",),
              "Sequences an engine replica is running."),
    MetricDef("pdserve_kv_cache_usage", "Gauge", "ratio", ("phase",),
              "Share of the replica's KV cache blocks in use, 0-1 (decode: memory pressure)."),
    MetricDef("pdserve_engine_step_seconds", "Gauge", "seconds", ("phase",),
              "Mean time of one engine step over the last 50 ms of stepping (0: idle); a step slower than the "
              "engine alone takes is work in the replica's process competing with it."),
    MetricDef("pdserve_prefill_decode_time_ratio", "Gauge", "ratio", (),
              "Prefill time / decode time of the disaggregated requests finished in the last 60 s."),
    MetricDef("pdserve_phase_seconds_total", "Counter", "seconds", ("phase",),
              "Time finished disaggregated requests spent in each phase (prefill: queue, prompt and KV "
              "send; decode: first to last token)."),
    MetricDef("pdserve_fallbacks_total", "Counter", "requests", ("kind",),
              "Requests that left the plain path: retried_other_prefill, recomputed, failed_fast, "
              "retried_dead_replica, continued_after_lost_kv, no_prefill_replica."),
    MetricDef("pdserve_placements_total", "Counter", "requests", ("placement", "reason"),
              "Disaggregated requests by where their prompt prefilled (local: on the decode replica; remote: on a "
              "prefill replica) and why: decode_idle, prefix_cached, prefill_busy, prefill_idle, decode_busy, "
              "long_prompt, policy, prompt_logprobs, forced."),
    MetricDef("pdserve_kv_recomputes_total", "Counter", "requests", ("reason",),
              "Prompts a decode replica recomputed instead of loading KV, by reason: deadline, checksum, "
              "prefill_failed, pairing, no_prefill_replica, other."),
    MetricDef("pdserve_circuit_breaker_state", "Gauge", "state", ("target",),
              "Circuit breaker per prefill replica or prefill->decode pair (0 closed, 1 half-open, 2 open)."),
    MetricDef("pdserve_parked_kv", "Gauge", "entries", (),
              "KV caches parked by prefill_only requests on a prefill replica."),
    MetricDef("pdserve_parked_kv_bytes", "Gauge", "bytes", (),
              "Bytes of parked KV on a prefill replica."),
)}


@functools.cache
def _metric(name: str) -> Any:
    definition = METRICS[name]
    try:
        import ray
        from ray.serve import metrics

        if not ray.is_initialized():
            return None
        kwargs: dict[str, Any] = {"description": definition.description, "tag_keys": definition.tags}
        if definition.boundaries:
            kwargs["boundaries"] = list(definition.boundaries)
        return getattr(metrics, definition.kind)(name, **kwargs)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.debug("metric %s unavailable", name, exc_info=True)
        return None


def _inc(name: str, value: float = 1.0, **tags: str) -> None:
    metric = _metric(name)
    if metric is not None and value:
        metric.inc(value, tags=tags or None)


def _set(name: str, value: float, **tags: str) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.set(value, tags=tags or None)


def _observe(name: str, value: float, **tags: str) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.observe(value, tags=tags or None)


# -- ingress ----------------------------------------------------------------------------------------

def record_fallback(kind: str) -> None:
    """A request that did not take the plain path (kinds in `METRICS`)."""
    _inc("pdserve_fallbacks_total", kind=kind)


def record_placement(placement: str, reason: str) -> None:
    _inc("pdserve_placements_total", placement=placement, reason=reason)


def record_report_fallbacks(report: KVReport) -> None:
    """The fallbacks one finished request's report names (each request counted once)."""
    if report.fallback:
        record_fallback(report.fallback)
    if report.kv_source == "recomputed":
        record_fallback("recomputed")

def set_breaker_state(target: str, state: int) -> None:
    _set("pdserve_circuit_breaker_state", state, target=target)


def observe_request(mode: str, ttft_s: float, e2e_s: float, num_output_tokens: int) -> None:
    """One finished request's latencies; TPOT needs at least two output tokens."""
    _observe("pdserve_ttft_seconds", ttft_s, mode=mode)
    _observe("pdserve_e2e_latency_seconds", e2e_s, mode=mode)
    if num_output_tokens > 1:
        _observe("pdserve_tpot_seconds", tpot(ttft_s, e2e_s, num_output_tokens), mode=mode)


def tpot(ttft_s: float, e2e_s: float, num_output_tokens: int) -> float:
    """Time per output token after the first (0 for fewer than two tokens)."""
    return (e2e_s - ttft_s) / (num_output_tokens - 1) if num_output_tokens > 1 else 0.0


class PhaseRatio:
    """Prefill time / decode time over a sliding window of finished requests (thread-safe)."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float, float]] = deque()  # (finished_at, prefill_s, decode_s)
        self._lock = threading.Lock()

    def add(self, prefill_s: float, decode_s: float, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, prefill_s, decode_s))
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()
            ratio = self.ratio()
        _inc("pdserve_phase_seconds_total", prefill_s, phase="prefill")
        _inc("pdserve_phase_seconds_total", decode_s, phase="decode")
        if ratio is not None:
            _set("pdserve_prefill_decode_time_ratio", ratio)
        return ratio

    def ratio(self) -> float | None:
        decode = sum(sample[2] for sample in self._samples)
        return sum(sample[1] for sample in self._samples) / decode if decode > 0 else None


# -- engine replicas --------------------------------------------------------------------------------

def observe_transfer(backend: str, seconds: float, num_bytes: int) -> None:
    _observe("pdserve_kv_transfer_seconds", seconds, backend=backend)
    _inc("pdserve_kv_transfer_bytes_total", num_bytes, backend=backend)


def set_engine_load(phase: str, queue_depth: int, queued_prompt_tokens: int, running: int, kv_usage: float,
                    step_s: float) -> None:
    _set("pdserve_queue_depth", queue_depth, phase=phase)
    _set("pdserve_queued_prompt_tokens", queued_prompt_tokens, phase=phase)
    _set("pdserve_running_requests", running, phase=phase)
    _set("pdserve_kv_cache_usage", kv_usage, phase=phase)
    _set("pdserve_engine_step_seconds", step_s, phase=phase)


def set_parked(count: int, num_bytes: int) -> None:
    _set("pdserve_parked_kv", count)
    _set("pdserve_parked_kv_bytes", num_bytes)


RECOMPUTE_REASONS = ("deadline", "checksum", "prefill_failed", "pairing", "no_prefill_replica", "other")


def recompute_reason(reason: str | None) -> str:
    """The metric label of a free-text fallback reason (one of `RECOMPUTE_REASONS`)."""
    text = (reason or "").lower()
    for label, words in (("no_prefill_replica", ("no prefill replica",)), ("pairing", ("pairing", "pair ")),
                         ("prefill_failed", ("prefill ",)), ("checksum", ("checksum", "header", "mismatch")),
                         ("deadline", ("deadline", "timed out", "timeout", "late"))):
        if any(word in text for word in words):
            return label
    return "other"


def record_recompute(reason: str | None) -> None:
    _inc("pdserve_kv_recomputes_total", reason=recompute_reason(reason))
