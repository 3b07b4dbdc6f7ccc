"""The token bus (app/token_bus.py): every chunk by the bus, in order; errors and the end by the call; strangers'
messages dropped unread. Then the engine driver's half: with a `reply_to` its stream carries no chunk, the bus all of
them (the first with what `on_first` added), and they are the tokens a plain stream gives."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest
import zmq

from app import token_bus
from app.errors import EngineError
from app.messages import GenerateRequest, GenerationChunk, KVReport, SamplingSpec
from app.token_bus import BusSender, TokenBus, streamed
from tests.helpers import prompt_of_length


def _chunk(i: int, last: bool = False) -> GenerationChunk:
    return GenerationChunk(text=f"t{i} ", token_ids=(i,), finish_reason="length" if last else None,
                           num_prompt_tokens=3)


class FakeCall:
    """A Serve streaming call as the replica answers with a bus: no chunk (or `first`), then the end (or an error)."""

    def __init__(self, request: GenerateRequest, first: GenerationChunk | None = None, error: Exception | None = None):
        self.request, self.first, self.error = request, first, error
        self.finish = asyncio.Event()  # set when the replica's stream ends
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.finish.set()

    def __aiter__(self):
        return self._items()

    async def _items(self):
        if self.first is not None:
            yield self.first
        await self.finish.wait()
        if self.error is not None:
            raise self.error


def _send_from_thread(target, batches: list[list[tuple[int, GenerationChunk]]], secret: bytes | None = None) -> None:
    """What the engine thread does: one message per step, from another thread (the sender's only thread)."""
    def run():
        sender = BusSender()
        for chunks in batches:
            sender.send({target.endpoint: (secret or target.secret, chunks)})
        sender.close(linger_ms=5000)  # what is queued still goes out

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


REQUEST = GenerateRequest("r1", (1, 2, 3), SamplingSpec(max_tokens=8))


def _open(bus: TokenBus, error: Exception | None = None, send_first: bool = True
          ) -> tuple[token_bus.BusStream, FakeCall]:
    """A streamed call on `bus` whose replica sends chunk 0 on the bus (`send_first`); its call ends when `finish` is
    set (raising `error`)."""
    calls: list[FakeCall] = []
    stream = bus.call(REQUEST, lambda r: calls.append(FakeCall(r, error=error)) or calls[0])
    target = calls[0].request.reply_to
    if send_first:
        _send_from_thread(target, [[(target.key, _chunk(0))]])
    return stream, calls[0]


def test_chunks_come_by_the_bus_in_order_and_waiting_ones_are_joined():
    async def run():
        bus = TokenBus("127.0.0.1")
        stream, call = _open(bus)
        target = call.request.reply_to
        assert target is not None and target.endpoint.startswith("tcp://127.0.0.1:")
        # steps 0-2 land before the consumer looks: they come out as one chunk; then 3 and the last one
        _send_from_thread(target, [[(target.key, _chunk(1))], [(target.key, _chunk(2))]])
        while bus.stats()["num_messages"] < 3:
            await asyncio.sleep(0.01)
        out = []
        async for chunk in stream:
            out.append(chunk)
            if len(out) == 1:
                _send_from_thread(target, [[(target.key, _chunk(3))], [(target.key, _chunk(4, last=True))]])
                call.finish.set()
        bus.close()
        return out, bus.stats(), call.cancelled

    out, stats, cancelled = asyncio.run(run())
    assert out[0].token_ids == (0, 1, 2)
    assert sum((c.token_ids for c in out), ()) == (0, 1, 2, 3, 4)
    assert out[-1].finish_reason == "length" and "".join(c.text for c in out) == "t0 t1 t2 t3 t4 "
    assert stats["num_open"] == 0 and stats["num_messages"] == 5 and not cancelled


def test_a_chunk_the_call_gives_itself_is_passed_on_before_the_bus_takes_over():
    async def run():
        bus = TokenBus("127.0.0.1")
        calls: list[FakeCall] = []
        stream = bus.call(REQUEST, lambda r: calls.append(FakeCall(r, first=_chunk(0))) or calls[0])
        out = []
        async for chunk in stream:
            out.append(chunk)
            if len(out) == 1:
                target = calls[0].request.reply_to
                _send_from_thread(target, [[(target.key, _chunk(1, last=True))]])
                calls[0].finish.set()
        bus.close()
        return out

    assert [c.token_ids for c in asyncio.run(run())] == [(0,), (1,)]


def test_a_message_without_the_secret_is_dropped_unread(monkeypatch):
    unpickled = []
    real_loads = pickle.loads
    monkeypatch.setattr(token_bus.pickle, "loads", lambda data: unpickled.append(data) or real_loads(data))

    async def run():
        bus = TokenBus("127.0.0.1")
        stream, call = _open(bus)
        target = call.request.reply_to
        _send_from_thread(target, [[(target.key, _chunk(9, last=True))]], secret=b"not the secret!!")
        _send_from_thread(target, [[(target.key, _chunk(1, last=True))]])
        call.finish.set()
        out = [chunk async for chunk in stream]
        bus.close()
        return out, bus.stats()

    out, stats = asyncio.run(run())
    assert sum((c.token_ids for c in out), ()) == (0, 1)
    assert stats["num_dropped"] == 1 and stats["num_messages"] == 2 and len(unpickled) == 2


def test_an_error_of_the_call_after_the_first_chunk_reaches_the_consumer():
    async def run():
        bus = TokenBus("127.0.0.1")
        stream, call = _open(bus, EngineError("step failed"))
        out = []
        with pytest.raises(EngineError, match="step failed"):
            async for chunk in stream:
                out.append(chunk)
                call.finish.set()
        bus.close()
        return out, bus.stats()

    out, stats = asyncio.run(run())
    assert [c.token_ids for c in out] == [(0,)] and stats["num_open"] == 0


def test_a_call_that_ends_without_its_last_chunk_fails_after_the_wait(monkeypatch):
    monkeypatch.setattr(token_bus, "LAST_CHUNK_WAIT_S", 0.2)

    async def run():
        bus = TokenBus("127.0.0.1")
        stream, call = _open(bus, send_first=False)  # the replica's call ended, no chunk came
        call.finish.set()
        try:
            with pytest.raises(EngineError, match="last chunk never arrived"):
                async for _ in stream:
                    pass
        finally:
            bus.close()

    asyncio.run(run())


def test_a_consumer_that_leaves_cancels_the_call_and_later_chunks_are_dropped():
    async def run():
        bus = TokenBus("127.0.0.1")
        stream, call = _open(bus)
        target = call.request.reply_to
        chunks = aiter(stream)
        assert (await anext(chunks)).token_ids == (0,)
        await chunks.aclose()
        _send_from_thread(target, [[(target.key, _chunk(1))]])
        for _ in range(100):
            if bus.stats()["num_messages"] == 2:
                break
            await asyncio.sleep(0.01)
        bus.close()
        return bus.stats(), call.cancelled

    stats, cancelled = asyncio.run(run())
    assert cancelled and stats == {"num_messages": 2, "num_dropped": 1, "num_open": 0, "num_requests_ahead": 0,
                                   "num_requests_not_ahead": 0}


def test_without_a_bus_the_call_is_used_as_it_is():
    call = object()
    assert streamed(None, REQUEST, lambda r: call if r.reply_to is None else None) is call


def test_the_driver_sends_every_delta_to_the_bus_the_first_with_what_on_first_added(driver, tokenizer):
    prompt = prompt_of_length(tokenizer, 40)
    sampling = SamplingSpec(max_tokens=12, temperature=0, ignore_eos=True)

    async def run():
        plain = []
        async for chunk in driver.generate("bus-plain", prompt, sampling):
            plain.extend(chunk.token_ids)
        bus = TokenBus("127.0.0.1")
        by_call = []

        class Call:  # the replica's stream, as Serve would carry it
            def __init__(self, request):
                self.request = request

            def cancel(self):
                pass

            async def __aiter__(self):
                async for chunk in driver.generate("bus-1", prompt, sampling, reply_to=self.request.reply_to,
                                                   on_first=lambda c: c.with_report(KVReport(kv_source="local"))):
                    by_call.append(chunk)
                    yield chunk

        stream = streamed(bus, GenerateRequest("bus-1", tuple(prompt), sampling), Call)
        got, reports = [], []
        async for chunk in stream:
            got.extend(chunk.token_ids)
            reports.append(chunk.report)
        bus.close()
        return plain, got, by_call, reports, bus.stats()

    plain, got, by_call, reports, stats = asyncio.run(run())
    assert got == plain and len(plain) == 12
    assert by_call == []  # the call carried no token: its end only
    assert reports[0] == KVReport(kv_source="local") and reports[1:] == [None] * (len(reports) - 1)
    assert stats["num_messages"] >= 1 and stats["num_open"] == 0


def test_an_on_first_that_fails_fails_its_request_and_the_driver_serves_on(driver, tokenizer):
    prompt = prompt_of_length(tokenizer, 20)
    sampling = SamplingSpec(max_tokens=4, temperature=0, ignore_eos=True)

    def broken(chunk):
        raise KeyError("gone")

    async def run():
        with pytest.raises(EngineError, match="reporting on the first output failed"):
            async for _ in driver.generate("bus-broken", prompt, sampling, on_first=broken):
                pass
        return [t async for c in driver.generate("bus-after", prompt, sampling) for t in c.token_ids]

    assert len(asyncio.run(run())) == 4 and driver.is_alive()


def test_the_sender_drops_rather_than_blocks_when_an_ingress_stops_reading(monkeypatch):
    monkeypatch.setattr(token_bus, "SEND_HWM", 2)
    context = zmq.Context.instance()
    sink = context.socket(zmq.PULL)
    sink.setsockopt(zmq.RCVHWM, 1)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    sender = BusSender()
    try:
        for i in range(5000):  # never read: the queues fill, then sends are dropped (the engine thread never waits)
            sender.send({f"tcp://127.0.0.1:{port}": (b"s" * 16, [(1, _chunk(i))])})
        assert sender.num_dropped > 0 and sender.num_sent + sender.num_dropped == 5000
    finally:
        sender.close()
        sink.close(linger=0)


def test_the_sender_closes_sockets_to_an_ingress_it_no_longer_sends_to(monkeypatch):
    monkeypatch.setattr(token_bus, "IDLE_CLOSE_S", 0.05)
    sender = BusSender()
    try:
        sender.send({"tcp://127.0.0.1:1": (b"s" * 16, [(1, _chunk(0))])})  # a gone ingress: nothing listens there
        assert len(sender.sockets.endpoints()) == 1
        import time

        time.sleep(0.1)
        sender.send({"tcp://127.0.0.1:2": (b"s" * 16, [(1, _chunk(0))])})  # the sweep runs on a later send
        assert sender.sockets.endpoints() == ["tcp://127.0.0.1:2"]
    finally:
        sender.close()
