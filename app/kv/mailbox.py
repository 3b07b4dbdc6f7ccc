"""Decode side: one record per KV transfer, from the moment it is expected (or arrives) until its request ends.

A `Transfer` record, keyed by the transfer's wire key, holds everything about it: its state, the payload
while it waits, its deadline or lease, why it failed, and where the request's prompt KV finally came from
(`source`: "transfer", "prefix_cache" or "recomputed", with `fallback_reason`). States (ordered: a later
state never goes back):
    EXPECTED  the decode call registered it (with a deadline) before it arrived
    ARRIVED   the payload is here and its checksum matched
    FAILED    checksum or header mismatch, broken pair, the deadline passed, or the lease ended; never used
    CLAIMED   the connector took the payload to load it into the engine's blocks
Who writes what: the pair's receive loop `deliver`s; the decode replica `expect`s (it then owns the record),
`fail`s it when the orchestrator says prefill failed, reads `report` at the first token and `forget`s it when
the request ends, however it ends; the connector's scheduler half `reserve`s an ARRIVED payload when it tells
vLLM the KV is there and `settle`s the source once it decided, its worker half `claim`s the payload, says when
it has `loaded` it, and overrules that decision when the load fails.
A reserved payload stays for the worker whatever other threads do meanwhile (`forget` sets it aside, `fail` and the
lease leave it): vLLM has allocated and prefix-cached blocks for it, and a load that failed would make it recompute
the prompt, its blocks dropped from the cache first (app/kv/connector_worker.py) lest an abort before the recompute
leave them there with whatever they held. The connector's `request_finished` lets go of a reservation its request
never claimed.
A payload in the prefill replica's shared memory (same node) comes with a `release` callback: the record calls
it exactly once, when the payload was loaded or is dropped for any reason, so prefill can reuse the segment.
`sweep()` fails owned expectations past their deadline, frees an owned payload whose lease ended (so KV
waiting behind a long engine queue does not pin memory: the request then recomputes, and says why), and
drops records nobody owns once their lease ended.
All methods are thread-safe: the receive loops, the engine thread and the event loop all use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.kv.channel import Received
from app.kv.header import NO_TOKEN, KVHeader
from app.kv.waiters import Waiters
from app.messages import KVSource

DEADLINE_PASSED = "KV transfer deadline passed"
LEASE_ENDED = "KV lease ended before the request was scheduled"


class XferState(enum.IntEnum):
    EXPECTED = 1
    ARRIVED = 2
    FAILED = 3
    CLAIMED = 4


@dataclass
class Transfer:
    state: XferState
    deadline: float  # monotonic: the transfer's deadline while EXPECTED, else its lease end
    owned: bool = False  # a decode request expects it (and will forget it)
    header: KVHeader | None = None
    payload: torch.Tensor | None = None  # [num_layers, num_blocks, *block_shape] while ARRIVED
    error: str | None = None  # why it FAILED
    source: KVSource | None = None  # where the request's prompt KV came from, once decided
    fallback_reason: str | None = None  # with source "recomputed"
    release: Callable[[], None] | None = None  # gives a shared-memory payload back to prefill (once)
    reserved: bool = False  # vLLM was told this KV is here: the payload waits for the worker's claim

    def fail(self, error: str, lease_end: float) -> None:
        self.state, self.error, self.payload, self.deadline = XferState.FAILED, error, None, lease_end
        self.let_go()

    def take(self, received: Received, lease_end: float) -> None:
        """The transfer arrived: hold its payload, or fail with why it cannot be used."""
        self.release, self.header = received.release, received.header  # the header also when the payload failed
        if received.error is not None:
            self.fail(received.error, lease_end)
        else:
            self.state, self.deadline = XferState.ARRIVED, lease_end
            self.payload = received.payload

    def check_deadline(self, lease_s: float) -> None:
        """An expectation past its deadline turns FAILED (read without waiting for the sweep)."""
        if self.state == XferState.EXPECTED and time.monotonic() > self.deadline:
            self.fail(DEADLINE_PASSED, time.monotonic() + lease_s)

    @property
    def first_token(self) -> int | None:
        """The first token the header names (also when the payload failed); None: no header came, or it names none."""
        header = self.header
        return header.first_token if header is not None and header.first_token != NO_TOKEN else None

    def let_go(self) -> None:
        """Give the payload's shared memory back, if it has any and nobody did yet."""
        release, self.release = self.release, None
        if release is not None:
            release()  # non-blocking: queues the segment id for the pair's release thread


class _ConnectorCalls:
    """What the connector's halves call, on the engine thread: the scheduler `reserve`s and `settle`s, the worker
    `claim`s and says when it has `loaded`; `unreserve` when vLLM is done with the request (`KVMailbox` holds the
    state)."""

    lease_s: float
    _lock: threading.Lock
    _records: dict[int, Transfer]
    _set_aside: dict[int, Transfer]
    _claimed: dict[int, Callable[[], None]]

    def claim(self, key: int) -> tuple[KVHeader, torch.Tensor]:
        """Take an ARRIVED payload (once); raises KeyError if it is not (or no longer) there."""
        with self._lock:
            record = self._records.get(key) or self._set_aside.pop(key, None)
            if record is None or record.state != XferState.ARRIVED:
                raise KeyError(f"KV transfer {key:#x} is not available")
            header, payload = record.header, record.payload
            record.state, record.payload = XferState.CLAIMED, None
            if record.release is not None:  # now only `loaded` frees it (`forget` may come mid-scatter)
                self._claimed[key], record.release = record.release, None
            assert header is not None and payload is not None
            return header, payload

    def reserve(self, key: int) -> XferState | None:
        """Engine thread, as the connector decides what to tell vLLM: the transfer's state (as `state` says it), and an
        ARRIVED payload kept for the worker's `claim` (`unreserve` if vLLM is not told it is here)."""
        with self._lock:
            if (record := self._records.get(key)) is None:
                return None
            record.check_deadline(self.lease_s)
            record.reserved = record.reserved or record.state == XferState.ARRIVED
            return record.state

    def unreserve(self, key: int) -> None:
        """Engine thread: the request ended (finished, aborted) without claiming a payload it reserved."""
        with self._lock:
            if (record := self._set_aside.pop(key, None)) is not None:
                record.let_go()
            elif (record := self._records.get(key)) is not None:
                record.reserved = False

    def loaded(self, key: int) -> None:
        """The connector is done with the payload it claimed (scattered, or refused): free its shared memory."""
        if (release := self._claimed.pop(key, None)) is not None:  # dict.pop is atomic
            release()

    def settle(self, key: int, source: KVSource, reason: str | None = None, overrule: bool = False) -> None:
        """Where the prompt KV comes from: the scheduler's first decision stands, unless the worker's load
        failed (`overrule`: vLLM then recomputes the prompt)."""
        with self._lock:
            record = self._records.get(key)
            if record is not None and (record.source is None or overrule):
                record.source, record.fallback_reason = source, reason


class KVMailbox(_ConnectorCalls):
    def __init__(self, lease_s: float, on_change: Callable[[], None] | None = None):
        self.lease_s = lease_s
        self._records: dict[int, Transfer] = {}
        self._lock = threading.Lock()
        self._on_change = on_change or (lambda: None)
        self._waiters = Waiters()  # guarded by _lock
        # forgotten keys -> until when a late arrival is dropped at once, in that order (a key forgotten again moves to
        # the end): the sweep (10 a second, under the lock) reads only the keys that expired, not a lease's worth
        self._done: OrderedDict[int, float] = OrderedDict()
        self._claimed: dict[int, Callable[[], None]] = {}  # claimed shared-memory payloads not loaded yet
        self._set_aside: dict[int, Transfer] = {}  # reserved payloads whose request forgot them before the claim
        self.num_expired = 0
        self.num_late = 0

    def expect(self, key: int, timeout_s: float) -> None:
        with self._lock:
            if (record := self._records.get(key)) is None:
                self._records[key] = Transfer(XferState.EXPECTED, time.monotonic() + timeout_s, owned=True)
            else:
                record.owned = True  # it arrived (or failed) before its request asked for it

    def fail(self, key: int, error: str) -> None:
        with self._lock:
            if (record := self._records.get(key)) is None:
                self._records[key] = Transfer(XferState.FAILED, time.monotonic() + self.lease_s, error=error)
            elif record.state == XferState.EXPECTED or record.state == XferState.ARRIVED and not record.reserved:
                record.fail(error, time.monotonic() + self.lease_s)
            self._waiters.wake(key)
        self._on_change()  # a decision changed: the engine may schedule a waiting request now

    async def wait_decided(self, key: int) -> tuple[XferState | None, str | None]:
        """Wait (on the event loop, without polling) until the transfer arrived, failed or is overdue."""
        with self._lock:
            record = self._records.get(key)
            waiting = record is not None and record.state == XferState.EXPECTED
            if waiting:
                future = self._waiters.add(key)
                remaining = max(0.0, record.deadline - time.monotonic())
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, remaining + 0.01)
            with self._lock:
                self._waiters.discard(key, future)
        return self.state(key)

    def report(self, key: int) -> tuple[KVSource | None, str | None]:
        """Where the request's prompt KV came from, and why it fell back (None: not decided)."""
        with self._lock:
            return (r.source, r.fallback_reason) if (r := self._records.get(key)) is not None else (None, None)

    def forget(self, key: int) -> None:
        """The request is done with this transfer (finished, aborted or fell back): drop its record, and
        drop the transfer itself if it still arrives later."""
        with self._lock:
            if (record := self._records.pop(key, None)) is not None:
                if record.reserved and record.state == XferState.ARRIVED:
                    record.deadline = time.monotonic() + self.lease_s  # `sweep` drops it if nobody does before
                    self._set_aside[key] = record  # the worker loads it in this step
                else:
                    record.let_go()
            self._done[key] = time.monotonic() + self.lease_s
            self._done.move_to_end(key)

    def deliver(self, received: Received) -> None:
        key = received.header.xfer_key
        lease_end = time.monotonic() + self.lease_s
        with self._lock:
            record = self._records.get(key)
            # Its request is over (fell back, finished, aborted), or a late duplicate of a decided transfer:
            # drop it, never hold it, never overwrite a decision.
            if key in self._done or (record is not None and record.state != XferState.EXPECTED):
                self.num_late += key in self._done
                if received.release is not None:
                    received.release()  # its shared memory goes back to prefill now
                return
            if record is None:
                record = self._records[key] = Transfer(XferState.EXPECTED, lease_end)
            record.take(received, lease_end)
            self._waiters.wake(key)
        self._on_change()  # a decision changed: the engine may schedule a waiting request now

    def state(self, key: int) -> tuple[XferState | None, str | None]:
        """Current state and error; an expectation past its deadline turns FAILED here."""
        with self._lock:
            if (record := self._records.get(key)) is None:
                return None, None
            record.check_deadline(self.lease_s)
            return record.state, record.error

    def first_token(self, key: int) -> int | None:
        """The first token prefill streamed to the client, as the header names it (`Transfer.first_token`)."""
        with self._lock:
            return record.first_token if (record := self._records.get(key)) is not None else None

    def sweep(self) -> int:
        """Fail overdue expectations, free ended leases, drop unowned records; returns how many changed."""
        now = time.monotonic()
        changed = 0
        with self._lock:
            for key, record in list(self._records.items()):
                if now <= record.deadline:
                    continue
                if not record.owned:
                    del self._records[key]
                    record.let_go()
                    self.num_expired += 1
                elif record.state == XferState.EXPECTED:
                    record.fail(DEADLINE_PASSED, now + self.lease_s)
                elif record.state == XferState.ARRIVED and not record.reserved:
                    record.fail(LEASE_ENDED, now + self.lease_s)
                    self.num_expired += 1
                else:
                    continue  # decided, nothing held: its request forgets it
                changed += 1
            while self._done and next(iter(self._done.values())) < now:
                self._done.popitem(last=False)
            for key in [k for k, r in self._set_aside.items() if r.deadline < now]:  # never claimed nor let go
                self._set_aside.pop(key).let_go()
                changed += 1
        return changed

    def num_held_bytes(self) -> int:
        with self._lock:
            held = [*self._records.values(), *self._set_aside.values()]
            return sum(r.payload.nbytes for r in held if r.payload is not None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records) + len(self._set_aside)

    def num_expected(self) -> int:
        """Transfers expected and not arrived yet (requests waiting for their KV)."""
        with self._lock:
            return sum(r.state == XferState.EXPECTED for r in self._records.values())
