"""Prefill side: the transfers on their way out, from the prompt's submit to the end of its send.

Life cycle of one `Outgoing` (keyed by transfer id):
1. `open(xfer_id, decode_id)` before the prompt enters the engine (`decode_id` None: park the KV).
2. The engine thread asks `payload_buffer` where to gather the prompt's KV (a shared-memory segment of the pair when
   decode can map it, so the payload never crosses a socket), then calls `on_saved` with the header and the prompt's
   `SavedKV` in the step that completed the prompt: it is queued on the pair's sender thread, which gathers it out of
   the engine's held blocks when its turn comes (or it is gathered at once and handed back, for parking). Whatever
   path a transfer ends on, its `SavedKV` is read or dropped, so the engine frees the blocks. A transfer opened with
   `hold` waits there until the event loop releases its first token (prefill's, streamed to the client), which its
   header then carries to decode. Fault injection (drills) acts here: fail, corrupt after the checksum (on the sender
   thread, once it sealed the header), send wrong KV with a matching checksum (a negative control: the reply must
   change), send a header that does not fit the prompt (decode's load must refuse it), report a send that never
   happens (a silent loss), or delay the send.
3. `done` resolves on the replica's event loop with the `SendResult` (or the error); a request that gives
   up first marks its transfer `cancelled`, so a queued send never goes out late.
4. `close(xfer_id)` whatever happened.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from app.config import FaultInjection
from app.kv.channel import SendResult
from app.kv.header import NO_TOKEN, KVHeader
from app.kv.held import SavedKV
from app.kv.pairs import PairTransport
from app.kv.shm import Segment


@dataclass
class Outgoing:
    decode_id: str | None  # None: park the KV here instead of sending it
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # SendResult, or (header, payload) when parking
    arrived_at: float = field(default_factory=time.perf_counter)
    gathered_at: float = 0.0
    cancelled: bool = False  # the request gave up (deadline): the KV must not be sent late
    hold: bool = False  # the send waits for `release_first_token` (its header carries the first token)
    first_token: int | None = None  # once released
    _held: Callable[[int], None] | None = None  # the send, saved and waiting for the first token
    _held_segment: Segment | None = None
    _held_kv: SavedKV | None = None
    _closed: bool = False  # the request ended: a send that still arrives here is dropped
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send_when_released(self, send: Callable[[int], None], segment: Segment | None, kv: SavedKV) -> None:
        """Engine thread: send now with the first token, if it was released already, else once it is."""
        with self._lock:
            closed = self._closed
            if self.first_token is None and not closed:
                self._held, self._held_segment, self._held_kv = send, segment, kv
                return
        if closed:  # the request ended while its prompt's step ran: nobody will release the first token
            kv.drop()
            if segment is not None:
                segment.release()
            return
        send(self.first_token)

    def release_first_token(self, token_id: int) -> None:
        """Event loop: the first token the client got (`NO_TOKEN`: none); a held send goes out with it."""
        with self._lock:
            self.first_token = token_id
            send, self._held, self._held_segment, self._held_kv = self._held, None, None, None
        if send is not None:
            send(token_id)

    def drop_held(self) -> None:
        """The request ended before its first token was released: the held send never goes out."""
        with self._lock:
            segment, kv = self._held_segment, self._held_kv
            self._held, self._held_segment, self._held_kv, self._closed = None, None, None, True
        if kv is not None:
            kv.drop()
        if segment is not None:
            segment.release()


class KVOutbox:
    def __init__(self, transport: PairTransport, faults: FaultInjection):
        self.transport = transport
        self._outgoing: dict[str, Outgoing] = {}
        self._segments: dict[str, Segment] = {}  # xfer_id -> the segment leased for its gather, until it is queued
        self.num_cancelled_sends = 0  # queued sends dropped at their turn: their request had given up (late)
        self.set_faults(faults)

    def set_faults(self, faults: FaultInjection) -> None:
        self._faults = faults
        self._fault_rng = random.Random(faults.seed)

    def breaks_stream(self) -> bool:
        """Drill (`break_after_send_fraction`): whether this prefill's stream breaks between its send and its token."""
        fraction = self._faults.break_after_send_fraction
        return bool(fraction) and self._fault_rng.random() < fraction

    def open(self, xfer_id: str, decode_id: str | None, hold: bool = False) -> Outgoing:
        """`hold`: the send waits for the request's first token (`Outgoing.release_first_token`), which its header
        carries to decode."""
        loop = asyncio.get_running_loop()
        outgoing = self._outgoing[xfer_id] = Outgoing(decode_id, loop, loop.create_future(), hold=hold)
        return outgoing

    def close(self, xfer_id: str) -> None:
        if (outgoing := self._outgoing.pop(xfer_id, None)) is not None:
            outgoing.drop_held()
        if (leased := self._segments.pop(xfer_id, None)) is not None:
            leased.release()  # leased for a gather that never reached `on_saved` (the step failed)

    def __len__(self) -> int:
        return len(self._outgoing)

    def oldest_wait_s(self) -> float:
        """Age of the oldest prompt still without its KV gathered (0 when none waits)."""
        waiting = [o.arrived_at for o in list(self._outgoing.values()) if not o.gathered_at]
        return time.perf_counter() - min(waiting) if waiting else 0.0

    def payload_buffer(self, xfer_id: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Engine thread: a view of a shared-memory segment of the pair to gather into, or None (anywhere)."""
        outgoing = self._outgoing.get(xfer_id)
        if outgoing is None or outgoing.decode_id is None:
            return None
        num_bytes = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            num_bytes *= dim
        segment = self.transport.lease_segment(outgoing.decode_id, num_bytes)
        if segment is None:
            return None
        self._segments[xfer_id] = segment
        return segment.view(shape, dtype)

    def on_saved(self, xfer_id: str, header: KVHeader, kv: SavedKV) -> None:
        """Engine thread: the prompt's KV is saved; hand it to the pair's sender (or gather and park it)."""
        outgoing = self._outgoing.get(xfer_id)
        segment = self._segments.pop(xfer_id, None)
        if outgoing is None:
            kv.drop()
            if segment is not None:
                segment.release()
            return  # the caller gave up already
        outgoing.gathered_at = time.perf_counter()
        if outgoing.decode_id is None:
            outgoing.loop.call_soon_threadsafe(settle, outgoing.done, (header, kv.gather()), None)
            return

        def done(result: SendResult | None, error: BaseException | None) -> None:
            outgoing.loop.call_soon_threadsafe(settle, outgoing.done, result, error)

        faults = self._faults
        if faults.fail_fraction and self._fault_rng.random() < faults.fail_fraction:
            kv.drop()
            if segment is not None:
                segment.release()
            done(None, RuntimeError("injected transfer failure"))
            return
        if faults.lose_fraction and self._fault_rng.random() < faults.lose_fraction:
            kv.drop()
            if segment is not None:
                segment.release()
            done(SendResult(header.num_bytes, 0.0), None)  # reported sent; decode hears nothing
            return
        if faults.mismatched_header_fraction and self._fault_rng.random() < faults.mismatched_header_fraction:
            header = replace(header, num_tokens=header.num_tokens + 1)  # sealed as is: only the load can tell
        tamper = None
        if faults.corrupt_fraction and self._fault_rng.random() < faults.corrupt_fraction:
            tamper = _corrupt  # after the sender thread sealed the header: decode's verification must catch it
        if faults.wrong_kv_fraction and self._fault_rng.random() < faults.wrong_kv_fraction:
            # [num_layers, ...]: every layer gets another layer's KV; the sender seals it, so the checksum matches
            payload = kv.gather()
            payload.copy_(payload.flip(0))
        decode_id = outgoing.decode_id

        counted = False

        def is_cancelled() -> bool:  # the pair's sender thread asks when this send's turn comes (and at its end)
            nonlocal counted
            cancelled = outgoing.cancelled
            if cancelled and not counted:  # one dropped send counts once, however often it is asked about
                counted = True
                self.num_cancelled_sends += 1
            return cancelled

        def send(first_token: int = NO_TOKEN) -> None:
            if faults.delay_s:
                threading.Timer(faults.delay_s, go, args=(first_token,)).start()
            else:
                go(first_token)

        def go(first_token: int) -> None:
            sent = header if first_token == NO_TOKEN else replace(header, first_token=first_token)
            self.transport.send(decode_id, sent, kv, done, is_cancelled, segment=segment, tamper=tamper)

        if outgoing.hold:
            outgoing.send_when_released(send, segment, kv)
        else:
            send()


def _corrupt(payload: torch.Tensor) -> None:
    with torch.inference_mode():  # the engine thread made the payload under inference mode
        payload.view(-1)[0] += 1.0


def settle(future: asyncio.Future, result, error) -> None:
    """Resolve `future` once (on its loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
