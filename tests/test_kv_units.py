"""KV transfer pieces without engines: payload, checksum, header, channel, mailbox, gloo pair group and
backend choice (the NCCL pair group and the NCCL path of `PairTransport`: tests/test_nccl_group_units.py)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace

import pytest
import torch

from app.kv import mailbox as mailbox_module
from app.kv.channel import TAG_HEADER, TAG_PAYLOAD, ChannelBroken, KVReceiver, KVSender, Received
from app.kv.gloo_group import PairGlooGroup
from app.kv.header import KVHeader, KVHeaderError, xfer_key
from app.kv.held import SavedKV
from app.kv.mailbox import KVMailbox, XferState
from app.kv.payload import (
    CHECKSUM_CRC32,
    CHECKSUM_WEIGHTED,
    CHECKSUM_XXH3,
    block_runs,
    checksum,
    gather_blocks,
    scatter_blocks,
)
from tests.helpers import dict_kv

BLOCK_SHAPE = (2, 32, 128)  # CPU layout: [num_kv_heads, block_size, 2 * head_size]


def _layers(seed: int, num_layers: int = 4, num_blocks: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((num_blocks, *BLOCK_SHAPE), generator=gen) for _ in range(num_layers)]


def _header_for(payload: torch.Tensor, xfer_id: str = "x", num_tokens: int | None = None) -> KVHeader:
    num_blocks = payload.shape[1]
    return KVHeader(xfer_key(xfer_id), num_tokens or num_blocks * 32, num_blocks, payload.dtype,
                    tuple(payload.shape), CHECKSUM_CRC32, checksum(payload, CHECKSUM_CRC32))


# 1. payload -------------------------------------------------------------------------------------

def test_gather_then_scatter_moves_exactly_the_chosen_blocks():
    src, dst = _layers(0), [torch.zeros((16, *BLOCK_SHAPE)) for _ in range(4)]
    payload = gather_blocks(src, [5, 2, 9])
    assert payload.shape == (4, 3, *BLOCK_SHAPE) and payload.is_contiguous()
    scatter_blocks(dst, [0, 1, 2], payload)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:3], s[[5, 2, 9]])
        assert not d[3:].any()
    with pytest.raises(ValueError):
        scatter_blocks(dst, [0, 1], payload)


@pytest.mark.parametrize("dst_ids", [
    list(range(40, 64)),  # one run: slices
    [50, 51, 52, 3, 4, 60, 61, 62, 63, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 24, 25, 30],  # 6 runs: slices
    list(range(0, 48, 2)),  # 24 runs of one: index_copy_
])
def test_scatter_writes_each_block_where_its_id_says_whatever_the_runs_of_consecutive_ids(dst_ids):
    src = _layers(1, num_blocks=24)
    payload = gather_blocks(src, list(range(24)))  # [4, 24, *BLOCK_SHAPE]
    dst = [torch.zeros((64, *BLOCK_SHAPE)) for _ in range(4)]
    scatter_blocks(dst, dst_ids, payload)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[dst_ids], s[:24])
        untouched = [b for b in range(64) if b not in dst_ids]
        assert not d[untouched].any()
    assert block_runs([50, 51, 52, 3, 4, 60, 61, 62, 63]) == [(0, 50, 3), (3, 3, 2), (5, 60, 4)]
    with pytest.raises(ValueError, match="does not fit"):  # a slice copy would broadcast it silently
        scatter_blocks(dst, dst_ids, payload[:, :, :1])
    with pytest.raises(ValueError, match="does not fit"):  # or cast it
        scatter_blocks(dst, dst_ids, payload.half())


@pytest.mark.parametrize("algo", [CHECKSUM_CRC32, CHECKSUM_WEIGHTED, CHECKSUM_XXH3])
def test_checksum_catches_a_flipped_value_and_reordered_blocks(algo):
    payload = gather_blocks(_layers(1), [0, 1, 2, 3])
    clean = checksum(payload, algo)
    assert checksum(payload.clone(), algo) == clean
    flipped = payload.clone()
    flipped.view(-1)[777] += 1.0
    assert checksum(flipped, algo) != clean
    swapped = payload[:, [1, 0, 2, 3]].contiguous()
    assert checksum(swapped, algo) != clean
    assert 0 <= clean < 2**63


# 2. header --------------------------------------------------------------------------------------

def test_header_round_trips_and_checks_what_the_receiver_expects():
    payload = gather_blocks(_layers(2), [1, 2, 3])
    header = _header_for(payload, num_tokens=70)
    assert KVHeader.decode(header.encode()) == header
    header.check(num_tokens=70, block_size=32, block_shape=BLOCK_SHAPE, num_layers=4, dtype=torch.float32)
    for kwargs in ({"num_tokens": 100}, {"num_layers": 5}, {"block_shape": (4, 32, 64)}, {"dtype": torch.bfloat16}):
        args = {"num_tokens": 70, "block_size": 32, "block_shape": BLOCK_SHAPE, "num_layers": 4,
                "dtype": torch.float32, **kwargs}
        with pytest.raises(KVHeaderError):
            header.check(**args)
    garbage = torch.zeros(24, dtype=torch.int64)
    with pytest.raises(KVHeaderError):
        KVHeader.decode(garbage)


# 3. channel over an in-memory link --------------------------------------------------------------

class _Link:
    """Both directions of an in-process link with per-tag FIFO queues."""

    device = torch.device("cpu")

    def __init__(self):
        self.queues: dict[int, queue.Queue] = {}
        self.closed = False

    def _q(self, tag: int) -> queue.Queue:
        return self.queues.setdefault(tag, queue.Queue())

    def send(self, tensor, tag, timeout_s):
        if self.closed:
            raise RuntimeError("link closed")
        self._q(tag).put(tensor.clone())

    def recv(self, tensor, tag):
        while True:
            if self.closed:
                raise RuntimeError("link closed")
            try:
                tensor.copy_(self._q(tag).get(timeout=0.05))
                return
            except queue.Empty:
                continue

    def close(self):
        self.closed = True


def _loopback() -> tuple[queue.Queue, KVReceiver, KVSender]:
    """A sender and a receive loop on one `_Link`; what the loop delivers (or the error that stopped it) lands in
    the queue."""
    link, delivered = _Link(), queue.Queue()
    return delivered, KVReceiver(link, delivered.put, delivered.put), KVSender(link, timeout_s=5)


def test_channel_delivers_in_order_and_flags_corrupted_payloads():
    delivered, receiver, sender = _loopback()
    results: queue.Queue = queue.Queue()
    payloads = [gather_blocks(_layers(i), [0, 1]) for i in range(3)]
    for i, payload in enumerate(payloads):
        header = _header_for(payload, f"req-{i}")
        if i == 1:  # corrupt after the checksum was taken: the receiver must refuse it
            payload = payload.clone()
            payload.view(-1)[0] += 1
        sender.submit(header, payload, lambda res, err: results.put((res, err)))
    got = [delivered.get(timeout=5) for _ in range(3)]
    assert [g.header.xfer_key for g in got] == [xfer_key(f"req-{i}") for i in range(3)]
    assert torch.equal(got[0].payload, payloads[0]) and torch.equal(got[2].payload, payloads[2])
    assert got[1].payload is None and "checksum mismatch" in got[1].error
    assert all(results.get(timeout=5)[1] is None for _ in range(3))
    receiver.close()
    sender.close()


def test_cancelled_transfer_is_never_sent_and_leaves_the_pair_usable():
    delivered, receiver, sender = _loopback()
    results: queue.Queue = queue.Queue()
    late, fresh = gather_blocks(_layers(5), [0]), gather_blocks(_layers(6), [1])
    sender.submit(_header_for(late, "late"), late, lambda res, err: results.put(err), is_cancelled=lambda: True)
    sender.submit(_header_for(fresh, "fresh"), fresh, lambda res, err: results.put(err))
    assert isinstance(results.get(timeout=5), ChannelBroken) and results.get(timeout=5) is None
    got = delivered.get(timeout=5)
    assert got.header.xfer_key == xfer_key("fresh") and delivered.empty()
    receiver.close()
    sender.close()


def test_broken_link_fails_sends_and_reports_receive_loop_death():
    link, broken = _Link(), queue.Queue()
    KVReceiver(link, lambda received: None, broken.put)
    sender = KVSender(link, timeout_s=1)
    link.close()
    results: queue.Queue = queue.Queue()
    payload = gather_blocks(_layers(3), [0])
    sender.submit(_header_for(payload), payload, lambda res, err: results.put(err))
    assert isinstance(results.get(timeout=5), ChannelBroken)
    assert isinstance(broken.get(timeout=5), RuntimeError)
    sender.submit(_header_for(payload), payload, lambda res, err: results.put(err))  # stays broken
    assert isinstance(results.get(timeout=5), ChannelBroken)


# 4. mailbox -------------------------------------------------------------------------------------

def _received(xfer_id: str, error: str | None = None) -> Received:
    payload = gather_blocks(_layers(4), [0])
    return Received(_header_for(payload, xfer_id), None if error else payload, error, 0.0, 0.0)


def test_mailbox_states_deadlines_leases_and_single_claim():
    woken = []
    box = KVMailbox(lease_s=0.2, on_change=lambda: woken.append(1))
    a, b, c = xfer_key("a"), xfer_key("b"), xfer_key("c")
    box.expect(a, timeout_s=5)
    assert box.state(a)[0] == XferState.EXPECTED
    box.deliver(_received("a"))
    assert box.state(a)[0] == XferState.ARRIVED and woken
    header, payload = box.claim(a)
    assert header.xfer_key == a and payload is not None
    with pytest.raises(KeyError):
        box.claim(a)  # used once
    box.deliver(_received("b", error="KV checksum mismatch"))
    assert box.state(b) == (XferState.FAILED, "KV checksum mismatch")
    with pytest.raises(KeyError):
        box.claim(b)  # a failed transfer is never data
    box.expect(c, timeout_s=0.05)
    time.sleep(0.1)
    assert box.state(c) == (XferState.FAILED, "KV transfer deadline passed")
    box.deliver(_received("c"))  # late arrival does not resurrect it
    assert box.state(c)[0] == XferState.FAILED
    box.forget(a)
    box.deliver(_received("a"))  # its request is over: a late copy is dropped at once, not held
    assert box.state(a)[0] is None and box.num_late == 1
    box.deliver(_received("orphan"))  # arrives, nobody ever claims it
    assert box.num_held_bytes() > 0
    time.sleep(0.25)
    box.sweep()
    assert box.num_held_bytes() == 0 and box.state(xfer_key("orphan"))[0] is None


def test_mailbox_drops_late_arrivals_for_a_lease_after_the_last_forget(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(mailbox_module.time, "monotonic", lambda: clock[0])
    box = KVMailbox(lease_s=10.0)
    a, b = xfer_key("a"), xfer_key("b")
    box.forget(a)  # at 100: late copies of a are dropped until 110
    clock[0] = 105.0
    box.forget(b)  # until 115
    clock[0] = 108.0
    box.forget(a)  # forgotten again: until 118, behind b in the sweep's order
    clock[0] = 116.0
    box.sweep()
    box.deliver(_received("b"))  # b's lease ended: held like any unknown arrival
    box.deliver(_received("a"))  # a's has not: dropped at once
    assert box.state(b)[0] == XferState.ARRIVED and box.state(a)[0] is None and box.num_late == 1



def test_mailbox_counts_a_transfer_from_expectation_to_forget_so_decode_keeps_chunking_local_prompts():
    box = KVMailbox(lease_s=5)
    assert len(box) == 0
    a = xfer_key("a")
    box.expect(a, timeout_s=5)  # a reply's KV is on its way: not in the engine yet, but coming
    assert len(box) == 1
    box.deliver(_received("a"))
    box.claim(a)
    assert len(box) == 1  # loaded, its reply decoding
    box.forget(a)
    assert len(box) == 0

def test_a_reserved_payload_waits_for_the_workers_claim_whatever_forget_fail_or_the_lease_do():
    """The connector told vLLM the KV is here (`reserve`); then the request's call was cancelled (`forget`), the
    ingress reported prefill failed (`fail`), or the lease ended: the worker must still load it in that step, or its
    load fails and the prompt is recomputed (and, were the request aborted first, its blocks stale in the prefix cache
    but for the eviction tests/test_kv_load_failure.py checks)."""
    released: list[str] = []
    box = KVMailbox(lease_s=0.1)

    def arrive(name: str) -> int:
        key = xfer_key(name)
        box.expect(key, timeout_s=5)
        box.deliver(replace(_received(name), release=lambda: released.append(name)))
        return key

    forgotten, failed, lapsed, aborted, waiting = (arrive(n) for n in ("forgotten", "failed", "lapsed", "aborted",
                                                                        "waiting"))
    assert all(box.reserve(key) == XferState.ARRIVED for key in (forgotten, failed, lapsed, aborted))
    assert box.reserve(xfer_key("never-came")) is None
    pending = xfer_key("pending")
    box.expect(pending, timeout_s=5)
    assert box.reserve(pending) == XferState.EXPECTED  # nothing to keep yet: still fails, forgets, lapses as before
    box.forget(pending)
    box.forget(forgotten)
    box.fail(failed, "prefill failed")

    def claim(key: int) -> None:
        header, payload = box.claim(key)
        assert header.xfer_key == key and payload is not None
        box.loaded(key)

    claim(forgotten)
    claim(failed)
    time.sleep(0.15)
    box.sweep()  # `lapsed` and `aborted` are past their lease; `waiting` (never reserved) fails as before
    assert box.state(waiting)[0] == XferState.FAILED and box.state(lapsed)[0] == XferState.ARRIVED
    claim(lapsed)
    assert len(box) == 4  # failed, lapsed, aborted, waiting: the ones their requests have not forgotten
    # a request aborted before its load lets its reservation go: forgotten first, then finished in the engine
    box.forget(aborted)
    assert len(box) == 4 and "aborted" not in released  # set aside for a claim that may still come this step
    box.unreserve(aborted)
    assert "aborted" in released and len(box) == 3
    # a set-aside payload nobody claims nor lets go is dropped once its lease ended
    stray = arrive("stray")
    box.reserve(stray)
    box.forget(stray)
    time.sleep(0.15)
    box.sweep()
    assert "stray" in released and box.num_held_bytes() == 0


# 5. gloo pair group -----------------------------------------------------------------------------

def _connected_pair(name: str) -> tuple[PairGlooGroup, PairGlooGroup]:
    store: dict = {}
    kv = dict_kv(store)
    groups = PairGlooGroup(2, 0, name), PairGlooGroup(2, 1, name)
    threads = [threading.Thread(target=g.connect, args=(20,), kwargs=kv) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g.is_connected for g in groups) and not store  # rendezvous key cleaned up
    return groups


def test_gloo_pair_groups_are_independent_and_tagged():
    (a0, a1), (b0, b1) = _connected_pair("ga"), _connected_pair("gb")
    x = torch.arange(8.0)
    sender = threading.Thread(target=lambda: (a0.send_tagged(x, 1, TAG_HEADER, 5), b0.send_tagged(x * 3, 1,
                                                                                                  TAG_PAYLOAD, 5)))
    sender.start()
    got_a, got_b = torch.empty(8), torch.empty(8)
    a1.recv_tagged(got_a, 0, TAG_HEADER)
    b1.recv_tagged(got_b, 0, TAG_PAYLOAD)
    sender.join()
    assert torch.equal(got_a, x) and torch.equal(got_b, x * 3)
    for g in (a0, a1, b0, b1):
        g.destroy_group()


def _connect_outcome(group: PairGlooGroup, store: dict, timeout_s: float) -> tuple[str, float]:
    """`group.connect`'s outcome (its error's text, or "ok") and seconds, waited for in a daemon thread so that a
    connect that never returns fails the test instead of hanging it."""
    outcome: queue.Queue = queue.Queue()

    def run() -> None:
        started = time.monotonic()
        try:
            group.connect(timeout_s, **dict_kv(store))
            outcome.put(("ok", time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.put((f"{type(exc).__name__}: {exc}", time.monotonic() - started))

    threading.Thread(target=run, daemon=True).start()
    return outcome.get(timeout=20)


def test_gloo_connect_gives_up_on_a_peer_that_never_joins_within_its_timeout():
    # A decode replica lost with its node: prefill (rank 0) forms the pair again for the next request routed
    # there. The process group's own timeout is idle-long, so the rendezvous itself must bound the wait.
    store: dict = {}
    prefill = PairGlooGroup(2, 0, "gnever")
    error, seconds = _connect_outcome(prefill, store, 1.0)
    assert error.startswith("TimeoutError") and "never joined" in error and seconds < 5
    assert not prefill.is_connected and not store  # its rendezvous key is gone with it
    # The other way round: decode (rank 1) reads the address of a prefill that died after publishing it.
    store[b"pdserve:gloo:gstale"] = b"127.0.0.1:9"  # nothing listens there
    decode = PairGlooGroup(2, 1, "gstale")
    error, seconds = _connect_outcome(decode, store, 1.0)
    assert error != "ok" and seconds < 5 and not decode.is_connected


def test_gloo_send_without_receiver_times_out():
    g0, g1 = _connected_pair("gt")
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        g0.send_tagged(torch.ones(4), 1, TAG_HEADER, timeout_s=0.3)
    assert time.monotonic() - started < 3
    g0.destroy_group()
    g1.destroy_group()


def test_gloo_watch_receive_fails_when_the_peer_goes_away():
    g0, g1 = _connected_pair("gw")
    failed = queue.Queue()

    def watch():
        try:
            g0.recv_tagged(torch.empty(1), 1, 3)
        except RuntimeError as exc:
            failed.put(str(exc))

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.2)
    g1.destroy_group()
    assert failed.get(timeout=10)
    g0.destroy_group()


# 6. backend choice (the NCCL pair group and its transport: tests/test_nccl_group_units.py) ---------

def test_backend_resolution_follows_the_kv_device():
    from app.kv.pairs import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_header_of_another_wire_version_is_refused_with_the_versions_this_side_reads():
    payload = gather_blocks(_layers(3), [0, 1])
    wire = _header_for(payload, num_tokens=40).encode()
    wire[1] = 99  # a newer sender
    with pytest.raises(KVHeaderError, match=r"version 99.*versions \(1, 2, 3, 4, 5, 6\)"):
        KVHeader.decode(wire)


def test_outbox_drops_a_send_whose_request_gave_up_and_counts_it():
    import asyncio

    from app.config import FaultInjection
    from app.kv.outbox import KVOutbox

    class Transport:  # records what the outbox queues on the pair's sender
        def __init__(self):
            self.queued = []

        def send(self, peer, header, payload, on_done, is_cancelled, segment=None, tamper=None):
            self.queued.append((peer, is_cancelled))

    async def run():
        transport = Transport()
        outbox = KVOutbox(transport, FaultInjection())
        late = outbox.open("x-late", "decode-a")
        outbox.on_saved("x-late", None, SavedKV.gathered(torch.zeros(4)))
        outbox.open("x-on-time", "decode-a")
        outbox.on_saved("x-on-time", None, SavedKV.gathered(torch.zeros(4)))
        late.cancelled = True  # its request's deadline passed before the sender got to it
        (peer, late_turn), (_, on_time_turn) = transport.queued
        return peer, late_turn(), on_time_turn(), outbox.num_cancelled_sends

    assert asyncio.run(run()) == ("decode-a", True, False, 1)


def test_outbox_wrong_kv_drill_sends_other_layers_kv_under_a_matching_checksum():
    import asyncio

    from app.config import FaultInjection
    from app.kv.header import UNSEALED, KVHeader
    from app.kv.outbox import KVOutbox

    delivered, receiver, sender = _loopback()

    class Transport:  # the outbox's pair, reduced to its sender
        def send(self, peer, header, payload, on_done, is_cancelled, segment=None, tamper=None):
            sender.submit(header, payload, on_done, is_cancelled, segment, tamper)

    payload = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [num_layers, num_blocks, block]
    header = KVHeader(xfer_key=7, num_tokens=90, num_blocks=3, dtype=torch.float32, shape=(2, 3, 4),
                      checksum_algo=CHECKSUM_CRC32, checksum=UNSEALED)  # as the engine thread builds it

    async def run():
        outbox = KVOutbox(Transport(), FaultInjection(wrong_kv_fraction=1.0))
        outgoing = outbox.open("x", "decode-a")
        outbox.on_saved("x", header, SavedKV.gathered(payload.clone()))
        return await asyncio.wait_for(outgoing.done, 5)

    assert asyncio.run(run()).num_bytes == payload.nbytes
    got = delivered.get(timeout=5)
    assert got.error is None  # sealed over the wrong KV: decode's verification passes
    assert torch.equal(got.payload, payload.flip(0)) and not torch.equal(got.payload, payload)  # layer 0 has 1's KV
    assert got.header.shape == header.shape and got.header.num_tokens == header.num_tokens
    receiver.close()
    sender.close()


def test_sender_thread_seals_the_header_and_a_tamper_after_it_is_caught():
    from app.kv.header import UNSEALED

    delivered, receiver, sender = _loopback()
    payload = gather_blocks(_layers(7), [0, 1])
    unsealed = replace(_header_for(payload, "sealed"), checksum=UNSEALED)
    sent: queue.Queue = queue.Queue()
    sender.submit(unsealed, payload.clone(), lambda res, err: sent.put((res, err)))
    sender.submit(replace(unsealed, xfer_key=xfer_key("tampered")), payload.clone(), lambda res, err: None,
                  tamper=lambda p: p.view(-1)[0].add_(1.0))
    good, bad = delivered.get(timeout=5), delivered.get(timeout=5)
    assert good.error is None and good.header.checksum == checksum(payload, CHECKSUM_CRC32) != UNSEALED
    assert torch.equal(good.payload, payload)
    assert bad.payload is None and "checksum mismatch" in bad.error
    result, error = sent.get(timeout=5)
    assert error is None and result.checksum_s > 0 and not result.in_segment
    receiver.close()
    sender.close()


def test_a_failure_while_sealing_fails_the_transfer_and_no_later_send_hangs():
    link = _Link()
    KVReceiver(link, lambda received: None, lambda exc: None)
    sender = KVSender(link, timeout_s=5)
    payload = gather_blocks(_layers(8), [0])
    results: queue.Queue = queue.Queue()

    def boom(tensor):
        raise RuntimeError("tamper failed")

    sender.submit(_header_for(payload, "a"), payload, lambda res, err: results.put(err), tamper=boom)
    sender.submit(_header_for(payload, "b"), payload, lambda res, err: results.put(err))
    first, second = results.get(timeout=5), results.get(timeout=5)  # both answered: the thread lives on
    assert isinstance(first, ChannelBroken) and "tamper failed" in str(first)
    assert isinstance(second, ChannelBroken)  # the pair is broken: its owner re-forms it
    sender.close()
