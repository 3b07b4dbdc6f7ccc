"""The request inbox: a request reaches its engine replica over ZeroMQ, not after a Serve call's dispatch.

Why: the Serve call that carries a request into an engine replica took 5.1-5.4 ms from the ingress's `.remote()` to
the replica's method (24 lone 100-token requests, traced on the 2-core machine, 2026-11-30), a sixth of the time to
first token; a ZeroMQ message takes 0.2 ms. The call still goes and carries the request's end, errors and
cancellation (Serve's queue lengths and autoscaling still count it); the engine just no longer waits for it.

Life cycle of one request (`key`: a fresh random id per call, never a request id, so a retried request cannot
meet its earlier run):
1. Each engine replica (Decode, Collocated, Prefill) binds a PULL socket at start (`RequestInbox.bind`, on its loop)
   and publishes its endpoint and secret in its replica metadata, which the ingress's router holds for each replica.
2. The ingress sends `[secret, pickle((sent_at, key, (args, kwargs)))]` to the chosen replica (`InboxSender.send`,
   app/inbox_sender.py; a cancel carries None instead of the request), then makes the Serve call with the same
   arguments and `inbox_key=key` (`sent_ahead`).
3. The replica's reader checks the secret (a message without it is dropped unread) and starts the run at once
   (`start(*args, **kwargs)`, drained into a queue by a task); the Serve call, when it comes, attaches to it
   (`attach`) and yields what it yields. If the call comes first (the message is late or lost), it runs the request
   itself and the message, when it comes, is dropped.
4. A call that leaves early cancels the run (the engine aborts the request). So does the ingress, with a cancel
   message, when the request ends before its call reached the replica (the client left while the call waited in
   Serve's router) or the call failed (it could not go, Serve's queue was full, another replica refused the pin);
   a key whose call attached is never started again. A message older than `MAX_AGE_S` is dropped unread (a backlog that
   a healed partition delivers late), and a sender queues nothing for a replica it is not connected to
   (`zmq.IMMEDIATE`: the call carries those requests). A run no call attached to within `ORPHAN_S` is cancelled
   (its ingress died before it could cancel), at the next request or within `SWEEP_S`; a call that comes after that
   fails.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.errors import EngineError

logger = logging.getLogger(__name__)

ORPHAN_S = 600.0  # how long a started run waits for its Serve call (milliseconds, or as long as Serve queues it)
MAX_AGE_S = 30.0  # a message sent longer ago than this (sender's clock) is dropped: its call carries the request
MAX_MESSAGE_BYTES = 64 << 20  # larger frames are refused by ZeroMQ before anything reads them
SWEEP_S = 30.0  # while runs wait for their calls, orphans are looked for this often (besides at every message)
_END = object()


@dataclass
class _Run:
    task: asyncio.Task | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.monotonic)


class _Keys:
    """The keys an inbox has seen: runs a message started that no call took yet, and settled keys (a call attached or
    came first; or cancelled or orphaned, `expired`: a later call fails). Settled keys are in the order of their last
    settling, so `expire` reads only those that expired: it runs for every request (message or call), and at 10
    requests/s `settled` holds 12,000 keys (a full scan took 1.4 ms per message). Runs are few (each waits
    milliseconds for its call)."""

    def __init__(self) -> None:
        self.runs: dict[str, _Run] = {}
        self.settled: OrderedDict[str, tuple[float, bool]] = OrderedDict()  # key -> (when, expired)

    def settle(self, key: str, expired: bool) -> None:
        self.settled[key] = (time.monotonic(), expired)
        self.settled.move_to_end(key)  # a key settled again moves to the end

    def expire(self) -> int:
        """Cancel (and settle, expired) the runs no call took within `ORPHAN_S`, and say how many; forget keys settled
        `2 * ORPHAN_S` ago."""
        now = time.monotonic()
        orphans = [key for key, run in list(self.runs.items()) if now - run.started > ORPHAN_S]
        for key in orphans:
            self.settle(key, expired=True)
            run = self.runs.pop(key, None)  # (`close` may have cleared them, from another thread)
            if run is not None and run.task is not None:
                run.task.cancel()
        while self.settled and now - next(iter(self.settled.values()))[0] > 2 * ORPHAN_S:
            self.settled.popitem(last=False)
        return len(orphans)


class RequestInbox:
    """The engine replica's end; everything runs on the replica's event loop."""

    def __init__(self, start: Callable[..., AsyncIterator[Any]], host: str | None = None):
        self._start = start  # the replica's streaming method body (e.g. Decode._generate)
        self.host = host  # None: this node's address as Ray knows it
        self.secret = secrets.token_bytes(16)
        self.endpoint: str | None = None
        self._keys = _Keys()
        self._runs = self._keys.runs  # started by a message, no call attached yet
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._socket: Any = None
        self._reader: asyncio.Task | None = None
        self.counts = {"num_started": 0, "num_call_first": 0, "num_cancelled": 0, "num_orphaned": 0, "num_dropped": 0}

    def bind(self) -> RequestInbox:
        """Bind the socket and start reading, on the running event loop (the replica's)."""
        import zmq
        import zmq.asyncio

        host = self.host
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        port = socket.bind_to_random_port(f"tcp://{host}")
        self._socket, self.endpoint = socket, f"tcp://{host}:{port}"
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    def metadata(self) -> dict[str, str]:
        """What the replica publishes for the ingress (`record_replica_metadata`)."""
        return {"inbox": self.endpoint or "", "inbox_secret": self.secret.hex()}

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._socket.recv_multipart()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a malformed message must not stop the reader
                logger.exception("request inbox: receive failed")
                await asyncio.sleep(0.01)
                continue
            if len(frames) != 2 or not hmac.compare_digest(frames[0], self.secret):
                self.counts["num_dropped"] += 1
                continue
            try:
                sent_at, key, request = pickle.loads(frames[1])
            except Exception:  # noqa: BLE001 - the call carries the request anyway
                logger.exception("request inbox: unreadable request")
                continue
            if request is None:  # its ingress gave it up before its call attached
                self.cancel(key)
            elif time.time() - sent_at > MAX_AGE_S:
                self.counts["num_dropped"] += 1
            else:
                self.start(key, *request)

    def start(self, key: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Run a request its message brought, unless its call came first."""
        self.counts["num_orphaned"] += self._keys.expire()
        if key in self._keys.settled or key in self._runs:
            self.counts["num_dropped"] += 1
            return
        run = self._runs[key] = _Run()
        run.task = asyncio.get_running_loop().create_task(self._drain(run, args, kwargs))
        self.counts["num_started"] += 1
        if self._sweep_timer is None:  # one timer while runs wait, not one per message
            self._sweep_timer = asyncio.get_running_loop().call_later(SWEEP_S, self._timed_sweep)

    def cancel(self, key: str) -> None:
        """The ingress gave the request up before its call attached: stop the run, or never start it."""
        self.counts["num_orphaned"] += self._keys.expire()
        run = self._runs.pop(key, None)
        self._keys.settle(key, expired=True)
        if run is not None and run.task is not None:
            run.task.cancel()
            self.counts["num_cancelled"] += 1

    async def _drain(self, run: _Run, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            async for item in self._start(*args, **kwargs):
                run.queue.put_nowait(item)
        except asyncio.CancelledError:
            run.queue.put_nowait(EngineError("the request was cancelled"))  # nobody should be waiting; never hang one
            raise
        except BaseException as exc:  # noqa: BLE001 - the call raises it
            run.queue.put_nowait(exc)
            return
        run.queue.put_nowait(_END)

    async def attach(self, key: str, args: tuple, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """The Serve call's side: what the run its message started yields, or, if none started, run it here."""
        self.counts["num_orphaned"] += self._keys.expire()  # also when no message comes (sent none, or all too old)
        run = self._runs.pop(key, None)
        if run is not None:
            self._keys.settle(key, expired=False)  # a repeated message must not start it again
        else:
            settled = self._keys.settled.get(key)
            if settled is not None and settled[1]:
                raise EngineError(f"request {key} was cancelled before its call came (given up, or over {ORPHAN_S} s)")
            self._keys.settle(key, expired=False)
            self.counts["num_call_first"] += 1
            async for item in self._start(*args, **kwargs):
                yield item
            return
        finished = False
        try:
            while True:
                item = await run.queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished and run.task is not None:
                run.task.cancel()  # the caller left: the run's stream closes, which aborts the request

    def _timed_sweep(self) -> None:
        self._sweep_timer = None
        self.counts["num_orphaned"] += self._keys.expire()
        if self._runs:
            self._sweep_timer = asyncio.get_running_loop().call_later(SWEEP_S, self._timed_sweep)

    def stats(self) -> dict[str, int]:
        return {**self.counts, "num_waiting": len(self._runs)}

    def close(self) -> None:
        """Stop reading and cancel the runs no call took (at replica shutdown, maybe off the loop: best effort)."""
        tasks = [self._reader, *(run.task for run in self._runs.values())]
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._reader = None
        self._runs.clear()  # a pending sweep timer then finds nothing and stops
        for task in tasks:
            if task is not None:
                try:
                    task.get_loop().call_soon_threadsafe(task.cancel)
                except RuntimeError:  # its loop is closed: nothing runs it any more
                    pass
