"""Same node, one copy (app/kv/kv_share.py): prefill's KV cache moved into memfds in place, mapped by decode, a
prompt's blocks verified in place on arrival and copied straight out of it."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from app.kv.kv_share import copy_blocks, map_kv_cache, seal_blocks, share_kv_cache, verified_blocks
from app.kv.payload import checksum, gather_blocks


def _engine_like_layers(num_layers: int = 3, num_blocks: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """As vLLM allocates a CPU KV cache: one raw tensor, a [num_blocks, 2, 4] view per layer (K and V in a block)."""
    raw = torch.zeros(num_layers * num_blocks * 8)
    layers = [raw[i * num_blocks * 8 : (i + 1) * num_blocks * 8].view(num_blocks, 2, 4) for i in range(num_layers)]
    return raw, layers


def test_the_engines_views_write_into_the_shared_cache_and_a_mapping_of_it_reads_the_same():
    raw, layers = _engine_like_layers()
    layers[1][5].fill_(7.0)  # written before sharing: copied over
    shared = share_kv_cache(layers)
    assert len(shared.fds) == 1  # one storage under all layers, one memfd
    layers[2][3].fill_(-1.5)  # the engine writes after sharing: through its own views, into the memfd
    remote = map_kv_cache(shared.descriptor().tolist())  # decode's views (this process stands in for decode)
    assert all(torch.equal(r, x) for r, x in zip(remote, layers, strict=True))
    assert remote[1][5].eq(7.0).all() and remote[2][3].eq(-1.5).all()
    assert remote[0].data_ptr() != layers[0].data_ptr()  # a mapping of its own, not the engine's pages by address
    layers[0][0].fill_(2.0)
    assert remote[0][0].eq(2.0).all()  # the engine's next write is what decode reads
    raw.add_(0)  # the raw tensor the engine holds still works


def test_a_mapping_refuses_a_descriptor_whose_memfd_is_not_the_one_named():
    _, layers = _engine_like_layers()
    shared = share_kv_cache(layers)
    descriptor = shared.descriptor().tolist()
    descriptor[1] ^= 1  # another token: the fd is not the memfd of that name
    with pytest.raises(ValueError, match="is not segment"):
        map_kv_cache(descriptor)


def test_seal_in_place_equals_the_checksum_of_the_gathered_payload():
    _, layers = _engine_like_layers()
    for layer in layers:
        layer.copy_(torch.randn(layer.shape))
    ids = [9, 10, 11, 2, 5, 6]
    assert seal_blocks(layers, ids) == checksum(gather_blocks(layers, ids))


def test_copy_puts_each_block_where_decode_allocated_it_and_nothing_else():
    _, src = _engine_like_layers()
    for layer in src:
        layer.copy_(torch.randn(layer.shape))
    _, dst = _engine_like_layers()
    src_ids, dst_ids = [4, 5, 6, 12, 1], [7, 8, 3, 14, 15]  # runs on both sides, and blocks that break them
    copy_blocks(src, src_ids, dst, dst_ids)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[dst_ids], s[src_ids])
    untouched = sorted(set(range(16)) - set(dst_ids))
    assert all(d[untouched].eq(0).all() for d in dst)
    with pytest.raises(ValueError, match="do not fit"):
        copy_blocks(src, src_ids, dst, dst_ids[:-1])


def test_decode_verifies_the_blocks_in_place_and_refuses_changed_or_foreign_ones():
    from app.kv.header import UNSEALED, KVHeader, xfer_key
    from app.kv.payload import CHECKSUM_XXH3

    _, src = _engine_like_layers()
    for layer in src:
        layer.copy_(torch.randn(layer.shape))
    ids = [4, 5, 6, 12, 1]
    header = KVHeader(xfer_key("x"), 5 * 32, 5, torch.float32, (3, 5, 2, 4), CHECKSUM_XXH3, UNSEALED)
    header = replace(header, checksum=seal_blocks(src, ids))  # what prefill's sender thread sends
    alive = threading.Event()
    blocks, error = verified_blocks(src, ids, header, alive)
    assert error is None and blocks.block_ids == ids and blocks.nbytes == 3 * 5 * 8 * 4
    src[1][12][0, 0] += 1.0  # a block changed after the seal (reused by a bug, or a bit flipped)
    blocks, error = verified_blocks(src, ids, header, alive)
    assert blocks is None and "checksum mismatch" in error
    assert "do not fit" in verified_blocks(src, [4, 5, 6, 12, 99], header, alive)[1]  # past prefill's cache
    assert "do not fit" in verified_blocks(src, ids[:4], header, alive)[1]


def test_a_blocks_header_carries_its_block_ids_as_runs_and_refuses_more_than_fit():
    from app.kv.header import MAX_RUNS, PAYLOAD_BLOCKS, KVHeader, KVHeaderError, xfer_key
    from app.kv.payload import CHECKSUM_XXH3

    header = KVHeader(xfer_key("x"), 5 * 32, 5, torch.float32, (3, 5, 2, 4), CHECKSUM_XXH3, 123,
                      location=PAYLOAD_BLOCKS, runs=((4, 3), (12, 1), (1, 1)), first_token=9)
    assert KVHeader.decode(header.encode()) == header
    with pytest.raises(KVHeaderError, match="runs of block ids"):
        replace(header, runs=tuple((2 * i, 1) for i in range(MAX_RUNS + 1))).encode()


def test_lent_blocks_go_back_when_decode_says_so_and_outlive_a_broken_pair_by_decodes_lease():
    """Decode may copy blocks it verified for as long as it keeps arrived KV: when the pair breaks, prefill cannot hear
    that it is done, so the blocks stay that long (and a margin) before the engine may reuse them."""
    import time

    from app.kv.held import HeldBlocks, SavedKV
    from app.kv.loans import BlocksOnLoan

    held, loans = HeldBlocks(lease_s=60), BlocksOnLoan(max_blocks=3, lapse_s=0.1)
    layers = [torch.zeros(8, 2, 4)]
    kvs = {}
    for request_id, key in (("r1", 1), ("r2", 2)):
        held.hold(request_id)
        held.finish(request_id)
        kvs[request_id] = SavedKV.held(held, request_id, layers, (3, 4), None)
        assert kvs[request_id].claim()  # the sender thread, before the header goes
        loans.lend(key, kvs[request_id])
    # r1 and r2 share blocks 3 and 4 (a common prefix): lent twice, they count once against the cap
    assert loans.num_blocks() == 2 and loans.can_lend([3, 5]) and loans.can_lend([4, 3])
    assert not loans.can_lend([5, 6]) and loans.num_full == 1  # past the cap beside what is lent: gathered
    assert not loans.can_lend([5, 6, 7, 8]) and loans.num_full == 1  # bigger than the cap: never lent, book not full
    loans.returned(1)  # decode copied r1's blocks
    assert len(loans) == 1 and loans.num_blocks() == 2  # r2 still holds them
    loans.returned(1)  # a repeated release changes nothing
    assert loans.num_blocks() == 2 and loans.can_lend([5])
    held.hold("r3")
    held.finish("r3")
    r3 = SavedKV.held(held, "r3", layers, (5, 6), None)
    assert r3.claim()
    loans.lend(3, r3)
    assert loans.num_blocks() == 4
    loans.returned(3)  # blocks no other loan holds leave the book
    assert loans.num_blocks() == 2 and not loans.can_lend([5, 6]) and loans.can_lend([5])
    assert held.take_finished() == {"r1", "r3"}
    held.confirm({"r1", "r3"})
    loans.lapse_all()  # the pair broke while decode held r2's
    assert held.take_finished() == set()  # not yet: decode may still copy them
    time.sleep(0.15)
    assert held.take_finished() == {"r2"} and held.num_expired == 1 and len(loans) == 0 and loans.num_blocks() == 0


def test_decode_copies_no_block_of_prefills_cache_once_the_pair_that_carried_it_ended():
    """Prefill reuses lent blocks a lease's length after the pair ends; decode verified them on arrival, not at the
    copy: a load after the pair ended must fail (vLLM then recomputes the prompt), never copy what they hold now."""
    from app.kv.connector_meta import LoadSpec
    from app.kv.connector_worker import PDConnectorWorker
    from app.kv.header import PAYLOAD_BLOCKS, KVHeader, xfer_key
    from app.kv.hub import KVHub
    from app.kv.mailbox import KVMailbox
    from app.kv.payload import CHECKSUM_XXH3

    _, src = _engine_like_layers(num_layers=2, num_blocks=8)
    _, dst = _engine_like_layers(num_layers=2, num_blocks=8)
    for layer in src:
        layer.fill_(3.0)
    hub = KVHub(kv_layers=dst, mailbox=KVMailbox(lease_s=60))
    worker = PDConnectorWorker(32, hub)
    alive = threading.Event()
    alive.set()

    def arrive(name: str) -> None:
        header = KVHeader(xfer_key(name), 64, 2, torch.float32, (2, 2, 2, 4), CHECKSUM_XXH3, 0, location=PAYLOAD_BLOCKS)
        blocks, error = verified_blocks(src, [1, 2], replace(header, checksum=seal_blocks(src, [1, 2])), alive)
        assert error is None
        hub.mailbox.deliver(Received(header, blocks, None, 0.0, 0.0, None))
        hub.mailbox.expect(xfer_key(name), 60)
        hub.mailbox.reserve(xfer_key(name))

    from app.kv.channel import Received

    arrive("live")
    worker._load(LoadSpec("r1", "live", (5, 6), 0, 64, 63))  # noqa: SLF001 - the load itself
    assert all(layer[[5, 6]].eq(3.0).all() for layer in dst)
    arrive("orphan")
    alive.clear()  # the pair ended (prefill's listener lapses its loans; the engine may reuse them after)
    with pytest.raises(ValueError, match="pair that carried this KV ended"):
        worker._load(LoadSpec("r2", "orphan", (3, 4), 0, 64, 63))  # noqa: SLF001
    assert all(layer[[3, 4]].eq(0.0).all() for layer in dst)


def test_a_release_decode_cannot_send_breaks_the_pair():
    """Prefill's lent blocks go back only by release messages or by the pair's end: a release lost without the pair
    ending would leave them lent for good."""
    from app.kv.shm import SegmentMaps

    failures = []

    def send_release(kind: int, value: int) -> None:
        raise ConnectionError("peer gone")

    maps = SegmentMaps(0, 0, send_release)
    maps.on_failed = failures.append
    maps.done_fn(7)()
    maps._thread.join(5)  # noqa: SLF001 - the release thread stops after a failure
    assert len(failures) == 1 and isinstance(failures[0], ConnectionError)


def test_a_checksum_slot_is_read_only_whole_and_only_for_its_own_transfer():
    """Prefill posts a transfer's checksum after its header (app/kv/in_place.py): decode must never take a slot being
    written, or one a later transfer reused, for its transfer's."""
    import mmap
    import time

    from app.kv.in_place import _OFFSET, _SLOT, NUM_SLOTS, DigestPage, _check

    page = DigestPage(mmap.mmap(-1, mmap.PAGESIZE))
    alive = threading.Event()
    alive.set()
    assert [page.next_slot() for _ in range(NUM_SLOTS + 1)][-2:] == [NUM_SLOTS - 1, 0]  # a ring, as both ends count
    page.post(3, 77, 0x1234)
    assert page.wait(3, 77, alive) == 0x1234
    started = time.monotonic()
    assert page.wait(3, 78, alive, timeout_s=0.05) is None  # another transfer's slot: not ours, however long
    assert time.monotonic() - started >= 0.05
    _SLOT.pack_into(page.buffer, _OFFSET + 5 * _SLOT.size, 91, 0x55, 0)  # key and checksum, check word not yet
    assert page.wait(5, 91, alive, timeout_s=0.05) is None
    _SLOT.pack_into(page.buffer, _OFFSET + 5 * _SLOT.size, 91, 0x55, _check(91, 0x54))  # a torn mix of two posts
    assert page.wait(5, 91, alive, timeout_s=0.05) is None
    alive.clear()  # the pair ended: no waiting out the deadline
    started = time.monotonic()
    assert page.wait(6, 92, alive, timeout_s=30) is None and time.monotonic() - started < 1
    with pytest.raises(ValueError, match="fewer than"):
        DigestPage(mmap.mmap(-1, 512))


def test_decode_refuses_blocks_whose_checksum_came_different_or_never():
    from app.kv.header import DEFERRED, KVHeader, xfer_key
    from app.kv.payload import CHECKSUM_XXH3

    _, src = _engine_like_layers()
    for layer in src:
        layer.copy_(torch.randn(layer.shape))
    ids = [4, 5, 6]
    header = KVHeader(xfer_key("x"), 3 * 32, 3, torch.float32, (3, 3, 2, 4), CHECKSUM_XXH3, DEFERRED)
    alive = threading.Event()
    sealed = seal_blocks(src, ids)
    assert verified_blocks(src, ids, header, alive, lambda _: sealed)[1] is None
    assert "checksum mismatch" in verified_blocks(src, ids, header, alive, lambda _: sealed ^ 1)[1]
    assert "never came" in verified_blocks(src, ids, header, alive, lambda _: None)[1]
    assert "could not take" in verified_blocks(src, ids, header, alive, lambda _: -1)[1]


@pytest.fixture()
def one_copy_pair():
    """(send, received, sender, layers) of a real gloo pair in one process whose decode maps prefill's shared cache:
    `send(request_id, block_ids)` holds those blocks and submits them; `received` gets what the receive loop drains."""
    import queue
    import time

    from app.kv.channel import KVReceiver, KVSender
    from app.kv.held import HeldBlocks, SavedKV
    from app.kv.loans import BlocksOnLoan
    from app.kv.pairs import GlooPairComm
    from app.kv.shm import share_memory
    from tests.test_kv_shm_units import _both
    from tests.test_kv_units import _connected_pair

    _, layers = _engine_like_layers(num_layers=2, num_blocks=64)
    for layer in layers:
        layer.copy_(torch.randn(layer.shape))
    shared = share_kv_cache(layers)
    g0, g1 = _connected_pair(f"oc-{time.monotonic_ns()}")
    pool, maps = _both(lambda: share_memory("prefill", g0, 1, 5, 1 << 20)[0],
                       lambda: share_memory("decode", g1, 0, 5, 1 << 20)[1])
    assert pool.page is not None and maps.page is not None  # both keep the offer's probe: the pair's page
    received: queue.Queue = queue.Queue()
    sender = KVSender(GlooPairComm(g0, 1), timeout_s=5, watch_peer=True, pool=pool, one_copy=True,
                      loans=BlocksOnLoan(max_blocks=26))  # more blocks than that at once: gathered, sent whole
    receiver = KVReceiver(GlooPairComm(g1, 0), received.put, lambda exc: None, maps=maps,
                          remote=map_kv_cache(shared.descriptor().tolist()))
    held = HeldBlocks(lease_s=60)

    def send(request_id: str, block_ids: tuple[int, ...]):
        from app.kv.header import UNSEALED, KVHeader, xfer_key
        from app.kv.payload import CHECKSUM_XXH3

        held.hold(request_id)
        held.finish(request_id)
        kv = SavedKV.held(held, request_id, layers, block_ids, None)
        header = KVHeader(xfer_key(request_id), 32 * len(block_ids), len(block_ids), torch.float32,
                          (2, len(block_ids), 2, 4), CHECKSUM_XXH3, UNSEALED)
        done: queue.Queue = queue.Queue()
        sender.submit(header, kv, lambda res, err: done.put((res, err)))
        return done.get(timeout=10)

    yield send, received, sender, layers
    sender.close()
    receiver.close()
    g0.destroy_group()
    g1.destroy_group()


def test_on_a_pair_the_checksum_follows_the_header_and_decode_verifies_the_blocks_against_it(one_copy_pair):
    """Lent transfers (each in the page's next slot) among ones that are not (gathered: loans full) and one whose ids
    follow the header: both ends count the same transfers, or a later one would wait for a slot never posted."""
    from app.kv.header import DEFERRED, MAX_RUNS, PAYLOAD_SEGMENT
    from app.kv.kv_share import RemoteBlocks

    send, received, sender, layers = one_copy_pair
    scattered = tuple(range(0, 2 * (MAX_RUNS + 1), 2))  # more runs than a header carries: the ids follow it
    lent_later = []
    for i, ids in enumerate([(1, 2, 3), tuple(range(30, 55)), (7,), scattered, (9, 4, 10, 11)]):
        result, error = send(f"r{i}", ids)
        assert error is None
        got = received.get(timeout=10)
        assert got.error is None, got.error
        if len({1, 2, 3} | set(ids)) > 26:  # beside r0's, still lent: past the cap, gathered and sent whole
            assert got.header.checksum != DEFERRED and torch.equal(got.payload[1], layers[1][list(ids)])
            assert got.header.location == PAYLOAD_SEGMENT  # through the pair's shared memory, not on the socket
            got.release()
            continue
        assert got.header.checksum == DEFERRED  # the header went before its checksum
        assert isinstance(got.payload, RemoteBlocks) and got.payload.block_ids == list(ids)
        if i == 0:
            lent_later.append(got)  # still lent: the cap counts it when the gathered one comes
        else:
            got.release()  # copied: prefill gets the blocks back (its listener hears it a moment later)
            assert _wait(lambda: sender.on_loan.num_blocks() == 3)
    lent_later[0].release()
    assert _wait(lambda: len(sender.on_loan) == 0)


def test_on_a_pair_a_seal_that_fails_or_differs_fails_its_transfer_and_gives_the_blocks_back(
        one_copy_pair, monkeypatch):
    import app.kv.in_place as in_place

    send, received, sender, _ = one_copy_pair
    monkeypatch.setattr(in_place, "seal_blocks", lambda layers, ids: 1 // 0)
    result, error = send("bad", (2, 3))
    assert error is None  # the header went; the failure is decode's to see
    got = received.get(timeout=10)
    assert got.payload is None and "could not take" in got.error
    assert _wait(lambda: len(sender.on_loan) == 0)  # refused: decode gave them back at once
    monkeypatch.setattr(in_place, "seal_blocks", lambda layers, ids: 12345)  # prefill read other bytes than decode
    assert send("other", (2, 3))[1] is None
    got = received.get(timeout=10)
    assert got.payload is None and "checksum mismatch" in got.error
    monkeypatch.undo()
    result, error = send("good", (5,))  # the pair carries on, in the next slot
    got = received.get(timeout=10)
    assert error is None and got.error is None


def _wait(predicate, timeout_s: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()
