"""Where an engine's outputs go: each request's stream on its consumer's event loop, or the ingress's token bus.

The driver thread (app/engine.py) hands every step's outputs to `Outlet.deliver_step`: a request's first chunk passes
through its `on_first` (what the replica reports about it), then, with a bus target, every chunk goes to the bus in
one message per ingress per step (app/token_bus.py) and the stream gets only its end (`SENT`); without one, chunks go
to the stream in one loop callback per consumer loop. `Stream` is touched on its consumer's loop; `Outlet.streams` is
changed on consumer loops and read by the driver thread; the rest of `Outlet` runs on the driver thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine_setup import to_chunk
from app.errors import EngineError
from app.messages import BusTarget, GenerationChunk, pop_joined
from app.token_bus import BusSender

logger = logging.getLogger(__name__)

SENT = object()  # a stream's end marker: its last delta went to the bus


@dataclass
class Stream:
    """One request's outputs on their way to its consumer; touched only on the consumer's loop."""

    loop: asyncio.AbstractEventLoop
    bus: BusTarget | None = None  # where its chunks go (None: all through this stream)
    on_first: Callable[[GenerationChunk], GenerationChunk] | None = None  # applied to the first chunk (driver thread)
    items: deque = field(default_factory=deque)  # GenerationChunk | BaseException | SENT, oldest first
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False  # its first chunk was delivered (driver thread only)

    def put(self, item: GenerationChunk | BaseException) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self) -> GenerationChunk | BaseException:
        """The next item; chunks that are already waiting travel on as one (never holding the first back)."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return pop_joined(self.items)


class Outlet:
    """Where each request's outputs go: its stream on its consumer's loop, or its token bus.
    `streams` is changed on consumer loops and read by the driver thread; the rest runs on the driver thread."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.bus = BusSender()

    def deliver(self, request_id: str, item: Any) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and not _post(stream.loop, stream.put, item):
            self.streams.pop(request_id, None)

    def deliver_step(self, outputs: list[Any]) -> list[str]:
        """Hand one step's outputs to their consumers; returns the requests whose consumer's loop is gone
        (closed before the consumer stopped its stream): nobody will read them, the driver aborts them."""
        # One loop callback per consumer loop, not one per request: each wake-up costs this thread the GIL.
        # Deltas of requests with a bus go out as one message per ingress, from this thread: the first one too, so
        # that the time to first token pays neither the replica's event loop nor a Serve stream item.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Any]]] = {}
        by_bus: dict[str, tuple[bytes, list[tuple[int, GenerationChunk]]]] = {}
        for output in outputs:
            stream = self.streams.get(output.request_id)
            if stream is None:
                continue
            chunk: GenerationChunk | BaseException = to_chunk(output)
            if not stream.started:
                stream.started = True
                chunk = _first(stream, chunk)
            if stream.bus is not None and isinstance(chunk, GenerationChunk):
                by_bus.setdefault(stream.bus.endpoint, (stream.bus.secret, []))[1].append((stream.bus.key, chunk))
                if chunk.finish_reason is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, SENT))
                continue
            by_loop.setdefault(stream.loop, []).append((stream, chunk))
        if by_bus:
            self.bus.send(by_bus)
        orphans = []
        for loop, batch in by_loop.items():
            if not _post(loop, _put_all, batch):
                orphans += [request_id for request_id, stream in list(self.streams.items()) if stream.loop is loop]
        for request_id in orphans:
            self.streams.pop(request_id, None)
        return orphans


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Run `callback` on `loop` from the driver thread; False if that loop is closed (its consumer is gone: a
    stream's owner may close its loop between the driver's lookup and this call)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # "Event loop is closed": the driver thread must outlive any consumer
        return False
    return True


def _first(stream: Stream, chunk: GenerationChunk) -> GenerationChunk | BaseException:
    """A request's first chunk through its `on_first`; should that fail, the request fails, not the driver."""
    if stream.on_first is None:
        return chunk
    try:
        return stream.on_first(chunk)
    except Exception as exc:  # noqa: BLE001 - the driver thread serves every other request too
        logger.exception("on_first failed")
        return EngineError(f"reporting on the first output failed: {exc}")


def _put_all(batch: list[tuple[Stream, Any]]) -> None:
    for stream, chunk in batch:
        stream.put(chunk)
