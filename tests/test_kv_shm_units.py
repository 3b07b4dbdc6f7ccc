"""The same-node payload path (app/kv/shm.py) on a real gloo pair in one process: the offer, a transfer whose
payload never crosses the socket, segment reuse and release on every path, the cap, and no /dev/shm files."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest
import torch

from app.kv.channel import KVReceiver, KVSender
from app.kv.header import PAYLOAD_SEGMENT, UNSEALED, KVHeader, xfer_key
from app.kv.mailbox import KVMailbox, XferState
from app.kv.pairs import GlooPairComm
from app.kv.payload import CHECKSUM_XXH3, checksum, gather_blocks, payload_shape, scatter_blocks
from app.kv.shm import SegmentPool, accept_segments, offer_segments, share_memory
from tests.test_kv_units import _connected_pair, _layers

MIB = 1 << 20


def _both(prefill_fn, decode_fn):
    """Run the two ends' calls at once (each blocks on the other)."""
    results = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("p", prefill_fn())),
               threading.Thread(target=lambda: results.__setitem__("d", decode_fn()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results["p"], results["d"]


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture()
def shm_pair():
    """(pool, sender, receiver, mailbox) of a pair whose ends agreed on shared memory."""
    g0, g1 = _connected_pair(f"shm-{time.monotonic_ns()}")
    pool, maps = _both(lambda: share_memory("prefill", g0, 1, 5, 64 * MIB)[0],
                       lambda: share_memory("decode", g1, 0, 5, 64 * MIB)[1])
    assert pool is not None and maps is not None  # one process: decode maps prefill's probe
    mailbox = KVMailbox(lease_s=60)
    sender = KVSender(GlooPairComm(g0, 1), timeout_s=5, watch_peer=True, pool=pool)
    receiver = KVReceiver(GlooPairComm(g1, 0), mailbox.deliver, lambda exc: None, maps=maps)
    yield pool, sender, receiver, mailbox
    sender.close()
    receiver.close()
    g0.destroy_group()
    g1.destroy_group()


def _send(pool: SegmentPool, sender: KVSender, layers, block_ids, xfer_id: str, tamper=None):
    """What prefill does: gather into a leased segment, submit an unsealed header; returns (result, error)."""
    shape = payload_shape(layers, len(block_ids))
    segment = pool.lease(layers[0].element_size() * torch.Size(shape).numel())
    payload = gather_blocks(layers, block_ids, out=segment.view(shape, layers[0].dtype))
    header = KVHeader(xfer_key(xfer_id), len(block_ids) * 32, len(block_ids), payload.dtype, shape, CHECKSUM_XXH3,
                      UNSEALED)
    done: queue.Queue = queue.Queue()
    sender.submit(header, payload, lambda res, err: done.put((res, err)), segment=segment, tamper=tamper)
    return segment, done.get(timeout=5)


def test_a_payload_goes_through_a_segment_is_loaded_and_the_segment_comes_back(shm_pair):
    pool, sender, receiver, mailbox = shm_pair
    src = _layers(3)
    # 1. prefill gathers into a segment; only the header crosses the socket
    segment, (result, error) = _send(pool, sender, src, [2, 5, 7], "a")
    assert error is None and result.in_segment and result.num_bytes == 3 * src[0][0].nbytes * len(src)
    key = xfer_key("a")
    assert _wait_for(lambda: mailbox.state(key)[0] == XferState.ARRIVED)
    # 2. decode claims and scatters from the mapped segment (its checksum matched: it is ARRIVED)
    header, payload = mailbox.claim(key)
    assert header.location == PAYLOAD_SEGMENT and header.seg_id == segment.seg_id
    dst = _layers(9)
    scatter_blocks(dst, [0, 1, 2], payload)
    assert all(torch.equal(d[[0, 1, 2]], s[[2, 5, 7]]) for d, s in zip(dst, src, strict=True))
    assert pool.num_busy() == 1  # decode still reads it until it says it loaded it
    # 3. loaded: the segment goes back to prefill, and the next payload of that size reuses it
    mailbox.loaded(key)
    assert _wait_for(lambda: pool.num_busy() == 0)
    again, (result, error) = _send(pool, sender, src, [1, 2, 3], "b")
    assert error is None and again.seg_id == segment.seg_id and pool.num_leased == 2 and len(pool._segments) == 1


def test_a_tampered_segment_is_refused_and_given_back(shm_pair):
    pool, sender, receiver, mailbox = shm_pair
    _, (result, error) = _send(pool, sender, _layers(4), [0, 1], "t", tamper=lambda p: p.view(-1)[0].add_(1.0))
    assert error is None  # the sender cannot know; decode's checksum must
    key = xfer_key("t")
    assert _wait_for(lambda: mailbox.state(key)[0] == XferState.FAILED)
    assert "checksum mismatch" in mailbox.state(key)[1]
    assert _wait_for(lambda: pool.num_busy() == 0)


@pytest.mark.parametrize("path", ["forgotten", "lease_ended", "late", "never_sent"])
def test_a_segment_comes_back_however_its_payload_ends(shm_pair, path):
    pool, sender, receiver, mailbox = shm_pair
    key = xfer_key(path)
    if path == "late":
        mailbox.forget(key)  # its request ended before the KV came
    if path == "never_sent":  # its request gave up while the send waited its turn
        segment = pool.lease(MIB)
        sender.submit(KVHeader(key, 32, 1, torch.float32, (1, 1, 8), CHECKSUM_XXH3, UNSEALED), torch.zeros(1, 1, 8),
                      lambda res, err: None, is_cancelled=lambda: True, segment=segment)
    else:
        _send(pool, sender, _layers(5), [0, 1], path)
    if path == "forgotten":
        assert _wait_for(lambda: mailbox.state(key)[0] == XferState.ARRIVED)
        mailbox.forget(key)
    if path == "lease_ended":
        assert _wait_for(lambda: mailbox.state(key)[0] == XferState.ARRIVED)
        mailbox.expect(key, 60)
        mailbox._records[key].deadline = 0.0  # its lease ended before decode scheduled it
        assert mailbox.sweep() == 1 and mailbox.state(key)[0] == XferState.FAILED
    assert _wait_for(lambda: pool.num_busy() == 0), f"segment not released ({path})"
    assert mailbox.num_held_bytes() == 0


def test_pool_stays_under_its_cap_and_reuses_the_smallest_free_segment():
    pool = SegmentPool(max_bytes=3 * MIB)
    first = pool.lease(MIB + 1)  # a 2 MiB segment
    assert first.size == 2 * MIB
    assert pool.lease(2 * MIB) is None and pool.num_full == 1  # would pass the cap: that payload uses the socket
    small = pool.lease(10)
    assert small.size == MIB and pool.num_bytes() == 3 * MIB
    pool.release(first.seg_id)
    pool.release(small.seg_id)
    assert pool.lease(100).seg_id == small.seg_id  # smallest that fits
    pool.close()
    assert pool.lease(10) is None


def test_the_offer_is_refused_where_the_peer_cannot_be_mapped():
    # decode's side: a pid that is not there (another node or container)
    answers: list[torch.Tensor] = []
    maps = accept_segments(lambda t: t.copy_(torch.tensor([2**22 + 12345, 3, 77])), answers.append, lambda s: None)
    assert maps is None and answers[0].tolist() == [0]
    # prefill's side: a "no" closes the pool
    pool = offer_segments(lambda t: None, lambda t: t.fill_(0), 64 * MIB)
    assert pool is None


def test_segments_leave_nothing_in_dev_shm_and_free_their_fds():
    before_shm, before_fds = set(os.listdir("/dev/shm")), len(os.listdir("/proc/self/fd"))
    pool = SegmentPool(max_bytes=16 * MIB)
    segments = [pool.lease(MIB) for _ in range(4)]
    assert all(s is not None for s in segments) and set(os.listdir("/dev/shm")) == before_shm  # memfds: no names
    pool.close()
    del segments  # a mapping (and its fd) lives as long as something still uses it, here the leases
    assert len(os.listdir("/proc/self/fd")) == before_fds


def test_a_segment_payload_checksum_is_taken_off_the_engine_thread(shm_pair):
    """The engine thread only gathers; the sender thread seals, over the segment's bytes."""
    pool, sender, receiver, mailbox = shm_pair
    src = _layers(6)
    segment, (result, error) = _send(pool, sender, src, [0, 3], "s")
    assert error is None and result.checksum_s > 0
    _wait_for(lambda: mailbox.state(xfer_key("s"))[0] == XferState.ARRIVED)
    header, payload = mailbox.claim(xfer_key("s"))
    assert header.checksum == checksum(gather_blocks(src, [0, 3]), CHECKSUM_XXH3)
    mailbox.loaded(xfer_key("s"))


def test_a_payload_claimed_for_loading_is_freed_by_loaded_not_by_forget():
    """An aborted request's record may be forgotten while the engine thread still scatters from the segment."""
    from app.kv.channel import Received

    released: list[int] = []
    mailbox, key = KVMailbox(lease_s=60), xfer_key("mid-scatter")
    header = KVHeader(key, 32, 1, torch.float32, (1, 1, 8), CHECKSUM_XXH3, 0)
    mailbox.expect(key, 60)
    mailbox.deliver(Received(header, torch.zeros(1, 1, 8), None, 0.0, 0.0, release=lambda: released.append(1)))
    mailbox.claim(key)
    mailbox.forget(key)  # the request ended (client gone) while its KV is being loaded
    assert released == []  # prefill must not reuse the segment yet
    mailbox.loaded(key)
    mailbox.loaded(key)
    assert released == [1]  # once


@pytest.mark.parametrize("enabled", [(0, 64 * MIB), (64 * MIB, 0)])
def test_a_pair_forms_without_shared_memory_when_either_end_has_it_off(enabled):
    prefill_max, decode_max = enabled
    g0, g1 = _connected_pair(f"half-{prefill_max}-{time.monotonic_ns()}")
    pool, maps = _both(lambda: share_memory("prefill", g0, 1, 5, prefill_max)[0],
                       lambda: share_memory("decode", g1, 0, 5, decode_max)[1])
    assert pool is None and maps is None  # both ends agree: payloads on the socket
    g0.destroy_group()
    g1.destroy_group()


def test_a_segment_of_an_earlier_incarnation_of_the_pair_goes_on_the_socket(shm_pair):
    pool, sender, receiver, mailbox = shm_pair
    old = SegmentPool(max_bytes=4 * MIB)  # the pool of a pair that was dropped and formed again meanwhile
    src = _layers(2)
    shape = payload_shape(src, 2)
    segment = old.lease(torch.Size(shape).numel() * 4)
    payload = gather_blocks(src, [0, 1], out=segment.view(shape, torch.float32))
    done: queue.Queue = queue.Queue()
    sender.submit(KVHeader(xfer_key("old"), 64, 2, torch.float32, shape, CHECKSUM_XXH3, UNSEALED), payload,
                  lambda res, err: done.put((res, err)), segment=segment)
    result, error = done.get(timeout=5)
    assert error is None and not result.in_segment  # inline: never named on the new pair, never freed into it
    assert _wait_for(lambda: mailbox.state(xfer_key("old"))[0] == XferState.ARRIVED)
    header, got = mailbox.claim(xfer_key("old"))
    assert header.location != PAYLOAD_SEGMENT and torch.equal(got, gather_blocks(src, [0, 1]))
    assert pool.num_busy() == 0 and old.num_busy() == 1
    old.close()


def test_the_outbox_frees_a_segment_whose_gather_never_reached_on_saved():
    import asyncio

    from app.config import FaultInjection
    from app.kv.outbox import KVOutbox

    pool = SegmentPool(max_bytes=4 * MIB)

    class Transport:
        def lease_segment(self, peer_id, num_bytes):
            return pool.lease(num_bytes)

    async def run():
        outbox = KVOutbox(Transport(), FaultInjection())
        outbox.open("x", "decode-a")
        assert outbox.payload_buffer("x", (2, 2, 8), torch.float32) is not None and pool.num_busy() == 1
        outbox.close("x")  # the prefill request ended; the engine step that leased it failed before on_saved

    asyncio.run(run())
    assert pool.num_busy() == 0
    pool.close()
