"""The request inbox: a request reaches its decode replica's engine over ZeroMQ, not after a Serve call's dispatch.

Why: the Serve call that carries a request into an engine replica took 5.1-5.4 ms from the ingress's `.remote()` to
the replica's method (median of 24 lone 100-token requests, traced in both modes on the 2-core machine, 2026-11-30),
a sixth of the whole time to first token; a ZeroMQ message between the same processes takes 0.2 ms. Serve stays in
charge of everything else: the call still goes, and carries the request's end, its errors and its cancellation
(and Serve's queue lengths and autoscaling still count it); it only no longer waits for the engine to start.

Life cycle of one request (`key`: a fresh random id per call, never a request id, so a retried request cannot
meet its earlier run):
1. The decode replica binds a PULL socket at start (`RequestInbox.bind`, on its event loop) and publishes its
   endpoint and secret in its replica metadata, which the ingress's router holds for every replica.
2. The ingress sends `[secret, pickle((key, args, kwargs))]` to the chosen replica (`InboxSender.send`), then makes
   the Serve call with the same arguments and `inbox_key=key`.
3. The replica's reader checks the secret (a message without it is dropped unread) and starts the run at once
   (`start(*args, **kwargs)`, drained into a queue by a task); the Serve call, when it comes, attaches to it
   (`attach`) and yields what it yields. If the call comes first (the message is late or lost), it runs the request
   itself and the message, when it comes, is dropped.
4. A call that leaves early cancels the run (the engine aborts the request). A run no call attached to within
   `ORPHAN_S` is cancelled (its ingress gave up before its call left); a call that comes after that fails.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.errors import EngineError

logger = logging.getLogger(__name__)

ORPHAN_S = 120.0  # how long a started run waits for its Serve call (which comes milliseconds after it)
SEND_HWM = 10_000  # requests queued for a replica that is not reading (gone): past it, the call carries them
IDLE_CLOSE_S = 600.0  # a sender closes its socket to a replica it sent nothing for this long (replaced)
_END = object()


@dataclass
class _Run:
    task: asyncio.Task | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.monotonic)


class RequestInbox:
    """The engine replica's end; everything runs on the replica's event loop."""

    def __init__(self, start: Callable[..., AsyncIterator[Any]], host: str | None = None):
        self._start = start  # the replica's streaming method body (e.g. Decode._generate)
        self.host = host  # None: this node's address as Ray knows it
        self.secret = secrets.token_bytes(16)
        self.endpoint: str | None = None
        self._runs: dict[str, _Run] = {}  # started by a message, no call attached yet
        self._settled: dict[str, tuple[float, bool]] = {}  # key -> (when, expired): its call came first, or it expired
        self._socket: Any = None
        self._reader: asyncio.Task | None = None
        self.counts = {"num_started": 0, "num_call_first": 0, "num_orphaned": 0, "num_dropped": 0}

    @classmethod
    def bound(cls, start: Callable[..., AsyncIterator[Any]], host: str | None = None) -> RequestInbox:
        """A new inbox, bound on the running event loop (the replica's)."""
        inbox = cls(start, host)
        inbox.bind()
        return inbox

    def bind(self) -> str:
        import zmq
        import zmq.asyncio

        host = self.host
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        port = socket.bind_to_random_port(f"tcp://{host}")
        self._socket, self.endpoint = socket, f"tcp://{host}:{port}"
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self.endpoint

    def metadata(self) -> dict[str, str]:
        """What the replica publishes for the ingress (`record_replica_metadata`)."""
        return {"inbox": self.endpoint or "", "inbox_secret": self.secret.hex()}

    async def _read(self) -> None:
        while True:
            try:
                secret, payload = await self._socket.recv_multipart()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a malformed message must not stop the reader
                logger.exception("request inbox: receive failed")
                await asyncio.sleep(0.01)
                continue
            if not hmac.compare_digest(secret, self.secret):
                self.counts["num_dropped"] += 1
                continue
            try:
                key, args, kwargs = pickle.loads(payload)
            except Exception:  # noqa: BLE001 - the call carries the request anyway
                logger.exception("request inbox: unreadable request")
                continue
            self.start(key, args, kwargs)

    def start(self, key: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Run a request its message brought, unless its call came first."""
        self._sweep()
        if key in self._settled or key in self._runs:
            self.counts["num_dropped"] += 1
            return
        run = self._runs[key] = _Run()
        run.task = asyncio.get_running_loop().create_task(self._drain(run, args, kwargs))
        self.counts["num_started"] += 1
        asyncio.get_running_loop().call_later(ORPHAN_S + 1, self._sweep)

    async def _drain(self, run: _Run, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            async for item in self._start(*args, **kwargs):
                run.queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the call raises it
            run.queue.put_nowait(exc)
            return
        run.queue.put_nowait(_END)

    async def attach(self, key: str, args: tuple, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """The Serve call's side: what the run its message started yields, or, if none started, run it here."""
        run = self._runs.pop(key, None)
        if run is None:
            settled = self._settled.get(key)
            if settled is not None and settled[1]:
                raise EngineError(f"request {key} waited over {ORPHAN_S} s for its call and was cancelled")
            self._settled[key] = (time.monotonic(), False)
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

    def _sweep(self) -> None:
        now = time.monotonic()
        for key, run in list(self._runs.items()):
            if now - run.started > ORPHAN_S:
                del self._runs[key]
                self._settled[key] = (now, True)
                if run.task is not None:
                    run.task.cancel()
                self.counts["num_orphaned"] += 1
        for key, (at, _) in list(self._settled.items()):
            if now - at > 2 * ORPHAN_S:
                del self._settled[key]

    def stats(self) -> dict[str, int]:
        return {**self.counts, "num_waiting": len(self._runs)}

    def close(self) -> None:
        """Stop reading and cancel the runs no call took (at replica shutdown, maybe off the loop: best effort)."""
        tasks = [self._reader, *(run.task for run in self._runs.values())]
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._reader = None
        self._runs.clear()
        for task in tasks:
            if task is not None:
                try:
                    task.get_loop().call_soon_threadsafe(task.cancel)
                except RuntimeError:  # its loop is closed: nothing runs it any more
                    pass


class InboxSender:
    """The ingress's end: one PUSH socket per replica endpoint, used on the ingress's event loop only."""

    def __init__(self) -> None:
        self._sockets: dict[str, Any] = {}
        self._used_at: dict[str, float] = {}  # endpoint -> last send (a replaced replica's socket is closed)
        self.num_sent = 0
        self.num_refused = 0

    def send(self, metadata: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> str | None:
        """Send a request to the replica whose metadata is `metadata`; returns its key, or None if it has no inbox
        or is not reading (then the Serve call carries the request as before)."""
        import zmq

        endpoint, secret = metadata.get("inbox"), metadata.get("inbox_secret")
        if not endpoint or not secret:
            return None
        socket = self._sockets.get(endpoint)
        if socket is None:
            socket = self._sockets[endpoint] = zmq.Context.instance().socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
        key = secrets.token_hex(12)
        try:
            socket.send_multipart([bytes.fromhex(secret), pickle.dumps((key, args, kwargs),
                                                                        protocol=pickle.HIGHEST_PROTOCOL)],
                                  flags=zmq.NOBLOCK)
        except zmq.Again:
            self.num_refused += 1
            return None
        self.num_sent += 1
        now = self._used_at[endpoint] = time.monotonic()
        for gone in [e for e, at in self._used_at.items() if now - at > IDLE_CLOSE_S]:
            self._sockets.pop(gone).close(linger=0)
            del self._used_at[gone]
        return key

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()
        self._used_at.clear()
