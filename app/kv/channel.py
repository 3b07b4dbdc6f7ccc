"""One direction of a (prefill, decode) pair: a sender thread on prefill, a receive loop on decode.

Messages on a pair are FIFO: header (fixed size, tag `TAG_HEADER`), then payload (size from the header, tag
`TAG_PAYLOAD`; on gloo, one larger than a chunk goes in chunks, its checksum after them: app/kv/streamed.py), unless
the payload waits in a shared-memory segment (same node, `app/kv/shm.py`): then only the header travels, and decode
gives the segment back when done with it (`TAG_RELEASE`, read by the sender's listener thread). The sender thread
gathers each payload out of the prefill engine's held blocks (`SavedKV`, app/kv/held.py) and seals its header (takes
the payload's checksum) just before it goes, so neither copy nor checksum runs inside the engine step; with one copy
(app/kv/in_place.py) the header names the held blocks and their checksum follows it, taken while decode reads them.
Because the decode side always has a receive posted, a transfer that decode never uses (request aborted, fully
prefix-cached, lease expired) is still drained into the mailbox and dropped there; it never wedges the pair. Tags
keep a payload from ever landing in a header buffer on backends that have them (pdserve's gloo); NCCL keeps FIFO
order per pair by itself.

Any transport error, send timeout or undecodable header breaks the pair: both threads stop, the
callbacks fail whatever was queued, and the owner drops the group and forms a new one on next use.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from app.kv.header import DEFERRED, HEADER_SLOTS, PAYLOAD_BLOCKS, PAYLOAD_SEGMENT, UNSEALED, KVHeader, KVHeaderError
from app.kv.held import KVNotGathered, SavedKV
from app.kv.in_place import WAIT_S, send_in_place
from app.kv.kv_share import RemoteBlocks, arrived_blocks
from app.kv.loans import BlocksOnLoan
from app.kv.payload import checksum
from app.kv.shm import RELEASE_BLOCKS, TAG_RELEASE, Segment, SegmentMaps, SegmentPool
from app.kv.streamed import RecvBuffers, SendRing, receive_streamed, send_streamed, streams

logger = logging.getLogger(__name__)

TAG_HEADER = 1
TAG_PAYLOAD = 2


class Communicator(Protocol):
    """Point-to-point link to the one peer of a pair group."""

    device: torch.device

    def send(self, tensor: torch.Tensor, tag: int, timeout_s: float | None) -> None: ...

    def recv(self, tensor: torch.Tensor, tag: int) -> None: ...

    def close(self) -> None: ...


class ChannelBroken(RuntimeError):
    """The pair's transport failed; the pair must be re-formed."""


@dataclass(frozen=True)
class SendResult:
    num_bytes: int
    send_s: float  # gather + checksum + header + payload, from dequeue to the peer's receive completing
    checksum_s: float = 0.0
    gather_s: float = 0.0  # the copy out of the engine's held blocks, on the sender thread (0: done in the step)
    in_segment: bool = False  # the payload went through shared memory, not the socket
    streamed: bool = False  # on the socket in chunks, gather and checksum overlapping the wire (app/kv/streamed.py)


@dataclass(frozen=True)
class Received:
    """One transfer drained by the receive loop: KV, or why it cannot be used."""

    header: KVHeader
    payload: torch.Tensor | RemoteBlocks | None  # [num_layers, num_blocks, *block_shape]; None when `error` is set
    error: str | None
    recv_s: float
    checksum_s: float
    release: Callable[[], None] | None = None  # a segment or streamed buffer: call once done with it (any thread)


class KVSender:
    """Prefill side: sends queued transfers in order on a background thread."""

    def __init__(self, comm: Communicator, timeout_s: float, name: str = "pair",
                 on_broken: Callable[[BaseException], None] | None = None, watch_peer: bool = False,
                 pool: SegmentPool | None = None, one_copy: bool = False, loans: BlocksOnLoan | None = None,
                 stream: bool = False):
        self.comm, self.timeout_s, self.pool, self.stream = comm, timeout_s, pool, stream  # stream: gloo's `isend`
        self.one_copy = one_copy  # decode maps our KV cache: held blocks are copied by decode, in place
        # held KV decode copies in place, until it says it is done (`is None`: an empty book is falsy, `__len__` 0)
        self.on_loan = loans if loans is not None else BlocksOnLoan()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ring, self.num_streamed = SendRing(), 0  # chunk buffers of streamed payloads, and how many started
        self._submit_lock = threading.Lock()
        self.broken: BaseException | None = None
        self._closed = False
        self._on_broken = on_broken or (lambda exc: None)
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{name}", daemon=True)
        self._thread.start()
        if watch_peer:
            # Segment releases come back on this receive; and a prefill replica would otherwise only learn
            # that its decode peer died at the next send: the receive fails as soon as the peer is gone
            # (gloo: the pair's connection closes; NCCL: the peer watch, `app.kv.nccl_comm`).
            threading.Thread(target=self._listen, name=f"kv-listen-{name}", daemon=True).start()

    def _listen(self) -> None:
        message = torch.empty(2, dtype=torch.int64, device=self.comm.device)  # [kind, value]
        try:
            while not self._closed:
                self.comm.recv(message, TAG_RELEASE)
                kind, value = message.tolist()
                if kind == RELEASE_BLOCKS:
                    self.on_loan.returned(value)
                elif self.pool is not None:
                    self.pool.release(value)
        except BaseException as exc:  # noqa: BLE001 - the peer is gone (or we closed the group)
            if not self._closed:
                self.broken = exc
                self._on_broken(exc)
        finally:
            self.on_loan.lapse_all()

    def submit(self, header: KVHeader, payload: torch.Tensor | SavedKV,
               on_done: Callable[[SendResult | None, BaseException | None], None],
               is_cancelled: Callable[[], bool] = lambda: False, segment: Segment | None = None,
               tamper: Callable[[torch.Tensor], None] | None = None) -> None:
        """Queue a transfer; one whose `is_cancelled()` is true when its turn comes is never sent (and its held
        blocks are let go). `segment`: the payload is (or is gathered into) a view of this pool segment (decode maps
        it); `tamper` (drills) runs after sealing (streamed: on the first chunk's copy, after its hash)."""
        kv = payload if isinstance(payload, SavedKV) else SavedKV.gathered(payload)
        if segment is not None and (self.pool is None or segment.pool is not self.pool):
            segment = None  # leased from an earlier incarnation of this pair: the payload goes on the socket
        with self._submit_lock:  # never behind `close`'s sentinel, where the sender thread would not see it
            if self.broken is None and not self._closed:
                self._queue.put((header, kv, on_done, is_cancelled, segment, tamper))
                return
        self._drop((header, kv, on_done, is_cancelled, segment, tamper), f"pair is broken: {self.broken or 'closed'}")

    def _drop(self, item: tuple, error: str) -> None:
        """A queued transfer that will not be sent: its blocks and segment go back, its caller hears why."""
        _, kv, on_done, _, segment, _ = item
        kv.drop()
        if segment is not None:
            segment.release()  # never sent: decode will not give it back
        try:
            on_done(None, ChannelBroken(error))  # late fails both ends
        except Exception:  # noqa: BLE001 - a caller's callback must not stop the sender thread
            logger.exception("KV send callback failed")

    def close(self) -> None:
        with self._submit_lock:
            self._closed = True
            self._queue.put(None)
        self.on_loan.lapse_all()
        if self.pool is not None:
            self.pool.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # closed: nothing is queued behind it
                return
            if self.broken is not None or self._closed or item[3]():  # item[3]: is_cancelled
                self._drop(item, f"pair is broken: {self.broken}" if self.broken is not None else "pair closed"
                           if self._closed else "transfer cancelled: its deadline passed before it was sent")
                continue
            try:
                result, error = self._send_one(*item[:2], *item[4:])
            except Exception as exc:  # noqa: BLE001 - never the thread (a bug here fails one transfer)
                logger.exception("KV send failed")
                result, error = None, exc
            try:
                item[2](result, error)  # on_done
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the sender thread
                logger.exception("KV send callback failed")

    def _send_one(self, header: KVHeader, kv: SavedKV, segment: Segment | None,
                  tamper: Callable[[torch.Tensor], None] | None) -> tuple[SendResult | None, BaseException | None]:
        started = time.perf_counter()
        held = self.one_copy and segment is None and tamper is None and kv.in_blocks and self.pool is not None
        if held and self.pool.page is not None and self.on_loan.can_lend(kv.block_ids):
            return send_in_place(self, header, kv, self.pool.page, started)  # app/kv/in_place.py
        # past the loans' cap: gathered into a segment leased now (the engine thread leased none), not on the socket
        leased = self.pool.lease(header.num_bytes) if held else None
        segment = segment if leased is None else leased
        if segment is None and self.stream and streams(header):
            return send_streamed(self, header, kv, self._ring, tamper)  # on the socket, in chunks
        try:  # gathered (not lent: sent whole, the blocks freed at once)
            # [num_layers, num_blocks, *block_shape], into the segment if there is one
            payload = kv.gather(leased.view(header.shape, header.dtype) if leased is not None else None)
        except Exception as exc:  # noqa: BLE001 - nothing was sent: this transfer fails, the pair is fine
            if segment is not None:
                segment.release()
            logger.warning("KV gather failed, transfer dropped: %s", exc)
            return None, exc if isinstance(exc, KVNotGathered) else KVNotGathered(f"KV gather failed: {exc}")
        gathered = summed = time.perf_counter()
        try:  # whatever fails here (sealing included) fails this transfer and breaks the pair, never the thread
            if header.checksum == UNSEALED:
                header = replace(header, checksum=checksum(payload, header.checksum_algo))
            summed = time.perf_counter()
            if tamper is not None:
                tamper(payload)
            if segment is not None:
                header = replace(header, location=PAYLOAD_SEGMENT, seg_id=segment.seg_id, seg_fd=segment.fd)
            self.comm.send(header.encode(self.comm.device), TAG_HEADER, self.timeout_s)
            if segment is None:
                self.comm.send(payload.contiguous(), TAG_PAYLOAD, self.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - any failure breaks the pair
            self.broken = exc
            logger.warning("KV send failed, pair broken: %s", exc)
            return None, ChannelBroken(str(exc))
        return SendResult(num_bytes=header.num_bytes, send_s=time.perf_counter() - started,
                          checksum_s=summed - gathered, gather_s=gathered - started,
                          in_segment=segment is not None), None


class KVReceiver:
    """Decode side: drains every transfer of the pair into `deliver`, verifying each checksum."""

    def __init__(self, comm: Communicator, deliver: Callable[[Received], None],
                 on_broken: Callable[[BaseException], None], name: str = "pair", maps: SegmentMaps | None = None,
                 remote: list[torch.Tensor] | None = None, buffers: RecvBuffers | None = None):
        self.comm, self.buffers = comm, buffers  # buffers (a pair that streams: gloo): app/kv/streamed.py
        self.maps = maps
        self.remote = remote  # prefill's KV cache layers, mapped (one copy); None: payloads come in segments or inline
        self.alive = threading.Event()  # cleared when the pair ends: blocks of prefill's cache are no longer copied
        self.alive.set()
        if maps is not None:
            maps.on_failed = on_broken  # a release that cannot be sent would leave prefill's blocks lent for good
        self._deliver = deliver
        self._on_broken = on_broken
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped = True
        self.alive.clear()
        if self.maps is not None:
            self.maps.close()

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._deliver(self._receive_one())
        except BaseException as exc:  # noqa: BLE001 - transport gone or desynchronised
            if not self._stopped:
                logger.warning("KV receive loop stopped, pair broken: %s", exc)
                self._on_broken(exc)

    def _receive_one(self) -> Received:
        wire = torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self.comm.device)  # [HEADER_SLOTS]
        self.comm.recv(wire, TAG_HEADER)
        started = time.perf_counter()
        header = KVHeader.decode(wire)  # KVHeaderError here means the stream is out of step: break
        release = None
        if header.location == PAYLOAD_BLOCKS:  # blocks of prefill's KV cache, verified in place (app/kv/kv_share.py)
            if self.remote is None or self.maps is None:
                raise KVHeaderError("blocks of the sender's KV cache on a pair that did not map it")
            digest = None
            if header.checksum == DEFERRED:  # it follows in the pair's page while we read the blocks
                if self.maps.page is None:
                    raise KVHeaderError("a checksum that follows the header on a pair without a page for it")
                page, slot = self.maps.page, self.maps.page.next_slot()
                digest = lambda own_s: page.wait(slot, header.xfer_key, self.alive, WAIT_S + 4 * own_s)  # noqa: E731
            blocks, error = arrived_blocks(header, lambda ids: self.comm.recv(ids, TAG_PAYLOAD), self.remote,
                                           self.alive, digest)
            done = self.maps.done_fn(header.xfer_key)
            if error is not None:
                done()  # prefill may free them now
            return Received(header, blocks, error, time.perf_counter() - started, 0.0, None if error else done)
        if header.location != PAYLOAD_SEGMENT and header.checksum == DEFERRED:  # inline in chunks, the checksum after
            if self.buffers is None:
                raise KVHeaderError("a streamed payload on a pair that does not stream")
            return receive_streamed(self.comm, header, self.buffers, started)
        if header.location == PAYLOAD_SEGMENT:
            if self.maps is None:
                raise KVHeaderError("a shared-memory payload on a pair without shared memory")
            release = self.maps.release_fn(header.seg_id)
            try:
                payload = self.maps.view(header.seg_id, header.seg_fd, header.shape, header.dtype)
            except (OSError, ValueError) as exc:
                release()
                return Received(header, None, f"KV segment cannot be mapped: {exc}", 0.0, 0.0)
        else:
            payload = torch.empty(header.shape, dtype=header.dtype, device=self.comm.device)
            self.comm.recv(payload, TAG_PAYLOAD)
        received = time.perf_counter()
        actual = checksum(payload, header.checksum_algo)
        done = time.perf_counter()
        if actual != header.checksum:
            if release is not None:
                release()
            error = f"KV checksum mismatch (sent {header.checksum:#x}, received {actual:#x})"
            return Received(header, None, error, received - started, done - received)
        return Received(header, payload, None, received - started, done - received, release)
