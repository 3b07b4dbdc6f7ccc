"""Circuit breakers on a fake clock: open after N failures in the window, route around, one probe."""

from __future__ import annotations

from app.circuit import BreakerState, CircuitBreakers


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_within_window_only():
    clock = _Clock()
    breakers = CircuitBreakers(failure_threshold=3, window_s=10, open_s=5, clock=clock)
    breakers.record_failure("p1")
    clock.now = 11  # the first failure falls out of the window
    breakers.record_failure("p1")
    breakers.record_failure("p1")
    assert breakers.allow("p1") and not breakers.is_open("p1")
    breakers.record_failure("p1")
    assert breakers.is_open("p1") and not breakers.allow("p1")
    assert breakers.snapshot()["p1"] == {"state": "open", "recent_failures": 0, "times_opened": 1}
    assert breakers.allow("p2")  # others are untouched


def test_half_open_lets_exactly_one_probe_and_its_result_decides():
    clock = _Clock()
    breakers = CircuitBreakers(failure_threshold=1, window_s=10, open_s=5, clock=clock)
    breakers.record_failure("p1")
    assert not breakers.allow("p1")
    clock.now = 6
    assert not breakers.is_open("p1")  # routable again: the next request is the probe
    assert breakers.allow("p1")  # the probe
    assert not breakers.allow("p1") and breakers.is_open("p1")  # nobody else while it is out
    breakers.record_failure("p1")  # probe failed: open again, for another open_s
    assert breakers.snapshot()["p1"]["state"] == "open" and breakers.snapshot()["p1"]["times_opened"] == 2
    clock.now = 12
    assert breakers.allow("p1")
    breakers.record_success("p1")  # probe succeeded: closed
    assert breakers.snapshot()["p1"]["state"] == BreakerState.CLOSED.name.lower()
    assert breakers.allow("p1") and breakers.allow("p1")


def test_reset_closes_every_breaker():
    breakers = CircuitBreakers(failure_threshold=1, window_s=10, open_s=60, clock=_Clock())
    breakers.record_failure("p1")
    assert breakers.is_open("p1")
    breakers.reset()
    assert not breakers.is_open("p1") and breakers.snapshot() == {}
