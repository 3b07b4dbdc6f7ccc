"""The token bus: a request's tokens go from the engine thread straight to the ingress.

Why: a Serve streaming call costs the engine replica's process Python work per item (Serve's generator
machinery, Ray's per-item report), and that work takes the GIL from the thread that steps the engine. Measured
on the default tiny model (2 cores, docs/overhead.md): one engine step took 5.1 ms inside a decode replica that
streamed every token through Serve against 3.5 ms when it did not, and 19 ms against 7.9 ms with 16 streams.
The first token too: through the replica's event loop and a Serve stream item it took 4-5 ms more of a lone
request's time to first token than this bus (traced on the 2-core machine, 2026-11-29). So the Serve call carries
a request's errors, its cancellation and its end; every delta, the first with its `KVReport`, goes over this bus:
one ZeroMQ message per engine step and ingress, however many requests it holds, sent by the engine thread itself
(no event-loop hop, no Serve item).

Life cycle:
1. The ingress binds one PULL socket (`TokenBus`, on its loop, at the first request) on its node's address
   and gives each streamed request a `BusTarget`: the socket's endpoint, the bus's secret and a fresh key.
2. The engine replica (`BusSender`, engine thread only) connects a PUSH socket per endpoint and sends, for every
   step, `[secret, pickle([(key, GenerationChunk), ...])]`: one frame list per ingress.
3. The ingress's reader checks the secret (a message without it is dropped unread: nothing unpickles what a
   stranger sent) and hands each chunk to its key's `BusStream`; chunks of keys it no longer holds (a cancelled
   request) are dropped.
4. `BusStream` yields the bus's chunks (waiting ones joined into one) until the last (`finish_reason`), and raises
   what the Serve call raises (engine error, replica death); a chunk the call itself gives is passed on too.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from app.errors import EngineError
from app.inbox_sender import InboxSender, sent_ahead
from app.messages import BusTarget, GenerateRequest, GenerationChunk, pop_joined
from app.push_sockets import PushSockets

logger = logging.getLogger(__name__)

# A Serve call that ended normally has sent its last chunk on the bus before it returned; this long at most
# for it to arrive (it is milliseconds behind, or the socket is broken).
LAST_CHUNK_WAIT_S = 10.0
# Messages a PUSH socket queues for an ingress that is not reading (gone): past it, sends are dropped.
SEND_HWM = 100_000
# A sender closes its socket to an ingress it sent nothing for this long (a replaced ingress replica's endpoint
# would otherwise keep a socket that retries the connection forever).
IDLE_CLOSE_S = 120.0


@dataclass
class _Inbox:
    """One request's chunks from the bus; touched only on the ingress's loop."""

    items: deque = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class TokenBus:
    """The ingress's end: one PULL socket and its reader task, bound at the first `open()` (on the running loop)."""

    def __init__(self, host: str | None = None):
        self.host = host  # None: this node's address as Ray knows it
        self.secret = secrets.token_bytes(16)
        self.endpoint: str | None = None
        self._inboxes: dict[int, _Inbox] = {}
        self._keys = itertools.count(1)
        self._socket: Any = None
        self._reader: asyncio.Task | None = None
        self.num_messages = 0
        self.num_dropped = 0  # chunks for keys no longer held, and messages without the secret
        self.requests = InboxSender()  # requests sent ahead of their Serve calls (app/request_inbox.py)

    def _bind(self) -> None:
        import zmq
        import zmq.asyncio

        host = self.host
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 0)  # never make a sender's engine thread wait for this reader
        socket.setsockopt(zmq.LINGER, 0)
        port = socket.bind_to_random_port(f"tcp://{host}")
        self._socket, self.endpoint = socket, f"tcp://{host}:{port}"
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def open(self) -> tuple[BusTarget, _Inbox]:
        if self._socket is None:
            self._bind()
        assert self.endpoint is not None
        key = next(self._keys)
        inbox = self._inboxes[key] = _Inbox()
        return BusTarget(self.endpoint, self.secret, key), inbox

    def close_key(self, key: int) -> None:
        self._inboxes.pop(key, None)

    def call(self, request: GenerateRequest, start: Callable[[GenerateRequest], Any]) -> BusStream:
        """Start a streaming call (`start(request)`: a Serve call whose replica passes `request.reply_to` to its
        engine) with a key on this bus; the answer iterates over its chunks, from the call and the bus."""
        target, inbox = self.open()
        return BusStream(self, target.key, inbox, start(replace(request, reply_to=target)))

    async def _read(self) -> None:
        while True:
            try:
                secret, payload = await self._socket.recv_multipart()
            except Exception:  # noqa: BLE001 - a malformed message must not stop the reader
                logger.exception("token bus: receive failed")
                await asyncio.sleep(0.01)
                continue
            if not hmac.compare_digest(secret, self.secret):
                self.num_dropped += 1
                continue
            self.num_messages += 1
            for key, chunk in pickle.loads(payload):
                inbox = self._inboxes.get(key)
                if inbox is None:
                    self.num_dropped += 1
                    continue
                inbox.items.append(chunk)
                inbox.ready.set()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._reader = None
        self.requests.close()

    def stats(self) -> dict[str, int]:
        return {"num_messages": self.num_messages, "num_dropped": self.num_dropped, "num_open": len(self._inboxes),
                "num_requests_ahead": self.requests.num_sent, "num_requests_not_ahead": self.requests.num_refused}


class BusStream:
    """A Serve streaming call whose chunks come over the bus; iterate it like the call."""

    def __init__(self, bus: TokenBus, key: int, inbox: _Inbox, call: Any):
        self._bus, self._key, self._inbox, self._call = bus, key, inbox, call

    def cancel(self) -> None:
        self._call.cancel()
        self._bus.close_key(self._key)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            async for chunk in self._run():
                yield chunk
            finished = True
        finally:
            if not finished:  # the consumer left, or the call failed: stop generating
                self._call.cancel()
            self._bus.close_key(self._key)

    async def _run(self) -> AsyncIterator[GenerationChunk]:
        call_it = self._call.__aiter__()
        # the chunks come by the bus, while the call is watched: it raises an error, or ends after the last chunk
        inbox = self._inbox
        call_next: asyncio.Future | None = asyncio.ensure_future(_next(call_it))
        deadline: float | None = None  # once the call ended: when the last chunk must have come
        try:
            while True:
                if inbox.items:
                    chunk = pop_joined(inbox.items)
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                    continue
                inbox.ready.clear()
                if call_next is None:
                    assert deadline is not None
                    try:
                        await asyncio.wait_for(inbox.ready.wait(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        raise EngineError("the engine replica's stream ended, but its last chunk never arrived "
                                          f"within {LAST_CHUNK_WAIT_S} s") from None
                    continue
                ready = asyncio.ensure_future(inbox.ready.wait())
                try:
                    await asyncio.wait([ready, call_next], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ready.cancel()
                if call_next.done():
                    extra = call_next.result()  # raises the call's error
                    if extra is _END:
                        call_next, deadline = None, time.monotonic() + LAST_CHUNK_WAIT_S
                    else:  # the call gave another chunk (not how replicas answer): pass it on
                        call_next = asyncio.ensure_future(_next(call_it))
                        yield extra
                        if extra.finish_reason is not None:
                            return
        finally:
            if call_next is not None and not call_next.done():
                call_next.cancel()


_END = object()


async def _next(call_it: Any) -> Any:
    """The call's next item, or `_END`."""
    try:
        return await call_it.__anext__()
    except StopAsyncIteration:
        return _END


def pinned_start(method: Any, bus: TokenBus | None, selection: Any, args: tuple, kwargs: dict[str, Any],
                 ahead: dict[str, Any] | None = None) -> Callable[[GenerateRequest], Any]:
    """`method.remote(request, *args, **kwargs)` pinned to the picked replica; with a bus, the request goes ahead
    through the replica's request inbox (app/request_inbox.py), so its engine starts it before the call arrives
    (`ahead`: keywords only that message carries, `sent_ahead`)."""
    return sent_ahead(method, bus.requests if bus is not None else None, selection, args, kwargs, ahead)


def streamed(bus: TokenBus | None, request: GenerateRequest, start: Callable[[GenerateRequest], Any]) -> Any:
    """`start(request)` with its later chunks on `bus`, or as it is without one (`token_bus.enabled: false`)."""
    return start(request) if bus is None else bus.call(request, start)


class BusSender:
    """The engine replica's end: PUSH sockets per ingress endpoint. Engine thread only (ZeroMQ sockets are
    not thread-safe)."""

    def __init__(self) -> None:
        self.sockets = PushSockets(SEND_HWM, IDLE_CLOSE_S)
        self.num_sent = 0
        self.num_dropped = 0

    def send(self, batches: dict[str, tuple[bytes, list[tuple[int, GenerationChunk]]]]) -> None:
        """One message per endpoint: `{endpoint: (secret, [(key, chunk), ...])}`."""
        for endpoint, (secret, chunks) in batches.items():
            if self.sockets.send(endpoint, [secret, pickle.dumps(chunks, protocol=pickle.HIGHEST_PROTOCOL)]):
                self.num_sent += 1
            else:  # that ingress stopped reading (gone): its requests fail through Serve
                self.num_dropped += 1

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; messages not yet sent are dropped after `linger_ms` (their requests end anyway)."""
        self.sockets.close(linger_ms)
