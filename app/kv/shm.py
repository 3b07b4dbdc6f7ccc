"""Same-node fast path: a prompt's KV payload moves through shared memory instead of over the pair's socket.

When a prefill and a decode replica share a node (and a PID namespace), prefill gathers a prompt's blocks
straight into a shared-memory segment, sends only the header on the pair group, and decode maps the
segment, verifies the checksum and scatters from it into its own blocks: two copies in all (gather,
scatter), none through a socket. Segments are `memfd`s: they have no name in /dev/shm, so nothing is
left behind whatever dies, and their memory lives until the last process that maps them lets go.

Life cycle, per pair:
1. Offer (`offer_segments`, prefill, while the pair forms): a probe segment holding a random token;
   decode (`accept_segments`) opens it through `/proc/<pid>/fd/<fd>`, checks its name and content and
   answers yes or no. No: this pair sends every payload over the socket (other node, other container).
   Yes: both ends keep the probe mapped, as the pair's page of checksums that follow headers (app/kv/in_place.py).
2. Lease (`SegmentPool.lease`, prefill's engine thread): a free segment big enough, or a new one while
   the pool stays under its byte cap; none (cap reached): this payload goes over the socket.
3. Send: the header names the segment (`location`, `seg_id`, `seg_fd`); from then on decode owns it.
4. Map (`SegmentMaps.view`, decode's receive loop): each segment is opened and mapped once per pair and
   reused; the payload is a view of it.
5. Release (`SegmentMaps.release_fn`): once the payload was scattered, refused, dropped or expired, decode
   sends the segment id back (`TAG_RELEASE`, from a thread of its own); prefill's listener frees it.
6. Pair dropped: prefill forgets its segments and decode its mappings (views still in use keep theirs).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.kv.in_place import DigestPage

logger = logging.getLogger(__name__)

TAG_HELLO = 4  # the offer (prefill -> decode) and the answer (decode -> prefill), once per pair
TAG_RELEASE = 5  # decode -> prefill: [kind, value]: a segment decode is done with, or held blocks it has copied
RELEASE_SEGMENT = 0  # value: the segment's id
RELEASE_BLOCKS = 1  # value: the transfer's wire key (app/kv/kv_share.py)
_HELLO_SLOTS = 3  # [pid, probe fd, probe token]
_ALIGN = 1 << 20  # segment sizes are whole MiB, so a slightly bigger prompt reuses a segment


def _memfd_name(token: int, seg_id: int) -> str:
    return f"pdkv-{token:x}-{seg_id}"


@dataclass(eq=False)
class Segment:
    seg_id: int
    fd: int
    size: int
    buffer: mmap.mmap
    busy: bool = False
    pool: SegmentPool | None = None  # the pool (so the pair incarnation) it belongs to; only it may send or free it

    def release(self) -> None:
        """Give the segment back to its own pool (never to a later pool of the same peer)."""
        if self.pool is not None:
            self.pool.release(self.seg_id)

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        return torch.frombuffer(self.buffer, dtype=dtype, count=numel).view(shape)


def _create(token: int, seg_id: int, size: int) -> Segment:
    fd = os.memfd_create(_memfd_name(token, seg_id), os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        # MAP_POPULATE: the pages are faulted in once, here, not on every first write of a gather.
        buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        os.close(fd)
        raise
    return Segment(seg_id, fd, size, buffer)


class SegmentPool:
    """Prefill side, one per pair: segments leased for a payload and freed when decode releases them."""

    def __init__(self, max_bytes: int):
        self.token = secrets.randbits(62)
        self.max_bytes = max_bytes
        self._segments: dict[int, Segment] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._closed = False
        self.num_leased = 0
        self.num_full = 0  # leases refused at the cap: those payloads went over the socket
        self.page: DigestPage | None = None  # the offer's probe, kept: checksums that follow headers (one copy)

    def lease(self, num_bytes: int) -> Segment | None:
        """The smallest free segment that fits, else a new one under the cap, else None."""
        with self._lock:
            if self._closed:
                return None
            free = [s for s in self._segments.values() if not s.busy and s.size >= num_bytes]
            if free:
                segment = min(free, key=lambda s: s.size)
            else:
                size = -(-num_bytes // _ALIGN) * _ALIGN
                if sum(s.size for s in self._segments.values()) + size > self.max_bytes:
                    self.num_full += 1
                    return None
                segment = self._segments[self._next_id] = _create(self.token, self._next_id, size)
                segment.pool = self
                self._next_id += 1
            segment.busy = True
            self.num_leased += 1
            return segment

    def release(self, seg_id: int) -> None:
        with self._lock:
            segment = self._segments.get(seg_id)
            if segment is not None:
                segment.busy = False

    def num_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments.values())

    def num_busy(self) -> int:
        """Segments leased and not given back yet (0 once every transfer ended, however it ended)."""
        with self._lock:
            return sum(s.busy for s in self._segments.values())

    def close(self) -> None:
        """Forget every segment: closing the fds frees the memory once no mapping (or view) uses it."""
        with self._lock:
            self._closed = True
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            os.close(segment.fd)  # the mmap itself goes with its last view (closing it under a view would fail)


class SegmentMaps:
    """Decode side, one per pair: the peer's segments mapped once each, and releases sent back to it."""

    def __init__(self, pid: int, token: int, send_release: Callable[[int, int], None], page: DigestPage | None = None):
        self.pid, self.token, self.page = pid, token, page  # page: prefill's probe, mapped (app/kv/in_place.py)
        self._maps: dict[tuple[int, int], mmap.mmap] = {}  # (seg_id, fd) -> mapping
        self._releases: queue.SimpleQueue = queue.SimpleQueue()
        self._send_release = send_release
        self.on_failed: Callable[[BaseException], None] = lambda exc: None  # the receiver breaks the pair
        self._thread = threading.Thread(target=self._run, name="kv-shm-release", daemon=True)
        self._thread.start()

    def view(self, seg_id: int, fd: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The payload in segment `seg_id` (`shape`, `dtype`); raises OSError/ValueError if it cannot be mapped."""
        buffer = self._maps.get((seg_id, fd))
        if buffer is None:
            buffer = self._maps[(seg_id, fd)] = open_memfd(self.pid, fd, _memfd_name(self.token, seg_id))
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * torch.empty((), dtype=dtype).element_size() > len(buffer):
            raise ValueError(f"segment {seg_id} holds {len(buffer)} bytes, too few for a payload of {shape}")
        return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)

    def release_fn(self, seg_id: int) -> Callable[[], None]:
        """A callback that gives segment `seg_id` back to prefill, once, from any thread, without blocking."""
        return self._once(RELEASE_SEGMENT, seg_id)

    def done_fn(self, key: int) -> Callable[[], None]:
        """A callback that tells prefill, once, that transfer `key`'s held blocks were copied (or never will be)."""
        return self._once(RELEASE_BLOCKS, key)

    def _once(self, kind: int, value: int) -> Callable[[], None]:
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._releases.put((kind, value))

        return release

    def close(self) -> None:
        self._maps.clear()  # views still in use keep their mapping alive
        self._releases.put(None)

    def _run(self) -> None:
        while (item := self._releases.get()) is not None:
            try:
                self._send_release(*item)
            except BaseException as exc:  # noqa: BLE001 - the pair broke; prefill forgets its segments anyway
                logger.warning("segment release not sent, later ones are dropped (pair gone?): %s", exc)
                # and breaks it, should it still stand: prefill's blocks lent to us go back only by these messages,
                # or by the pair's end
                self.on_failed(exc)
                return


def open_memfd(pid: int, fd: int, name: str, populate: bool = True) -> mmap.mmap:
    """Map the peer's memfd `fd`, after checking it is the segment we were told about (not a reused fd); `populate`:
    fault every page in now (a segment, read whole each time), not as it is first read (a whole KV cache)."""
    path = f"/proc/{pid}/fd/{fd}"
    own = os.open(path, os.O_RDWR)
    try:
        # checked on what was opened (not on the path, whose fd the peer may have closed and reused meanwhile)
        if not os.readlink(f"/proc/self/fd/{own}").startswith(f"/memfd:{name} "):
            raise ValueError(f"{path} is not segment {name}")
        return mmap.mmap(own, 0, flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0))
    finally:
        os.close(own)  # the mapping keeps the memory


# -- the offer, once per pair ------------------------------------------------------------------------

def share_memory(role: str, group, peer_rank: int, timeout_s: float, max_bytes: int
                 ) -> tuple[SegmentPool | None, SegmentMaps | None]:
    """Offer (prefill) or answer (decode) the same-node path on a connected `PairGlooGroup`; returns
    (prefill's pool, decode's maps), each None where this pair sends payloads over the socket. Both ends always
    exchange the offer and the answer, so one that has shared memory off (`max_bytes` 0) still pairs with one
    that has it on: it offers nothing, or answers no."""

    def send(tensor: torch.Tensor, tag: int = TAG_HELLO) -> None:
        group.send_tagged(tensor, peer_rank, tag, timeout_s)

    def recv(tensor: torch.Tensor) -> None:
        group.recv_tagged(tensor, peer_rank, TAG_HELLO, timeout_s)

    if role == "prefill":
        return offer_segments(send, recv, max_bytes), None

    def send_release(kind: int, value: int) -> None:
        send(torch.tensor([kind, value], dtype=torch.int64), TAG_RELEASE)  # [2]

    return None, accept_segments(recv, send, send_release, enabled=max_bytes > 0)


def offer_segments(send: Callable[[torch.Tensor], None], recv: Callable[[torch.Tensor], None],
                   max_bytes: int) -> SegmentPool | None:
    """Prefill: offer shared memory to the decode peer (nothing when `max_bytes` is 0); a pool if it can map our
    segments, else None."""
    answer = torch.zeros(1, dtype=torch.int64)
    if not max_bytes:
        send(torch.zeros(_HELLO_SLOTS, dtype=torch.int64))  # pid 0: no offer
        recv(answer)
        return None
    pool = SegmentPool(max_bytes)
    probe = _create(pool.token, 0, mmap.PAGESIZE)
    try:
        probe.buffer[:8] = pool.token.to_bytes(8, "little")
        send(torch.tensor([os.getpid(), probe.fd, pool.token], dtype=torch.int64))  # [_HELLO_SLOTS]
        recv(answer)
    finally:
        os.close(probe.fd)
    if int(answer.item()) == 1:
        pool.page = DigestPage(probe.buffer)
        return pool
    pool.close()
    return None


def accept_segments(recv: Callable[[torch.Tensor], None], send: Callable[[torch.Tensor], None],
                    send_release: Callable[[int, int], None], enabled: bool = True) -> SegmentMaps | None:
    """Decode: answer prefill's offer; the peer's segment maps if its probe could be mapped, else None."""
    offer = torch.zeros(_HELLO_SLOTS, dtype=torch.int64)
    recv(offer)
    pid, fd, token = offer.tolist()
    ok, probe = False, None
    if enabled and pid:
        try:
            probe = open_memfd(pid, fd, _memfd_name(token, 0))
            ok = probe[:8] == token.to_bytes(8, "little")
        except (OSError, ValueError) as exc:  # another node, container or PID namespace
            logger.info("peer's shared memory cannot be mapped here (%s): payloads go over the socket", exc)
    send(torch.tensor([int(ok)], dtype=torch.int64))
    return SegmentMaps(pid, token, send_release, DigestPage(probe)) if ok and probe is not None else None
