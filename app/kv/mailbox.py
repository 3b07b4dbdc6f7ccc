"""Decode side: where received KV waits for its request, under a lease.

States of one transfer, keyed by its wire key (ordered: a later state never goes back):
    EXPECTED  the decode call registered it (with a deadline) before or after it arrived
    ARRIVED   the payload is here and its checksum matched
    FAILED    checksum or header mismatch, broken pair, or the deadline passed; never used
    CLAIMED   the connector took the payload to load it into the engine's blocks
Arrived KV that nobody claims within its lease is dropped by `sweep()`; so is an expectation whose
deadline passed (it becomes FAILED first, so the waiting request falls back instead of hanging).
All methods are thread-safe: the receive loops, the engine thread and the event loop all use it.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.kv.channel import Received
from app.kv.header import KVHeader


class XferState(enum.IntEnum):
    EXPECTED = 1
    ARRIVED = 2
    FAILED = 3
    CLAIMED = 4


@dataclass
class _Entry:
    state: XferState
    deadline: float  # monotonic; for ARRIVED this is the lease end
    header: KVHeader | None = None
    payload: torch.Tensor | None = None
    error: str | None = None


class KVMailbox:
    def __init__(self, lease_s: float, on_change: Callable[[], None] | None = None):
        self.lease_s = lease_s
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._on_change = on_change or (lambda: None)
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._done: dict[int, float] = {}  # forgotten keys -> until when a late arrival is dropped at once
        self.num_expired = 0
        self.num_late = 0

    def expect(self, key: int, timeout_s: float) -> None:
        with self._lock:
            if key not in self._entries:
                self._entries[key] = _Entry(XferState.EXPECTED, time.monotonic() + timeout_s)

    def deliver(self, received: Received) -> None:
        key = received.header.xfer_key
        with self._lock:
            if key in self._done:  # its request is over (fell back, finished, aborted): drop, don't hold
                self.num_late += 1
                return
            entry = self._entries.get(key)
            if entry is not None and entry.state != XferState.EXPECTED:
                return  # late duplicate or already failed: never overwrite a decided transfer
            if received.error is not None:
                self._entries[key] = _Entry(XferState.FAILED, time.monotonic() + self.lease_s, error=received.error)
            else:
                self._entries[key] = _Entry(XferState.ARRIVED, time.monotonic() + self.lease_s, received.header,
                                            received.payload)
            waiters = self._waiters.pop(key, [])
        self._notify(waiters)

    def fail(self, key: int, error: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state in (XferState.EXPECTED, XferState.ARRIVED):
                self._entries[key] = _Entry(XferState.FAILED, time.monotonic() + self.lease_s, error=error)
            waiters = self._waiters.pop(key, [])
        self._notify(waiters)

    async def wait_decided(self, key: int) -> tuple[XferState | None, str | None]:
        """Wait (on the event loop, without polling) until the transfer arrived, failed or is overdue."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.state == XferState.EXPECTED:
                self._waiters.setdefault(key, []).append((loop, future))
                remaining = max(0.0, entry.deadline - time.monotonic())
            else:
                remaining = None
        if remaining is not None:
            try:
                await asyncio.wait_for(future, remaining + 0.01)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    left = [w for w in self._waiters.get(key, []) if w[1] is not future]
                    if left:
                        self._waiters[key] = left
                    else:
                        self._waiters.pop(key, None)
        return self.state(key)

    def _notify(self, waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)
        self._on_change()

    def state(self, key: int) -> tuple[XferState | None, str | None]:
        """Current state and error; an expectation past its deadline turns FAILED here."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None, None
            if entry.state == XferState.EXPECTED and time.monotonic() > entry.deadline:
                entry.state, entry.error = XferState.FAILED, "KV transfer deadline passed"
            return entry.state, entry.error

    def claim(self, key: int) -> tuple[KVHeader, torch.Tensor]:
        """Take an ARRIVED payload (once); raises KeyError if it is not (or no longer) there."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state != XferState.ARRIVED:
                raise KeyError(f"KV transfer {key:#x} is not available")
            header, payload = entry.header, entry.payload
            entry.state, entry.payload = XferState.CLAIMED, None
            assert header is not None and payload is not None
            return header, payload

    def forget(self, key: int) -> None:
        """The request is done with this transfer (finished, aborted or fell back): drop it, and drop
        the transfer itself if it still arrives later."""
        with self._lock:
            self._entries.pop(key, None)
            self._done[key] = time.monotonic() + self.lease_s

    def sweep(self) -> int:
        """Drop leases that ended and turn overdue expectations into failures; returns how many changed."""
        now = time.monotonic()
        dropped = failed = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                if now <= entry.deadline:
                    continue
                if entry.state == XferState.EXPECTED:
                    entry.state, entry.error = XferState.FAILED, "KV transfer deadline passed"
                    entry.deadline = now + self.lease_s
                    failed += 1
                else:
                    del self._entries[key]
                    dropped += 1
            self.num_expired += dropped
            for key in [k for k, until in self._done.items() if until < now]:
                del self._done[key]
        return dropped + failed

    def num_held_bytes(self) -> int:
        with self._lock:
            return sum(e.payload.numel() * e.payload.element_size() for e in self._entries.values()
                       if e.payload is not None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def num_expected(self) -> int:
        """Transfers expected and not arrived yet (requests waiting for their KV)."""
        with self._lock:
            return sum(e.state == XferState.EXPECTED for e in self._entries.values())


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
