"""Circuit breakers: stop routing to a prefill replica (or a pair) that keeps failing, then probe it.

States, per key (a prefill replica id, or "prefill_id->decode_id" for a pair):
    CLOSED     normal; failures inside `window_s` are counted
    OPEN       `failure_threshold` failures within `window_s`: the router routes around it for `open_s`
    HALF_OPEN  `open_s` passed: exactly one request (the probe) may go; its success closes the
               breaker, its failure opens it again
The ingress process holds one `CircuitBreakers` (the request router runs in the caller's process, so
`PinnableRouter` and the orchestrator's `Handoff` share it). `snapshot()` feeds metrics and stats.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from app.metrics import set_breaker_state


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class _Breaker:
    state: BreakerState = BreakerState.CLOSED
    failures: deque = field(default_factory=deque)  # monotonic times of recent failures
    opened_at: float = 0.0
    probe_in_flight: bool = False
    num_opened: int = 0


class CircuitBreakers:
    def __init__(self, failure_threshold: int = 3, window_s: float = 30.0, open_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.open_s = open_s
        self._clock = clock
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """May a request go to `key` now? (Takes the probe slot of a half-open breaker.)"""
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is None or breaker.state == BreakerState.CLOSED:
                return True
            if breaker.state == BreakerState.OPEN and self._clock() - breaker.opened_at >= self.open_s:
                breaker.state = BreakerState.HALF_OPEN
                set_breaker_state(key, BreakerState.HALF_OPEN)
            if breaker.state == BreakerState.HALF_OPEN and not breaker.probe_in_flight:
                breaker.probe_in_flight = True
                return True
            return False

    def is_open(self, key: str) -> bool:
        """Without taking a probe slot: is `key` to be routed around right now?"""
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is None or breaker.state == BreakerState.CLOSED:
                return False
            if breaker.state == BreakerState.OPEN:
                return self._clock() - breaker.opened_at < self.open_s
            return breaker.probe_in_flight

    def record_success(self, key: str) -> None:
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is not None:
                if breaker.state != BreakerState.CLOSED:
                    set_breaker_state(key, BreakerState.CLOSED)
                breaker.state, breaker.probe_in_flight = BreakerState.CLOSED, False
                breaker.failures.clear()

    def record_failure(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            if key not in self._breakers:  # first failure: the target shows up on dashboards, closed
                set_breaker_state(key, BreakerState.CLOSED)
            breaker = self._breakers.setdefault(key, _Breaker())
            if breaker.state == BreakerState.HALF_OPEN:
                self._open(key, breaker, now)
                return
            breaker.failures.append(now)
            while breaker.failures and now - breaker.failures[0] > self.window_s:
                breaker.failures.popleft()
            if breaker.state == BreakerState.CLOSED and len(breaker.failures) >= self.failure_threshold:
                self._open(key, breaker, now)

    def _open(self, key: str, breaker: _Breaker, now: float) -> None:
        breaker.state, breaker.opened_at, breaker.probe_in_flight = BreakerState.OPEN, now, False
        breaker.failures.clear()
        breaker.num_opened += 1
        set_breaker_state(key, BreakerState.OPEN)

    def reset(self) -> None:
        """Close every breaker (an operator who fixed the cause, or a test, starts clean)."""
        with self._lock:
            keys = list(self._breakers)
            self._breakers.clear()
        for key in keys:
            set_breaker_state(key, BreakerState.CLOSED)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {key: {"state": b.state.name.lower(), "recent_failures": len(b.failures),
                          "times_opened": b.num_opened} for key, b in self._breakers.items()}


BREAKERS = CircuitBreakers()  # the ingress process's breakers; `configure` sets them from config


def configure(failure_threshold: int, window_s: float, open_s: float) -> CircuitBreakers:
    BREAKERS.failure_threshold, BREAKERS.window_s, BREAKERS.open_s = failure_threshold, window_s, open_s
    return BREAKERS
