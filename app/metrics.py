"""Prometheus metrics through `ray.serve.metrics` (exported on each node's Ray metrics port).

Created lazily in the process that records them (a Serve replica); outside Ray (unit tests) every
call is a no-op. Names, tags and units are listed in the README.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    try:
        import ray
        from ray.serve import metrics

        if not ray.is_initialized():
            return None
        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.debug("metric %s unavailable", name, exc_info=True)
        return None


def record_fallback(kind: str) -> None:
    """A request that did not take the plain path: `retried_other_prefill`, `recomputed`, `failed_fast`,
    `retried_dead_replica`."""
    counter = _metric("Counter", "pdserve_fallbacks_total", "Requests that fell back, by kind.", ("kind",))
    if counter is not None:
        counter.inc(tags={"kind": kind})


def set_breaker_state(target: str, state: int) -> None:
    """Circuit-breaker state of a prefill replica or pair: 0 closed, 1 half-open, 2 open."""
    gauge = _metric("Gauge", "pdserve_circuit_breaker_state",
                    "Circuit breaker per prefill replica or prefill->decode pair (0 closed, 1 half-open, 2 open).",
                    ("target",))
    if gauge is not None:
        gauge.set(state, tags={"target": target})
