"""`PairNccl` (pdserve's NCCL pair group) and its channel link on the CPU, against a stand-in for
`ProcessGroupNCCL` that behaves as NCCL does: a call only enqueues work and returns; the work completes
later, once the peer has posted the matching operation and the (delayed) copy has run, or never, when
the peer never posts it; `abort()` fails whatever is pending. The rendezvous and the control messages use
a real `TCPStore`; Ray's KV is a dict.
"""

from __future__ import annotations

import datetime
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from app.kv import nccl_group, rendezvous
from app.kv.channel import TAG_PAYLOAD, ChannelBroken, KVReceiver, KVSender
from app.kv.header import KVHeader, xfer_key
from app.kv.nccl_comm import NcclPairComm
from app.kv.nccl_control import StoreControl
from app.kv.nccl_group import NcclPairError, PairNccl
from app.kv.payload import CHECKSUM_CRC32, checksum
from tests.helpers import dict_kv, in_thread

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# -- a stand-in for ProcessGroupNCCL ------------------------------------------------------------------

class FakeWork:
    """NCCL work: `is_completed()` turns true when the GPU is done; `wait()` never blocks the CPU."""

    def __init__(self, num_ops: int):
        self._left = num_ops
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: str | None = None
        self.wait_calls = 0
        if num_ops == 0:
            self._done.set()

    def op_done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def fail(self, error: str) -> None:
        self.error = error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> bool:
        self.wait_calls += 1
        if self.error is not None:
            raise RuntimeError(self.error)
        return True  # real NCCL: only makes the current stream wait; a caller that returned here early
        # would report a transfer done at enqueue


class FakeWire:
    """The link between fake ranks: FIFO per (src, dst) like one NCCL channel; a matched send/recv is
    copied on a 'stream' thread after `delay_s`, then both works complete."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._sends: dict[tuple[int, int], deque] = {}
        self._recvs: dict[tuple[int, int], deque] = {}
        self.pgs: dict[int, FakeNcclPG] = {}  # by rank
        self._members = threading.Condition(self._lock)
        self.connected: set[int] = set()

    def join(self, rank: int, world_size: int, timeout_s: float = 30.0) -> None:
        """Like ncclCommInitRank: returns once every rank has called it (or hangs, here up to 30 s)."""
        with self._members:
            self.connected.add(rank)
            self._members.notify_all()
            self._members.wait_for(lambda: len(self.connected) >= world_size, timeout_s)

    def post(self, kind: str, src: int, dst: int, tensor: torch.Tensor, work: FakeWork) -> None:
        with self._lock:
            mine, theirs = (self._sends, self._recvs) if kind == "send" else (self._recvs, self._sends)
            waiting = theirs.get((src, dst))
            if waiting:
                other_tensor, other_work = waiting.popleft()
                send, recv = (tensor, other_tensor) if kind == "send" else (other_tensor, tensor)
                self._deliver(send, recv, (work, other_work))
            else:
                mine.setdefault((src, dst), deque()).append((tensor, work))

    def _deliver(self, send: torch.Tensor, recv: torch.Tensor, works) -> None:
        snapshot = send.clone()

        def copy() -> None:
            time.sleep(self.delay_s)
            if any(w.error for w in works):
                return
            recv.copy_(snapshot)
            for w in works:
                w.op_done()

        threading.Thread(target=copy, daemon=True).start()

    def fail_rank(self, rank: int, error: str) -> None:
        with self._lock:
            for table in (self._sends, self._recvs):
                for (src, dst), pending in table.items():
                    if rank in (src, dst) and pending:
                        for _, work in pending:
                            work.fail(error)
                        pending.clear()

    def pending(self, rank: int) -> int:
        with self._lock:
            return sum(len(q) for table in (self._sends, self._recvs) for (s, d), q in table.items() if rank in (s, d))


class FakeNcclPG:
    def __init__(self, wire: FakeWire, rank: int, world_size: int, timeout: datetime.timedelta):
        self.wire, self.rank, self.world_size, self.timeout = wire, rank, world_size, timeout
        self.aborted = False
        self.initialized = False
        self.refuse: str | None = None  # an error NCCL raises at enqueue (e.g. invalid usage)
        self.grouped_calls: list[list[str]] = []
        self._ops: list | None = None
        self._works: list[FakeWork] = []
        wire.pgs[rank] = self

    def eager_connect_single_device(self, device) -> None:
        self.wire.join(self.rank, self.world_size)
        self.initialized = True

    def _start_coalescing(self) -> None:  # as torch 2.11's ProcessGroupNCCL (a Backend): no device
        assert self._ops is None, "nested grouped calls"
        self._ops = []

    def send(self, tensors, dst, tag):
        self._ops.append(("send", tensors[0], dst))

    def recv(self, tensors, src, tag):
        if self.refuse:
            raise RuntimeError(self.refuse)
        self._ops.append(("recv", tensors[0], src))

    def _end_coalescing(self) -> FakeWork:
        assert self.initialized, "an NCCL operation before the communicator exists"
        ops, self._ops = self._ops, None
        work = FakeWork(len(ops))
        self._works.append(work)
        self.grouped_calls.append([kind for kind, _, _ in ops])
        if self.aborted:
            work.fail("NCCL communicator was aborted")
            return work
        for kind, tensor, peer in ops:
            src, dst = (self.rank, peer) if kind == "send" else (peer, self.rank)
            self.wire.post(kind, src, dst, tensor, work)
        return work  # enqueued, not done

    def abort(self) -> None:
        self.aborted = True
        for work in self._works:
            if not work.is_completed():
                work.fail("NCCL communicator was aborted")
        self.wire.fail_rank(self.rank, "NCCL communicator was aborted")


# -- helpers ------------------------------------------------------------------------------------------

def _group(name: str, rank: int, wire: FakeWire, world_size: int = 2) -> PairNccl:
    group = PairNccl(world_size, rank, name)
    group.new_process_group = lambda store, r, size, timeout: FakeNcclPG(wire, r, size, timeout)
    return group


def _connected(name: str, delay_s: float = 0.0, timeout_s: float = 20) -> tuple[list[PairNccl], FakeWire, dict]:
    wire, store = FakeWire(delay_s), {}
    groups = [_group(name, 0, wire), _group(name, 1, wire)]
    errors: list[BaseException] = []

    def connect(g: PairNccl) -> None:
        try:
            g.connect(timeout_s, device=CPU, **dict_kv(store))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=connect, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return groups, wire, store


# -- the group ----------------------------------------------------------------------------------------

def test_connect_creates_the_communicator_and_warms_up_both_ways_without_idle_timeout():
    (g0, g1), wire, store = _connected("n-connect")
    assert g0.is_connected and g1.is_connected and not store  # rendezvous key gone
    for g, pg in zip((g0, g1), (wire.pgs[0], wire.pgs[1]), strict=True):
        assert pg.initialized  # created at connect, not at the first transfer
        assert pg.grouped_calls == [["send", "recv"]]  # one warm-up exchange each way, and it completed
        assert pg.timeout >= datetime.timedelta(days=1)  # the watchdog never times out an idle pair
        assert g.comm_init_s is not None and g.warmup_s is not None and g.connect_s >= g.warmup_s
    for g in (g0, g1):
        g.destroy_group()


def test_send_returns_only_once_the_peer_received_the_bytes():
    (g0, g1), wire, _ = _connected("n-send", delay_s=0.15)
    x = torch.arange(16.0)
    got = torch.zeros(16)
    receiver = in_thread(lambda: (time.sleep(0.3), g1.recv_tagged(got, 0, TAG_PAYLOAD, timeout_s=5)))
    started = time.monotonic()
    g0.send_tagged(x, 1, TAG_PAYLOAD, timeout_s=5)
    took = time.monotonic() - started
    assert took >= 0.3 + 0.15 - 0.02  # waited for the receiver to post, then for the copy to land
    assert receiver.get(timeout=5)[0] == "ok" and torch.equal(got, x)
    assert g0.is_connected and g1.is_connected
    for g in (g0, g1):
        g.destroy_group()


def test_send_that_nobody_receives_times_out_aborts_and_leaves_the_group_unusable():
    (g0, g1), wire, _ = _connected("n-send-timeout")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        g0.send_tagged(torch.ones(4), 1, TAG_PAYLOAD, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert wire.pgs[0].aborted and not g0.is_connected
    with pytest.raises(NcclPairError):  # broken for good: the owner drops the pair
        g0.send_tagged(torch.ones(4), 1, TAG_PAYLOAD, timeout_s=5)
    for g in (g0, g1):
        g.destroy_group()


def test_receive_with_no_sender_times_out_and_aborts():
    (g0, g1), wire, _ = _connected("n-recv-timeout")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        g1.recv_tagged(torch.empty(4), 0, TAG_PAYLOAD, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert wire.pgs[1].aborted and not g1.is_connected and not wire.pgs[0].aborted
    for g in (g0, g1):
        g.destroy_group()


def test_a_failed_work_breaks_the_group():
    (g0, g1), wire, _ = _connected("n-fail")
    pending = in_thread(g1.recv_tagged, torch.empty(4), 0, TAG_PAYLOAD, None)
    time.sleep(0.1)
    wire.fail_rank(1, "remote process exited")  # NCCL's async error on the peer's death
    status, exc, _ = pending.get(timeout=5)
    assert status == "error" and isinstance(exc, NcclPairError) and "remote process exited" in str(exc)
    assert not g1.is_connected and wire.pgs[1].aborted
    for g in (g0, g1):
        g.destroy_group()


def test_an_operation_nccl_refuses_at_enqueue_breaks_the_group():
    """As on the H100: a lone receive from itself in a one-rank group is refused at once (invalid usage)."""
    (g0, g1), wire, _ = _connected("n-refuse")
    wire.pgs[1].refuse = "NCCL error: invalid usage"
    with pytest.raises(NcclPairError, match="invalid usage"):
        g1.recv_tagged(torch.empty(4), 0, TAG_PAYLOAD, timeout_s=5)
    assert not g1.is_connected and wire.pgs[1].aborted
    assert wire.pgs[1]._ops is None  # the grouped call was closed all the same
    for g in (g0, g1):
        g.destroy_group()


def test_destroy_interrupts_pending_operations_and_leaves_nothing_behind():
    (g0, g1), wire, store = _connected("n-destroy")
    host, port = g0._control.store.host, g0._control.store.port
    receive = in_thread(g1.recv_tagged, torch.empty(4), 0, TAG_PAYLOAD, None)  # no deadline
    control = in_thread(g1.recv_control, 0, None)
    time.sleep(0.2)
    g1.destroy_group()
    for pending in (receive, control):
        status, exc, _ = pending.get(timeout=3)
        assert status == "error" and isinstance(exc, NcclPairError)
    assert wire.pgs[1].aborted and not g1.is_connected
    g0.destroy_group()
    assert wire.pgs[0].aborted and not store
    time.sleep(0.1)
    with pytest.raises(Exception):  # noqa: B017 - rank 0's store is closed with its group
        dist.TCPStore(host, port, None, is_master=False, timeout=datetime.timedelta(seconds=1))
    g0.destroy_group()  # idempotent


def test_control_messages_are_fifo_post_nothing_on_the_gpu_and_fail_when_rank_0_goes():
    (g0, g1), wire, _ = _connected("n-control")
    for i in range(3):
        g0.send_control(f"header {i}".encode(), 1)
    assert [g1.recv_control(0, 5) for _ in range(3)] == [b"header 0", b"header 1", b"header 2"]
    with pytest.raises(TimeoutError):  # a bounded wait that times out leaves the pair usable
        g1.recv_control(0, 0.2)
    assert g1.is_connected
    idle = in_thread(g1.recv_control, 0, None)
    time.sleep(0.3)
    assert wire.pending(1) == 0 and len(wire.pgs[1].grouped_calls) == 1  # idle: no NCCL receive posted
    g0.destroy_group()  # rank 0 hosts the store: its going fails rank 1's wait, breaking the pair there too
    status, exc, took = idle.get(timeout=5)
    assert status == "error" and isinstance(exc, NcclPairError) and not g1.is_connected
    g1.destroy_group()


def test_rank_0_learns_at_once_that_rank_1_destroyed_its_group():
    (g0, g1), wire, _ = _connected("n-watch")
    watch = in_thread(g0.wait_peer_gone)
    time.sleep(0.3)
    assert watch.empty() and g0.is_connected  # a healthy idle pair: the watch just waits, on the CPU
    g1.destroy_group()
    status, exc, took = watch.get(timeout=3)
    assert status == "error" and isinstance(exc, NcclPairError) and "gone" in str(exc)
    assert not g0.is_connected and wire.pgs[0].aborted
    started = time.monotonic()
    with pytest.raises(NcclPairError):  # the next transfer fails at once, not at its 30 s deadline
        g0.send_tagged(torch.ones(4), 1, TAG_PAYLOAD, timeout_s=30)
    assert time.monotonic() - started < 1
    g0.destroy_group()


def test_destroying_rank_0_wakes_its_own_watch_and_breaks_rank_1():
    (g0, g1), _, store = _connected("n-watch-self")
    watch = in_thread(g0.wait_peer_gone)
    idle = in_thread(g1.recv_control, 0, None)
    time.sleep(0.2)
    g0.destroy_group()
    status, exc, _ = watch.get(timeout=3)
    assert status == "error" and "destroyed" in str(exc)  # its own close, not a lost peer
    status, exc, _ = idle.get(timeout=3)
    assert status == "error" and isinstance(exc, NcclPairError) and not g1.is_connected
    g1.destroy_group()
    assert not store


def test_rank_0_learns_at_once_that_rank_1_s_process_died():
    """Rank 1 in a process of its own, killed without any clean-up: the kernel closes its sockets."""
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=datetime.timedelta(seconds=30),
                          wait_for_workers=False)
    code = ("import datetime, time\nimport torch.distributed as dist\nfrom app.kv.nccl_control import StoreControl\n"
            f"store = dist.TCPStore('127.0.0.1', {store.port}, None, is_master=False,"
            " timeout=datetime.timedelta(seconds=30))\n"
            "control = StoreControl(store, 1, 'n-watch-kill', time.monotonic() + 30, lambda: None, print, watch=True)\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    failed: list[str] = []
    control = None
    try:
        control = StoreControl(store, 0, "n-watch-kill", time.monotonic() + 30, lambda: failed[0] if failed else None,
                               failed.append, watch=True)
        assert child.stdout.readline().strip() == "ready"
        watch = in_thread(control.wait_peer_gone)
        time.sleep(0.3)
        assert watch.empty() and not failed
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status, exc, _ = watch.get(timeout=5)
        assert status == "error" and isinstance(exc, NcclPairError)
        assert time.monotonic() - killed < 2 and failed and failed[0].startswith("peer gone")
    finally:
        child.kill()
        child.wait(10)
        if control is not None:
            control.close()


def test_connect_gives_up_at_its_deadline_when_the_peer_never_comes():
    wire, store = FakeWire(), {}
    lonely = _group("n-lonely", 0, wire)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        lonely.connect(0.5, device=CPU, **dict_kv(store))
    assert time.monotonic() - started < 3 and not store and not lonely.is_connected

    late_store: dict = {}
    rank1 = _group("n-lonely-1", 1, FakeWire())
    with pytest.raises(TimeoutError):  # rank 1 with no rank 0: no address within the deadline
        rank1.connect(0.3, device=CPU, **dict_kv(late_store))


def test_connect_gives_up_when_the_communicator_never_forms():
    """Both ranks reach the store but one never creates the communicator (NCCL init would hang)."""
    wire, store = FakeWire(), {}
    g0, g1 = _group("n-hang", 0, wire), _group("n-hang", 1, wire)
    g1.new_process_group = lambda s, r, size, timeout: _NeverInitPG(wire, r, size, timeout)
    results = [in_thread(lambda g=g: g.connect(0.8, device=CPU, **dict_kv(store))) for g in (g0, g1)]
    for pending in results:
        status, exc, took = pending.get(timeout=15)
        assert status == "error" and isinstance(exc, TimeoutError) and took < 3
    assert not store and all(pg.aborted for pg in wire.pgs.values())


class _NeverInitPG(FakeNcclPG):
    def eager_connect_single_device(self, device) -> None:
        time.sleep(30)


def test_one_rank_group_exchanges_with_itself():
    wire, store = FakeWire(0.05), {}
    g = _group("n-self", 0, wire, world_size=1)
    g.connect(5, device=CPU, **dict_kv(store))
    x, got = torch.arange(8.0), torch.zeros(8)
    g.send_recv(x, got, 0, timeout_s=5)
    assert torch.equal(got, x) and not store
    g.send_control(b"hello", 0)
    assert g.recv_control(0, 1) == b"hello"
    g.destroy_group()


# -- the channel over it ------------------------------------------------------------------------------

def _payload(seed: int) -> torch.Tensor:
    return torch.randn((2, 3, 4, 32), generator=torch.Generator().manual_seed(seed))


def _header(payload: torch.Tensor, xfer_id: str) -> KVHeader:
    return KVHeader(xfer_key(xfer_id), payload.shape[1] * 32, payload.shape[1], payload.dtype,
                    tuple(payload.shape), CHECKSUM_CRC32, checksum(payload, CHECKSUM_CRC32))


def test_channel_over_nccl_comm_delivers_in_order_and_times_sends_to_delivery():
    (g0, g1), wire, _ = _connected("n-channel", delay_s=0.1)
    delivered: queue.Queue = queue.Queue()
    receiver = KVReceiver(NcclPairComm(g1, 0, timeout_s=5), delivered.put, delivered.put)
    sender = KVSender(NcclPairComm(g0, 1, timeout_s=5), timeout_s=5)
    sent: queue.Queue = queue.Queue()
    payloads = [_payload(i) for i in range(3)]
    for i, payload in enumerate(payloads):
        sender.submit(_header(payload, f"c{i}"), payload, lambda res, err: sent.put((res, err)))
    got = [delivered.get(timeout=10) for _ in payloads]
    assert [r.header.xfer_key for r in got] == [xfer_key(f"c{i}") for i in range(3)]
    assert all(r.error is None and torch.equal(r.payload, p) for r, p in zip(got, payloads, strict=True))
    results = [sent.get(timeout=10) for _ in payloads]
    assert all(err is None for _, err in results)
    assert all(res.send_s >= 0.1 - 0.01 for res, _ in results)  # measured to delivery, not to enqueue
    # headers went through the store: only payloads (and the warm-up) were NCCL calls
    assert wire.pgs[0].grouped_calls == [["send", "recv"]] + [["send"]] * 3
    receiver.close()
    sender.close()
    for g in (g0, g1):
        g.destroy_group()


def test_channel_send_fails_at_its_deadline_when_decode_never_takes_the_payload():
    (g0, g1), wire, _ = _connected("n-channel-late")
    sender = KVSender(NcclPairComm(g0, 1, timeout_s=0.3), timeout_s=0.3)
    sent: queue.Queue = queue.Queue()
    payload = _payload(7)
    started = time.monotonic()
    sender.submit(_header(payload, "late"), payload, lambda res, err: sent.put((res, err)))
    res, err = sent.get(timeout=5)
    assert res is None and isinstance(err, ChannelBroken) and time.monotonic() - started < 2
    assert wire.pgs[0].aborted
    sender.close()
    for g in (g0, g1):
        g.destroy_group()


# -- PairTransport's NCCL branch, with Ray's collective calls replaced ---------------------------------

def _fake_collective(monkeypatch, wire: FakeWire, kv_store: dict) -> tuple[dict, list, threading.local]:
    """Ray's collective calls replaced by `PairNccl` groups on the fake wire, keyed by (name, rank); the
    test says which rank it acts as in `me.rank`. Threads the transport starts itself (the sender's peer
    watch) act as prefill, rank 0."""
    from ray.util import collective

    groups: dict[tuple[str, int], PairNccl] = {}
    calls: list[tuple] = []
    me = threading.local()

    def init_collective_group(world_size, rank, backend, group_name):
        calls.append(("init", world_size, rank, backend, group_name))
        groups[(group_name, rank)] = _group(group_name, rank, wire, world_size)
        me.rank = rank

    def destroy(name):
        for key in [k for k in groups if k[0] == name and k[1] == getattr(me, "rank", 0)]:
            groups.pop(key).destroy_group()

    monkeypatch.setattr(rendezvous, "kv_functions", lambda *args: tuple(dict_kv(kv_store).values()))
    monkeypatch.setattr(collective, "init_collective_group", init_collective_group)
    monkeypatch.setattr(collective, "get_group_handle", lambda name: groups[(name, me.rank)])
    monkeypatch.setattr(collective, "is_group_initialized",
                        lambda name: (name, getattr(me, "rank", 0)) in groups)
    monkeypatch.setattr(collective, "destroy_collective_group", destroy)
    return groups, calls, me


def test_nccl_pair_transport_joins_transfers_and_drops(monkeypatch):
    """Group naming, ranks, warm-up at join, FIFO framing and drop of the NCCL branch of `PairTransport`."""
    from app.kv import pairs

    wire, kv_store = FakeWire(0.01), {}
    groups, calls, me = _fake_collective(monkeypatch, wire, kv_store)
    delivered: queue.Queue = queue.Queue()
    prefill = pairs.PairTransport("prefill", "P1", "nccl", 5, CPU)
    decode = pairs.PairTransport("decode", "D1", "nccl", 5, CPU, deliver=delivered.put)
    joined = in_thread(lambda: (setattr(me, "rank", 0), prefill.ensure("D1", warmup=True)))
    me.rank = 1
    decode.ensure("P1", warmup=True)
    assert joined.get(timeout=20)[0] == "ok"
    decode.ensure("P1")  # idempotent
    assert {("init", 2, r, "PDSERVE_NCCL", "pdkv-P1-D1") for r in (0, 1)} <= set(calls)
    assert len([c for c in calls if c[2] == 1]) == 1 and not kv_store
    assert all(pg.initialized and pg.grouped_calls for pg in wire.pgs.values())  # communicator made at join
    assert prefill.stats()["num_pairs_formed_at_warmup"] == 1

    sent: queue.Queue = queue.Queue()
    payloads = [_payload(20 + i) for i in range(4)]
    for i, payload in enumerate(payloads):
        prefill.send("D1", _header(payload, f"n{i}"), payload, lambda res, err: sent.put((res, err)))
    got = [delivered.get(timeout=10) for _ in payloads]
    assert [g.header.xfer_key for g in got] == [xfer_key(f"n{i}") for i in range(4)]
    assert all(torch.equal(g.payload, p) for g, p in zip(got, payloads, strict=True))
    assert all(sent.get(timeout=10)[1] is None for _ in payloads)

    me.rank = 0
    prefill.drop("D1", "test")
    assert ("pdkv-P1-D1", 0) not in groups and prefill.peers() == [] and wire.pgs[0].aborted
    prefill.send("D1", _header(payloads[0], "x"), payloads[0], lambda res, err: sent.put((res, err)))
    assert isinstance(sent.get(timeout=5)[1], ChannelBroken)
    me.rank = 1
    decode.close()


def test_prefill_drops_its_nccl_pair_as_soon_as_decode_goes(monkeypatch):
    """The sender's peer watch: when decode's side of the pair goes, prefill drops the pair at once, so the
    next request re-forms it or falls back instead of waiting out a send's deadline."""
    from app.kv import pairs

    wire, kv_store = FakeWire(), {}
    groups, _, me = _fake_collective(monkeypatch, wire, kv_store)
    dropped: queue.Queue = queue.Queue()
    prefill = pairs.PairTransport("prefill", "P2", "nccl", 30, CPU, on_drop=lambda peer, why: dropped.put(why))
    decode = pairs.PairTransport("decode", "D2", "nccl", 30, CPU, deliver=lambda received: None)
    joined = in_thread(lambda: (setattr(me, "rank", 0), prefill.ensure("D2", warmup=True)))
    me.rank = 1
    decode.ensure("P2", warmup=True)
    assert joined.get(timeout=20)[0] == "ok" and prefill.peers() == ["D2"]
    time.sleep(0.3)
    assert dropped.empty()  # an idle, healthy pair stays
    decode.close()
    why = dropped.get(timeout=3)
    assert "peer connection lost" in why and prefill.peers() == [] and wire.pgs[0].aborted
    assert ("pdkv-P2-D2", 0) not in groups and prefill.stats()["num_pairs_dropped"] == 1


def test_ray_group_class_is_a_base_group_built_on_demand():
    from ray.util.collective.collective_group.base_collective_group import BaseGroup

    cls = nccl_group.PairNcclGroup
    assert issubclass(cls, BaseGroup) and issubclass(cls, PairNccl) and cls.backend() == "PDSERVE_NCCL"
    group = cls(2, 1, "n-ray")
    assert (group.rank, group.world_size, group.group_name) == (1, 2, "n-ray") and not group.is_connected
    with pytest.raises(NotImplementedError):
        group.allreduce(torch.ones(1))
