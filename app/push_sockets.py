"""ZeroMQ PUSH sockets to many peers, one per endpoint, for a sender that lives on one thread.

The two fire-and-forget channels of the request path send through it: the ingress's requests sent ahead to engine
replicas (app/inbox_sender.py, on the ingress's event loop) and the engine thread's tokens to ingresses
(app/token_bus.py). ZeroMQ sockets are not thread-safe: one `PushSockets` belongs to one thread.

Life cycle of one socket:
1. Made and connected at the first send to its endpoint (`hwm` messages queue per peer; `immediate`: nothing queues
   for a peer not connected yet or gone, so a send fails at once and the caller takes its other way).
2. Every send is non-blocking: a full queue (a peer not reading), and with `immediate` no connected peer, refuses it
   (`send` is False). Without `immediate`, messages for a peer not connected yet queue up to `hwm`.
3. Closed once unused (no send tried) for `idle_close_s`, at most twice that (a replaced peer's endpoint would
   otherwise keep a socket that retries its connection forever); looked for at most once per `idle_close_s`, so a
   send costs no scan of every endpoint.
"""

from __future__ import annotations

import time
from typing import Any


class PushSockets:
    """One PUSH socket per endpoint, made at its first send; one thread only."""

    def __init__(self, hwm: int, idle_close_s: float, immediate: bool = False) -> None:
        self.hwm, self.idle_close_s, self.immediate = hwm, idle_close_s, immediate
        self._sockets: dict[str, Any] = {}
        self._used_at: dict[str, float] = {}  # endpoint -> monotonic time of its last send
        self._swept_at = time.monotonic()

    def send(self, endpoint: str, frames: list[bytes]) -> bool:
        """Queue `frames` as one message for `endpoint`; False if refused (queue full, or not connected with
        `immediate`)."""
        import zmq

        socket = self._sockets.get(endpoint)
        if socket is None:
            socket = self._sockets[endpoint] = zmq.Context.instance().socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, self.hwm)
            socket.setsockopt(zmq.LINGER, 0)
            if self.immediate:
                socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.connect(endpoint)
        now = self._used_at[endpoint] = time.monotonic()
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK)
            sent = True
        except zmq.Again:
            sent = False
        if now - self._swept_at >= self.idle_close_s:
            self._close_idle(now)
        return sent

    def endpoints(self) -> list[str]:
        """The endpoints that have a socket now."""
        return list(self._sockets)

    def _close_idle(self, now: float) -> None:
        self._swept_at = now
        for endpoint in [e for e, at in self._used_at.items() if now - at > self.idle_close_s]:
            self._sockets.pop(endpoint).close(linger=0)
            del self._used_at[endpoint]

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; messages not sent yet are dropped after `linger_ms`."""
        for socket in self._sockets.values():
            socket.close(linger=linger_ms)
        self._sockets.clear()
        self._used_at.clear()
