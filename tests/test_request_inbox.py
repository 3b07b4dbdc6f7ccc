"""The request inbox (app/request_inbox.py): a request its message brought starts before its call attaches; a call
that comes first runs it and the late message is dropped; a call that leaves cancels the run; a run no call takes
is cancelled and its late call fails; strangers' messages are dropped unread; the run's error reaches the call."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from app import request_inbox
from app.errors import EngineError
from app.inbox_sender import InboxSender, sent_ahead
from app.request_inbox import RequestInbox


class Runs:
    """The replica's streaming method: records each run's start and end, yields `n` items (or raises)."""

    def __init__(self, n: int = 3, error: Exception | None = None, hold: asyncio.Event | None = None):
        self.n, self.error, self.hold = n, error, hold
        self.started: list[tuple] = []
        self.closed: list[tuple] = []

    async def __call__(self, *args, **kwargs):
        self.started.append(args)
        try:
            for i in range(self.n):
                if self.hold is not None and i == 1:
                    await self.hold.wait()
                yield (args[0], i)
            if self.error is not None:
                raise self.error
        finally:
            self.closed.append(args)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _inbox(runs: Runs) -> tuple[RequestInbox, InboxSender, dict]:
    inbox = RequestInbox(runs, host="127.0.0.1")
    inbox.bind()
    return inbox, ConnectedSender(), inbox.metadata()


class ConnectedSender(InboxSender):
    """The ingress's sender, waiting until the socket is connected (a sender queues nothing before: the call
    carries those requests)."""

    def _send(self, metadata, key, request):
        for _ in range(200):
            if super()._send(metadata, key, request):
                return True
            time.sleep(0.01)
        return False


def test_a_request_starts_from_its_message_before_its_call_attaches():
    async def run():
        runs = Runs()
        inbox, sender, meta = _inbox(runs)
        key = sender.send(meta, ("r1",), {"flag": True})
        await _until(lambda: runs.started)  # running with no call yet
        got = [item async for item in inbox.attach(key, ("r1",), {})]
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, got, stats

    runs, got, stats = asyncio.run(run())
    assert got == [("r1", 0), ("r1", 1), ("r1", 2)] and runs.started == [("r1",)]
    assert stats == {"num_started": 1, "num_call_first": 0, "num_cancelled": 0, "num_orphaned": 0, "num_dropped": 0,
                     "num_waiting": 0}


def test_a_call_that_comes_first_runs_the_request_and_the_late_message_is_dropped():
    async def run():
        runs = Runs()
        inbox, sender, meta = _inbox(runs)
        got = [item async for item in inbox.attach("k1", ("r2",), {})]
        inbox.start("k1", ("r2",), {})  # the message, late
        await asyncio.sleep(0.05)
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, got, stats

    runs, got, stats = asyncio.run(run())
    assert got == [("r2", 0), ("r2", 1), ("r2", 2)] and len(runs.started) == 1
    assert stats["num_call_first"] == 1 and stats["num_dropped"] == 1 and stats["num_started"] == 0


def test_a_call_that_leaves_early_cancels_its_run():
    async def run():
        runs = Runs(n=3, hold=asyncio.Event())  # the run stops after its first item until released
        inbox, sender, meta = _inbox(runs)
        key = sender.send(meta, ("r3",), {})
        chunks = aiter(inbox.attach(key, ("r3",), {}))
        first = await anext(chunks)
        await chunks.aclose()
        await _until(lambda: runs.closed)
        inbox.close(), sender.close()
        return first, runs

    first, runs = asyncio.run(run())
    assert first == ("r3", 0) and runs.closed == [("r3",)]


def test_a_run_no_call_takes_is_cancelled_and_its_late_call_fails(monkeypatch):
    monkeypatch.setattr(request_inbox, "ORPHAN_S", 0.1)

    async def run():
        runs = Runs(n=3, hold=asyncio.Event())
        inbox, sender, meta = _inbox(runs)
        key = sender.send(meta, ("r4",), {})
        await _until(lambda: runs.started)
        await asyncio.sleep(0.15)
        inbox.start("other", ("r5",), {})  # any later message sweeps
        await _until(lambda: ("r4",) in runs.closed)
        with pytest.raises(EngineError, match="cancelled before its call came"):
            async for _ in inbox.attach(key, ("r4",), {}):
                pass
        stats = inbox.stats()
        inbox.close(), sender.close()
        return stats

    stats = asyncio.run(run())
    assert stats["num_orphaned"] == 1


def test_a_message_without_the_secret_is_dropped_unread(monkeypatch):
    unpickled = []
    real_loads = pickle.loads
    monkeypatch.setattr(request_inbox.pickle, "loads", lambda data: unpickled.append(data) or real_loads(data))

    async def run():
        runs = Runs()
        inbox, sender, meta = _inbox(runs)
        sender.send({**meta, "inbox_secret": "00" * 16}, ("stranger",), {})
        sender.send(meta, ("r6",), {})
        await _until(lambda: runs.started)
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, stats

    runs, stats = asyncio.run(run())
    assert runs.started == [("r6",)] and stats["num_dropped"] == 1 and len(unpickled) == 1


def test_the_runs_error_reaches_its_call_after_its_items():
    async def run():
        runs = Runs(n=1, error=EngineError("engine died"))
        inbox, sender, meta = _inbox(runs)
        key = sender.send(meta, ("r7",), {})
        got = []
        with pytest.raises(EngineError, match="engine died"):
            async for item in inbox.attach(key, ("r7",), {}):
                got.append(item)
        inbox.close(), sender.close()
        return got

    assert asyncio.run(run()) == [("r7", 0)]


def test_a_replica_without_an_inbox_gets_no_message():
    sender = InboxSender()
    assert sender.send({"pair_id": "x"}, ("r",), {}) is None and sender.num_sent == 0


class FakeMethod:
    """`handle.generate` as `sent_ahead` uses it: `.remote(...)` gives a call (or raises `error`)."""

    def __init__(self, error: Exception | None = None):
        self.error, self.calls = error, []

    def remote(self, *args, **kwargs):
        if self.error is not None:
            raise self.error
        self.calls.append((args, kwargs))
        return FakeCall()


class FakeCall:
    cancelled = False

    def cancel(self):
        self.cancelled = True


class Selection:
    def __init__(self, metadata):
        self.replica_id, self.replica_metadata = "rep-1", metadata


def test_a_request_given_up_before_its_call_arrives_is_cancelled_by_the_ingress():
    async def run():
        runs = Runs(n=3, hold=asyncio.Event())
        inbox, sender, meta = _inbox(runs)
        method = FakeMethod()
        call = sent_ahead(method, sender, Selection(meta), ("x",), {"flag": 1})("r8")
        await _until(lambda: runs.started)
        (args, kwargs), = method.calls
        assert args == ("r8", "x") and kwargs["replica_pin"] == "rep-1" and kwargs["inbox_key"]
        call.cancel()  # the client left while the call waited in Serve's router: it never reaches the replica
        await _until(lambda: runs.closed)
        stats = inbox.stats()
        inbox.start(kwargs["inbox_key"], ("r8", "x"), {})  # a duplicate of the message, late: dropped
        inbox.close(), sender.close()
        return runs, call, stats

    runs, call, stats = asyncio.run(run())
    assert runs.started == [("r8", "x")] and runs.closed == [("r8", "x")] and call._call.cancelled
    assert stats["num_cancelled"] == 1 and stats["num_waiting"] == 0


def test_a_call_that_fails_to_go_cancels_the_request_it_sent_ahead():
    async def run():
        runs = Runs(n=3, hold=asyncio.Event())
        inbox, sender, meta = _inbox(runs)
        with pytest.raises(RuntimeError, match="router gone"):
            sent_ahead(FakeMethod(RuntimeError("router gone")), sender, Selection(meta), (), {})("r9")
        await _until(lambda: inbox.stats()["num_cancelled"] + inbox.stats()["num_dropped"] >= 1)
        await asyncio.sleep(0.05)
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, stats

    runs, stats = asyncio.run(run())
    assert stats["num_waiting"] == 0 and runs.started == runs.closed  # never ran, or ran and was stopped


def test_a_message_older_than_its_bound_is_dropped(monkeypatch):
    async def run():
        runs = Runs()
        inbox, sender, meta = _inbox(runs)
        monkeypatch.setattr(request_inbox, "MAX_AGE_S", -1.0)  # every message is too old
        sender.send(meta, ("stale",), {})
        await _until(lambda: inbox.stats()["num_dropped"] == 1)
        inbox.close(), sender.close()
        return runs

    assert asyncio.run(run()).started == []


def test_keywords_only_the_message_carries_reach_the_run_and_a_unary_call_awaits_its_result():
    # Prefill's two methods share one run body; the message says which one it stands for (`ahead`), the call's own
    # method says it for the call. A unary call (Prefill.prefill) is awaited through the wrapper.
    seen: list[dict] = []

    async def body(request, *args, **kwargs):
        seen.append(kwargs)
        yield request

    class UnaryCall(FakeCall):
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return "result"

    class UnaryMethod(FakeMethod):
        def remote(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return UnaryCall()

    async def run():
        inbox, sender, meta = _inbox(body)
        method = UnaryMethod()
        call = sent_ahead(method, sender, Selection(meta), ("d",), {}, ahead={"first_token": True})("r10")
        await _until(lambda: seen)
        result = await call
        inbox.close(), sender.close()
        return method.calls, result

    calls, result = asyncio.run(run())
    (_, call_kwargs), = calls
    assert seen == [{"first_token": True, "replica_pin": "rep-1"}] and "first_token" not in call_kwargs
    assert call_kwargs["inbox_key"] and result == "result"


@pytest.mark.parametrize("unary", [True, False])
def test_a_call_that_fails_before_reaching_the_replica_cancels_the_run_its_message_started(unary):
    # Serve's queue was full, or the call went to another replica that refused the pin: the run the message started
    # would otherwise go on (a prefill would still send its KV) with no one waiting for it
    class FailingCall(FakeCall):
        def __await__(self):
            yield from asyncio.sleep(0.05).__await__()
            raise RuntimeError("queue full")

        def __aiter__(self):
            return self._items()

        async def _items(self):
            await asyncio.sleep(0.05)
            raise RuntimeError("queue full")
            yield

    class FailingMethod(FakeMethod):
        def remote(self, *args, **kwargs):
            return FailingCall()

    async def run():
        runs = Runs(n=3, hold=asyncio.Event())
        inbox, sender, meta = _inbox(runs)
        call = sent_ahead(FailingMethod(), sender, Selection(meta), ("x",), {})("r11")
        await _until(lambda: runs.started)
        with pytest.raises(RuntimeError, match="queue full"):
            if unary:
                await call
            else:
                async for _ in call:
                    pass
        await _until(lambda: runs.closed)
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, stats

    runs, stats = asyncio.run(run())
    assert runs.closed == [("r11", "x")] and stats["num_cancelled"] == 1 and stats["num_waiting"] == 0


def test_a_message_repeated_after_its_call_attached_starts_nothing():
    async def run():
        runs = Runs(n=2)
        inbox, sender, meta = _inbox(runs)
        method = FakeMethod()
        sent_ahead(method, sender, Selection(meta), ("x",), {})("r12")
        await _until(lambda: runs.started)
        (_, kwargs), = method.calls
        items = [item async for item in inbox.attach(kwargs["inbox_key"], ("r12", "x"), {})]
        inbox.start(kwargs["inbox_key"], ("r12", "x"), {})  # the same message again
        await asyncio.sleep(0.05)
        stats = inbox.stats()
        inbox.close(), sender.close()
        return runs, items, stats

    runs, items, stats = asyncio.run(run())
    assert items == [("r12", 0), ("r12", 1)] and runs.started == [("r12", "x")] and stats["num_waiting"] == 0


def test_a_run_no_call_takes_is_cancelled_by_the_timer_when_no_later_message_comes(monkeypatch):
    monkeypatch.setattr(request_inbox, "ORPHAN_S", 0.1)
    monkeypatch.setattr(request_inbox, "SWEEP_S", 0.05)

    async def run():
        runs = Runs(n=3, hold=asyncio.Event())
        inbox, sender, meta = _inbox(runs)
        sender.send(meta, ("r13",), {})
        await _until(lambda: ("r13",) in runs.closed)  # nothing else arrives: only the timer can cancel it
        stats = inbox.stats()
        await asyncio.sleep(0.12)  # the timer stops once no run waits
        timer = inbox._sweep_timer
        inbox.close(), sender.close()
        return stats, timer

    stats, timer = asyncio.run(run())
    assert stats["num_orphaned"] == 1 and stats["num_waiting"] == 0 and timer is None


def test_settled_keys_are_forgotten_in_the_order_they_were_last_settled(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(request_inbox.time, "monotonic", lambda: clock[0])
    inbox = RequestInbox(Runs(), host="127.0.0.1")
    inbox.cancel("a")  # settled at 1000 (expired: its late call fails)
    clock[0] += 10
    inbox.cancel("b")  # at 1010
    clock[0] += 10
    inbox.cancel("a")  # settled again at 1020: kept until 1020 + 2 * ORPHAN_S
    clock[0] = 1015 + 2 * request_inbox.ORPHAN_S  # past b's end, before a's second one
    inbox._keys.expire()
    assert list(inbox._keys.settled) == ["a"]
    clock[0] = 1021 + 2 * request_inbox.ORPHAN_S
    inbox._keys.expire()
    assert not inbox._keys.settled


def test_keys_settled_by_calls_alone_are_forgotten_too(monkeypatch):
    # No message ever starts a run (e.g. all dropped as too old): the calls themselves must expire old keys.
    clock = [1000.0]
    monkeypatch.setattr(request_inbox.time, "monotonic", lambda: clock[0])

    async def run():
        inbox = RequestInbox(Runs(n=1), host="127.0.0.1")
        first = [item async for item in inbox.attach("k1", ("r1",), {})]  # the call came first
        clock[0] += 2 * request_inbox.ORPHAN_S + 1
        second = [item async for item in inbox.attach("k2", ("r2",), {})]
        return first, second, list(inbox._keys.settled)

    first, second, settled = asyncio.run(run())
    assert first == [("r1", 0)] and second == [("r2", 0)] and settled == ["k2"]
