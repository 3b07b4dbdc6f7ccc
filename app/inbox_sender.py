"""The request inbox's ingress end: a request sent ahead of its Serve call to the chosen engine replica's inbox.

The replica's end, and the life cycle of one request, are in app/request_inbox.py. Here:
- `InboxSender` (one per ingress, on its event loop): one ZeroMQ PUSH socket per replica endpoint
  (app/push_sockets.py), sending `[secret, pickle((sent_at, key, (args, kwargs)))]`, or a cancel (None for the
  request); it queues nothing for a replica it is not connected to (`zmq.IMMEDIATE`: the call carries that request).
- `sent_ahead`: the message, then the Serve call pinned to the same replica with the message's key (`inbox_key`);
  the call is wrapped (`_SentAhead`) so that cancelling it, or its failing, also cancels the run it stood for.
"""

from __future__ import annotations

import pickle
import secrets
import time
from collections.abc import Callable
from typing import Any

from app.push_sockets import PushSockets

SEND_HWM = 10_000  # requests queued for a replica that is not reading (gone): past it, the call carries them
IDLE_CLOSE_S = 600.0  # a socket to a replica not sent to for this long is closed (replaced), within 2x this


class InboxSender:
    """The ingress's end: one PUSH socket per replica endpoint, used on the ingress's event loop only."""

    def __init__(self) -> None:
        # nothing queued for a replica not connected (gone, or not yet): its Serve call carries the request
        self._sockets = PushSockets(SEND_HWM, IDLE_CLOSE_S, immediate=True)
        self.num_sent = 0
        self.num_refused = 0

    def send(self, metadata: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> str | None:
        """Send a request to the replica whose metadata is `metadata`; returns its key, or None if it has no inbox
        or is not connected and reading (then the Serve call carries the request as before)."""
        key = secrets.token_hex(12)
        if not self._send(metadata, key, (args, kwargs)):
            return None
        self.num_sent += 1
        return key

    def cancel(self, metadata: dict[str, Any], key: str) -> None:
        """The request `key` ended before its call reached the replica: the replica stops its run."""
        self._send(metadata, key, None)

    def _send(self, metadata: dict[str, Any], key: str, request: tuple | None) -> bool:
        endpoint, secret = metadata.get("inbox"), metadata.get("inbox_secret")
        if not endpoint or not secret:
            return False
        message = pickle.dumps((time.time(), key, request), protocol=pickle.HIGHEST_PROTOCOL)
        if not self._sockets.send(endpoint, [bytes.fromhex(secret), message]):
            self.num_refused += 1
            return False
        return True

    def close(self) -> None:
        self._sockets.close()


def sent_ahead(method: Any, sender: InboxSender | None, selection: Any, args: tuple, kwargs: dict[str, Any],
               ahead: dict[str, Any] | None = None) -> Callable[[Any], Any]:
    """A start for `method.remote(request, *args, **kwargs)` pinned to the picked replica (`selection`), the request
    sent ahead to its inbox first (with a `sender`); cancelling the call, or its failing, cancels that run.
    `ahead`: keywords only the message carries (which of the replica's methods the run stands for: the call's own
    method says it)."""
    pin = selection.replica_id

    def start(request: Any) -> Any:
        metadata = selection.replica_metadata
        message_kwargs = {**kwargs, **(ahead or {}), "replica_pin": pin}
        key = None if sender is None else sender.send(metadata, (request, *args), message_kwargs)
        try:
            call = method.remote(request, *args, replica_pin=pin, inbox_key=key, **kwargs)
        except BaseException:
            if key is not None:
                sender.cancel(metadata, key)  # type: ignore[union-attr]
            raise
        return call if key is None else _SentAhead(call, sender, metadata, key)
    return start


class _SentAhead:
    """A Serve call whose request went ahead to its replica's inbox; iterate or await it as the call. Cancelling it,
    or its failing (it may fail without reaching the replica: Serve's queue full, or routed to another replica that
    refuses the pin), also tells the replica, whose run would otherwise go on with no one waiting for it."""

    def __init__(self, call: Any, sender: Any, metadata: dict[str, Any], key: str):
        self._call, self._sender, self._metadata, self._key = call, sender, metadata, key

    def cancel(self) -> None:
        self._call.cancel()
        self._sender.cancel(self._metadata, self._key)

    async def __aiter__(self) -> Any:  # a streaming call
        try:
            async for item in self._call:
                yield item
        except Exception:  # not CancelledError: a consumer that stops iterating (done) or leaves calls cancel()
            self._sender.cancel(self._metadata, self._key)  # after an attached call: the key is settled, no-op
            raise

    def __await__(self) -> Any:  # a unary call
        return self._awaited().__await__()

    async def _awaited(self) -> Any:
        try:
            return await self._call
        except Exception:
            self._sender.cancel(self._metadata, self._key)
            raise
