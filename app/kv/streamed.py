"""A payload on the pair's socket in chunks, its checksum after it, so that gather, checksum and the wire overlap.

Across nodes (or with shared memory off) the payload travels on the pair's gloo socket. Sent whole it ran gather,
checksum, send, receive and decode's checksum one after the other, each into freshly allocated memory whose pages
faulted in as they were written: 0.14x a memcpy of the same bytes at 8B-like sizes here, where gloo alone moves them
at 0.3x. A payload of more than one chunk (`streams`) goes streamed; one that fits a chunk goes whole, as before:
1. Send (prefill's sender thread, `send_streamed`): the header goes first with its checksum `DEFERRED`; then the
   payload (`[num_layers, num_blocks, *block_shape]`, rows = (layer, block) pairs in that order) in the chunks of
   `chunk_plan`: runs of consecutive rows of at most `CHUNK_BYTES`. A chunk whose blocks are consecutive in their
   layer is that layer's slice and goes from where it is (no copy); any other is gathered into a slot of the sender's
   `SendRing` (reused buffers). Each is hashed and handed to gloo without waiting (gloo's own thread writes it to the
   socket) while the next one is read. Once every chunk is out the checksum (XXH3 of the payload's bytes in order:
   what a sealed header carries) follows as one int64 on the payload's tag, and the held blocks go back; `POISON` if
   a chunk could not be read (the chunks still all go, so the stream stays in step and the pair lives; decode refuses
   the transfer).
2. Receive (decode's receive loop, `receive_streamed`): a buffer from decode's `RecvBuffers` (reused; given back when
   the payload is loaded or dropped: `Received.release`, as a shared-memory segment is), a receive posted for every
   chunk at once, each chunk hashed as soon as it is in while the next arrives; then the trailer is compared.
Both ends derive the chunks from the header alone (and `CHUNK_BYTES`, the same in one release), so the receives match
the sends one for one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import torch
import xxhash

from app.kv.header import DEFERRED, KVHeader
from app.kv.held import KVNotGathered, SavedKV
from app.kv.payload import CHECKSUM_XXH3

if TYPE_CHECKING:
    from app.kv.channel import KVSender, Received, SendResult

logger = logging.getLogger(__name__)

# gloo moves 4 MiB messages at full speed here; the ring then holds 16 MiB per pair. Both ends derive the chunks from
# it: a change is a change of the wire format (bump app/kv/header.py's VERSION).
CHUNK_BYTES = 4 << 20
RING_SLOTS = 4
POISON = -1  # the trailer of a payload prefill could not read (a real checksum is 63 bits, never negative)
MAX_IDLE_BYTES = 512 << 20  # receive buffers decode keeps for reuse between payloads (a 1000-token 8B fp32 prompt: 256)
_MASK = 0x7FFF_FFFF_FFFF_FFFF
_ROUND = 1 << 20


class Pending(Protocol):
    def wait(self, timeout_s: float | None) -> None: ...


class StreamingComm(Protocol):
    """A pair's `Communicator` (app/kv/channel.py) that also starts sends and receives without waiting (gloo's)."""

    device: torch.device

    def send(self, tensor: torch.Tensor, tag: int, timeout_s: float | None) -> None: ...

    def recv(self, tensor: torch.Tensor, tag: int) -> None: ...

    def isend(self, tensor: torch.Tensor, tag: int) -> Pending: ...

    def irecv(self, tensor: torch.Tensor, tag: int) -> Pending: ...


def chunk_plan(shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, int]]:
    """The payload's chunks as [first row, end row) of its `shape[0] * shape[1]` (layer, block) rows, each at most
    `CHUNK_BYTES` (or one row). Where a layer's part is large, chunks stay within layers: one of consecutive blocks is
    then a slice of the layer, sent from where it is; small layers share chunks (each message costs ~0.1 ms here)."""
    num_layers, num_blocks = shape[0], shape[1]
    row_bytes = torch.Size(shape[2:]).numel() * torch.empty((), dtype=dtype).element_size()
    per = max(1, CHUNK_BYTES // max(1, row_bytes))
    if num_blocks * row_bytes < CHUNK_BYTES // 4:
        rows = num_layers * num_blocks
        return [(first, min(rows, first + per)) for first in range(0, rows, per)]
    return [(layer * num_blocks + first, layer * num_blocks + min(num_blocks, first + per))
            for layer in range(num_layers) for first in range(0, num_blocks, per)]


def streams(header: KVHeader) -> bool:
    """Whether a payload goes in chunks: in one, it is sent whole (gathered, sealed, sent), one message fewer."""
    return header.checksum_algo == CHECKSUM_XXH3 and len(chunk_plan(header.shape, header.dtype)) > 1


def _rows(payload: torch.Tensor) -> torch.Tensor:
    return payload.view(payload.shape[0] * payload.shape[1], *payload.shape[2:])  # [rows, *block_shape]


def _digest_update(digest: xxhash.xxh3_64, part: torch.Tensor) -> None:
    digest.update(memoryview(part.reshape(-1).view(torch.uint8).numpy()))


class SendRing:
    """The sender thread's chunk buffers: slot i is reused once gloo finished sending what it held."""

    def __init__(self) -> None:
        self._slots: list[torch.Tensor] = []  # each uint8 [capacity]
        self._pending: list[Pending | None] = [None] * RING_SLOTS

    def take(self, index: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float | None) -> torch.Tensor:
        """Slot `index % RING_SLOTS` as a `shape` tensor, once its previous send is done."""
        slot = index % RING_SLOTS
        if (pending := self._pending[slot]) is not None:
            self._pending[slot] = None
            pending.wait(timeout_s)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        while len(self._slots) <= slot:
            self._slots.append(torch.empty(0, dtype=torch.uint8))
        if self._slots[slot].numel() < nbytes:
            self._slots[slot] = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
        return self._slots[slot][:nbytes].view(dtype).view(shape)

    def sending(self, index: int, pending: Pending) -> None:
        self._pending[index % RING_SLOTS] = pending

    def drain(self, timeout_s: float | None) -> None:
        for slot, pending in enumerate(self._pending):
            if pending is not None:
                self._pending[slot] = None
                pending.wait(timeout_s)


def _in_place(layers: list[torch.Tensor], block_ids: tuple[int, ...], first: int, end: int) -> torch.Tensor | None:
    """Payload rows [first, end) as the slice of their layer they are, when they lie in one layer, their blocks are
    consecutive and that slice is contiguous (sent from where they are, no copy); else None."""
    num_blocks = len(block_ids)
    layer, pos = divmod(first, num_blocks)
    count, block = end - first, block_ids[pos]
    if pos + count > num_blocks or block_ids[pos : pos + count] != tuple(range(block, block + count)):
        return None
    part = layers[layer][block : block + count]  # [count, *block_shape]
    return part if part.is_contiguous() else None


def _gather_rows(layers: list[torch.Tensor], ids: torch.Tensor, first: int, end: int, out: torch.Tensor) -> None:
    """Payload rows [first, end) of the held blocks `ids` ([num_blocks]), into `out` ([end - first, *block_shape])."""
    row, num_blocks = first, ids.numel()
    while row < end:
        layer, pos = divmod(row, num_blocks)
        stop = min(end, (layer + 1) * num_blocks)
        torch.index_select(layers[layer], 0, ids[pos : pos + stop - row], out=out[row - first : stop - first])
        row = stop


def send_streamed(sender: KVSender, header: KVHeader, kv: SavedKV, ring: SendRing,
                  tamper: Callable[[torch.Tensor], None] | None) -> tuple[SendResult | None, BaseException | None]:
    """Prefill's sender thread: header, chunks, trailer (module docstring), on a pair whose comm streams."""
    from app.kv.channel import TAG_HEADER, TAG_PAYLOAD, ChannelBroken, SendResult

    started = time.perf_counter()
    held = kv.in_blocks
    if held and not kv.claim():
        return None, KVNotGathered("the KV blocks were freed before their send's turn (lease ended)")
    comm, timeout_s = sender.comm, sender.timeout_s
    header = replace(header, checksum=DEFERRED)
    try:  # nothing went yet: a failure here fails this transfer only
        rows = None if held else _rows(kv.gather().contiguous())  # gathered already (a drill): sent from where it is
        ids = torch.tensor(kv.block_ids, dtype=torch.long) if held else None
    except Exception as exc:  # noqa: BLE001
        kv.drop()
        return None, KVNotGathered(f"KV gather failed: {exc}")
    digest, gather_s, checksum_s, failed = xxhash.xxh3_64(), 0.0, 0.0, None
    in_flight: list[Pending] = []  # sends from the blocks (or the payload) themselves, which stay until they are done
    try:
        comm.send(header.encode(comm.device), TAG_HEADER, timeout_s)
        sender.num_streamed += 1
        with torch.inference_mode():  # read the engine's (inference) tensors as the engine does
            for index, (first, end) in enumerate(chunk_plan(header.shape, header.dtype)):
                t0 = time.perf_counter()
                chunk = rows[first:end] if rows is not None else None
                if chunk is None and tamper is None:
                    chunk = _in_place(kv.layers, kv.block_ids, first, end)
                into_ring = chunk is None
                if into_ring:  # scattered blocks (or a drill that changes what it sends): gathered into the ring
                    chunk = ring.take(index, (end - first, *header.shape[2:]), header.dtype, timeout_s)
                    try:
                        if failed is None:
                            _gather_rows(kv.layers, ids, first, end, chunk)
                    except Exception as exc:  # noqa: BLE001 - the rest still goes (the stream stays in step)
                        failed = exc
                        logger.warning("KV gather failed mid-stream, the transfer fails: %s", exc)
                t1 = time.perf_counter()
                if failed is None:
                    _digest_update(digest, chunk)
                if tamper is not None and index == 0:
                    tamper(chunk)  # after it was hashed: decode's verification must catch it
                t2 = time.perf_counter()
                gather_s, checksum_s = gather_s + t1 - t0, checksum_s + t2 - t1
                pending = comm.isend(chunk, TAG_PAYLOAD)
                if into_ring:
                    ring.sending(index, pending)
                else:
                    in_flight.append(pending)
        ring.drain(timeout_s)
        for pending in in_flight:
            pending.wait(timeout_s)
        trailer = POISON if failed is not None else digest.intdigest() & _MASK
        comm.send(torch.tensor([trailer], dtype=torch.int64, device=comm.device), TAG_PAYLOAD, timeout_s)
    except BaseException as exc:  # noqa: BLE001 - any transport failure breaks the pair
        sender.broken = exc
        logger.warning("KV send failed, pair broken: %s", exc)
        comm.close()  # sends still under way end before the blocks they read can go back (whatever else happens)
        return None, ChannelBroken(str(exc))
    finally:
        kv.drop()  # every block was read and sent (or the pair is gone): the engine may free them now
    if failed is not None:
        return None, KVNotGathered(f"KV gather failed: {failed}")
    return SendResult(num_bytes=header.num_bytes, send_s=time.perf_counter() - started, checksum_s=checksum_s,
                      gather_s=gather_s, streamed=True), None


class RecvBuffers:
    """Decode's receive buffers for streamed payloads, reused (a fresh one's pages fault in as the socket fills them,
    which cost as much as the copy itself at 8B-like sizes). Shared by every pair of the replica; thread-safe."""

    def __init__(self, max_idle_bytes: int = MAX_IDLE_BYTES):
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[torch.Tensor] = []  # each uint8 [capacity]
        self._lock = threading.Lock()
        self.num_allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
        """A `shape` tensor and the callback that gives its buffer back (once; later calls do nothing)."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        with self._lock:  # the smallest idle buffer that fits, not twice too big (by index: `==` compares elements)
            fits = [i for i, b in enumerate(self._idle) if nbytes <= b.numel() <= 2 * nbytes + _ROUND]
            buffer = self._idle.pop(min(fits, key=lambda i: self._idle[i].numel())) if fits else None
            self.num_allocated += buffer is None
        if buffer is None:
            buffer = torch.empty(-(-max(nbytes, 1) // _ROUND) * _ROUND, dtype=torch.uint8)
        given = threading.Event()

        def give_back() -> None:
            with self._lock:
                if given.is_set():
                    return
                given.set()
                if sum(b.numel() for b in self._idle) + buffer.numel() <= self.max_idle_bytes:
                    self._idle.append(buffer)

        return buffer[:nbytes].view(dtype).view(shape), give_back

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)


def receive_streamed(comm: StreamingComm, header: KVHeader, buffers: RecvBuffers, started: float) -> Received:
    """Decode's receive loop: the chunks of a streamed payload and its trailer (module docstring). Raises on a transport
    failure (the pair breaks); a checksum that differs is a refused transfer."""
    from app.kv.channel import TAG_PAYLOAD, Received

    payload, release = buffers.take(header.shape, header.dtype)
    rows, digest, checksum_s = _rows(payload), xxhash.xxh3_64(), 0.0
    # A transport failure raises from here with the buffer not given back: receives into it may still be posted
    # until the pair is torn down.
    plan = chunk_plan(header.shape, header.dtype)
    pending = [comm.irecv(rows[first:end], TAG_PAYLOAD) for first, end in plan]  # all posted: gloo fills them
    for index, (first, end) in enumerate(plan):
        pending[index].wait(None)
        t0 = time.perf_counter()
        _digest_update(digest, rows[first:end])
        checksum_s += time.perf_counter() - t0
    trailer = torch.empty(1, dtype=torch.int64, device=comm.device)
    comm.recv(trailer, TAG_PAYLOAD)
    sent, actual, recv_s = int(trailer.item()), digest.intdigest() & _MASK, time.perf_counter() - started
    if sent == actual:
        return Received(header, payload, None, recv_s, checksum_s, release)
    release()
    error = ("the sender could not read this KV out of its blocks" if sent == POISON
             else f"KV checksum mismatch (sent {sent:#x}, received {actual:#x})")
    return Received(header, None, error, recv_s, checksum_s)
