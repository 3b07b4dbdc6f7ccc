"""One copy on the pair's wire: the sender's half, and the page where prefill posts each transfer's checksum after its
header, so that prefill's seal and decode's verification read the blocks at the same time instead of one after the
other (each is a pass over every byte: at 128 MiB, 17-19 ms apiece here).

Life cycle of one transfer (the blocks and their loan: app/kv/kv_share.py):
1. Send (prefill's sender thread, `send_in_place`): the held blocks are claimed and lent; the header names them as runs
   of ids (`PAYLOAD_BLOCKS`) with the checksum `DEFERRED`, and goes. Then the thread seals the blocks (reads them in
   place) and posts (key, checksum) into the pair's next slot (`DigestPage.post`); a seal that fails posts `POISON`.
2. Verify (decode's receive loop): it reads the same blocks' checksum out of its mapping of prefill's cache meanwhile,
   then waits for that slot (`DigestPage.wait`; both ends count deferred headers in the order they travel) to hold
   this transfer's key, and compares. A checksum that never comes (deadline, or the pair ended) fails the transfer:
   decode recomputes the prompt, and gives the blocks back as for any refused transfer.

The page is the probe segment of the pair's shared-memory offer (app/kv/shm.py), which both ends keep mapped. A slot
is [key, checksum, check word (a hash of both)]: taken only when the three agree and the key is this transfer's, so a
slot being written (on any memory ordering, torn bytes included), or reused by a later transfer, is never read as
this one's: at worst it is not seen, and the transfer fails safe. Prefill reports such a send done; decode's refusal
(the prompt recomputed, with its reason) is the transfer's outcome.

What the checksum catches here: decode reading other bytes than prefill's (a mapping, offset or stride that is wrong)
and a change landing between the two passes' reads of its bytes. A held block changed by a bug before both passes
read it is not caught, as a change before the seal never was; the seal before the header also caught one between the
seal and decode's pass, at the price of running the passes one after the other. The holds (app/kv/held.py) are what
keep the blocks unchanged.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import xxhash

from app.kv.header import DEFERRED, MAX_RUNS, PAYLOAD_BLOCKS, KVHeader
from app.kv.held import KVNotGathered, SavedKV
from app.kv.kv_share import seal_blocks
from app.kv.payload import block_runs

if TYPE_CHECKING:
    from app.kv.channel import KVSender, SendResult

logger = logging.getLogger(__name__)

NUM_SLOTS = 64  # transfers a pair may have between header and verification; past that a slot is reused (fails safe)
POISON = -1  # posted when the seal failed: no checksum (a real one is 63 bits, never negative)
WAIT_S = 5.0  # how long decode waits for a checksum after taking its own, plus 4x its own pass (prefill's is the same)
_OFFSET = 64  # the probe's first 8 bytes hold its token (app/kv/shm.py); slots start past a cache line
_SLOT = struct.Struct("<qqq")  # key, checksum, check word
_PAIR = struct.Struct("<qq")


def _check(key: int, digest: int) -> int:
    return xxhash.xxh3_64_intdigest(_PAIR.pack(key, digest)) & 0x7FFF_FFFF_FFFF_FFFF


class DigestPage:
    """One end's mapping of the pair's page of deferred checksums, and its count of deferred headers."""

    def __init__(self, buffer: mmap.mmap):
        if len(buffer) < _OFFSET + NUM_SLOTS * _SLOT.size:
            raise ValueError(f"a page of {len(buffer)} bytes holds fewer than {NUM_SLOTS} checksum slots")
        self.buffer = buffer
        self._next = 0

    def next_slot(self) -> int:
        """The slot of the next deferred header (one thread per end counts: prefill's sender, decode's receive loop)."""
        slot, self._next = self._next, (self._next + 1) % NUM_SLOTS
        return slot

    def post(self, slot: int, key: int, digest: int) -> None:
        _SLOT.pack_into(self.buffer, _OFFSET + slot * _SLOT.size, key, digest, _check(key, digest))

    def wait(self, slot: int, key: int, alive: threading.Event, timeout_s: float = WAIT_S) -> int | None:
        """Transfer `key`'s checksum once posted in `slot` (`POISON` if prefill could not take it); None when it did
        not come within `timeout_s` or the pair ended."""
        deadline, pause = time.monotonic() + timeout_s, 20e-6
        while True:
            posted, digest, check = _SLOT.unpack_from(self.buffer, _OFFSET + slot * _SLOT.size)
            if posted == key and check == _check(key, digest):
                return digest
            if not alive.is_set() or time.monotonic() > deadline:
                return None
            time.sleep(pause)  # prefill's seal runs as long as ours did: it is close, or it is not coming
            pause = min(2 * pause, 1e-3)


def send_in_place(sender: KVSender, header: KVHeader, kv: SavedKV, page: DigestPage, started: float
                  ) -> tuple[SendResult | None, BaseException | None]:
    """Prefill's sender thread: the header names the held blocks, then their checksum follows in the page."""
    from app.kv.channel import TAG_HEADER, TAG_PAYLOAD, ChannelBroken, SendResult

    if not kv.claim():
        return None, KVNotGathered("the KV blocks were freed before their send's turn (lease ended)")
    slot = page.next_slot()
    try:
        runs = tuple((first, length) for _, first, length in block_runs(list(kv.block_ids)))
        header = replace(header, location=PAYLOAD_BLOCKS, checksum=DEFERRED,
                         runs=runs if len(runs) <= MAX_RUNS else ())  # in the header: no second message
        sender.on_loan.lend(header.xfer_key, kv)
        sender.comm.send(header.encode(sender.comm.device), TAG_HEADER, sender.timeout_s)
        if not header.runs:
            sender.comm.send(torch.tensor(kv.block_ids, dtype=torch.int64), TAG_PAYLOAD, sender.timeout_s)  # [blocks]
    except BaseException as exc:  # noqa: BLE001 - any failure breaks the pair
        if not sender.on_loan.lapse(header.xfer_key):  # decode may have the header, or not
            kv.drop()  # failed before the loan: nothing went out
        sender.broken = exc
        logger.warning("KV send failed, pair broken: %s", exc)
        return None, ChannelBroken(str(exc))
    sent = time.perf_counter()
    digest = POISON
    try:  # decode reads the same blocks meanwhile
        digest = seal_blocks(kv.layers, list(kv.block_ids))
    except Exception:  # noqa: BLE001 - decode refuses the transfer (and gives the blocks back); the pair is fine
        logger.exception("KV seal failed: the transfer fails")
    page.post(slot, header.xfer_key, digest)
    return SendResult(num_bytes=header.num_bytes, send_s=time.perf_counter() - started,
                      checksum_s=time.perf_counter() - sent, in_segment=True), None
