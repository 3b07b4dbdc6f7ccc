"""GPU checks of the KV path (payload, checksum, channel, NCCL, pdserve's NCCL pair group), skipped
without CUDA.

Run on a GPU machine (needs torch with CUDA and cupy; not vLLM or Ray):
    python -m pytest tests/test_gpu_kv.py --noconftest -s
One GPU cannot host two NCCL ranks of one process group as NCCL normally runs them (it refuses a
duplicate GPU), so the pair-group checks use a one-rank `PairNccl` that sends to itself in one grouped
call (communicator created at connect, a transfer, deadline and abort, destroy), and one test tries two
processes on the one GPU, with NCCL's default settings and with settings that might let it, and reports
what happened. These tests import only header, payload, channel, rendezvous and the NCCL pair group
(nccl_group, nccl_ops, nccl_control; no Ray).
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.kv.channel import TAG_PAYLOAD, KVReceiver, KVSender
from app.kv.header import HEADER_SLOTS, KVHeader, xfer_key
from app.kv.nccl_comm import NcclPairComm
from app.kv.nccl_group import NcclPairError, PairNccl
from app.kv.payload import CHECKSUM_WEIGHTED, checksum, gather_blocks, scatter_blocks
from tests.helpers import cuda_median_ms as _median_ms
from tests.helpers import in_thread

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# A Llama-8B-like layer: GPU flash-attention block shape [2, block_size, num_kv_heads, head_size].
NUM_LAYERS, NUM_TOTAL_BLOCKS, BLOCK_SHAPE = 32, 512, (2, 16, 8, 128)


def _caches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn((NUM_TOTAL_BLOCKS, *BLOCK_SHAPE), generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(NUM_LAYERS)]


def test_gather_scatter_round_trip_on_gpu_and_cost_against_memcpy():
    src, dst = _caches(0), _caches(1)
    src_ids, dst_ids = list(range(10, 74)), list(range(300, 364))  # 64 blocks
    payload = gather_blocks(src, src_ids)  # [num_layers, 64, *BLOCK_SHAPE]
    scatter_blocks(dst, dst_ids, payload)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s[src_ids], d[dst_ids])
    flat = payload.reshape(-1)
    copy_ms = _median_ms(lambda: flat.clone())
    gather_ms = _median_ms(lambda: gather_blocks(src, src_ids))
    print(f"\n64 blocks x {NUM_LAYERS} layers = {payload.numel() * 2 / 2**20:.0f} MiB: gather {gather_ms:.3f} ms, "
          f"memcpy {copy_ms:.3f} ms, ratio {gather_ms / copy_ms:.2f}")


def test_weighted_checksum_is_device_independent_and_catches_corruption():
    payload = gather_blocks(_caches(2), list(range(8)))
    on_gpu = checksum(payload, CHECKSUM_WEIGHTED)
    assert on_gpu == checksum(payload.cpu(), CHECKSUM_WEIGHTED)
    corrupted = payload.clone()
    corrupted.view(-1)[12345] += 1
    assert checksum(corrupted, CHECKSUM_WEIGHTED) != on_gpu
    swapped = payload.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # same bytes, blocks out of order
    assert checksum(swapped, CHECKSUM_WEIGHTED) != on_gpu
    print(f"\nchecksum of {payload.numel() * 2 / 2**20:.0f} MiB on GPU: "
          f"{_median_ms(lambda: checksum(payload, CHECKSUM_WEIGHTED)):.3f} ms")


class _CudaLoopback:
    """Two ends of an in-process CUDA link (a device copy per message), for the channel threads."""

    def __init__(self):
        self.device = torch.device("cuda")
        self._queues: dict[int, queue.Queue] = {1: queue.Queue(), 2: queue.Queue()}

    def send(self, tensor, tag, timeout_s):
        self._queues[tag].put(tensor.clone())

    def recv(self, tensor, tag):
        tensor.copy_(self._queues[tag].get(timeout=10))

    def close(self):
        pass


def test_channel_moves_cuda_payloads_and_flags_corruption():
    link = _CudaLoopback()
    delivered: queue.Queue = queue.Queue()
    receiver = KVReceiver(link, delivered.put, lambda exc: delivered.put(exc))
    sender = KVSender(link, timeout_s=10)
    payload = gather_blocks(_caches(3), list(range(4)))
    header = KVHeader(xfer_key("x1"), 64, 4, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED,
                      checksum(payload, CHECKSUM_WEIGHTED))
    sent: queue.Queue = queue.Queue()
    sender.submit(header, payload, lambda res, err: sent.put((res, err)))
    got = delivered.get(timeout=10)
    assert got.error is None and torch.equal(got.payload, payload)
    assert sent.get(timeout=10)[1] is None
    bad = KVHeader(xfer_key("x2"), 64, 4, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED, header.checksum + 1)
    sender.submit(bad, payload, lambda res, err: None)
    assert "checksum mismatch" in delivered.get(timeout=10).error
    receiver.close()
    sender.close()


def test_nccl_moves_header_and_payload_intact():
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import nccl

    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    stream = torch.cuda.current_stream().cuda_stream
    payload = gather_blocks(_caches(4), list(range(64)))
    header = KVHeader(xfer_key("x3"), 2048, 64, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED,
                      checksum(payload, CHECKSUM_WEIGHTED))
    wire = header.encode("cuda")
    wire_in, payload_in = torch.empty_like(wire), torch.empty_like(payload)

    def self_send_recv(src: torch.Tensor, dst: torch.Tensor) -> None:
        count = src.numel() * src.element_size()
        nccl.groupStart()
        comm.send(src.data_ptr(), count, nccl.NCCL_CHAR, 0, stream)
        comm.recv(dst.data_ptr(), count, nccl.NCCL_CHAR, 0, stream)
        nccl.groupEnd()

    self_send_recv(wire, wire_in)
    self_send_recv(payload, payload_in)
    torch.cuda.synchronize()
    got = KVHeader.decode(wire_in)
    assert got == header
    assert checksum(payload_in, got.checksum_algo) == got.checksum
    assert torch.equal(payload_in, payload)
    nccl_ms = _median_ms(lambda: self_send_recv(payload, payload_in))
    copy_ms = _median_ms(lambda: payload_in.copy_(payload))
    mib = payload.numel() * payload.element_size() / 2**20
    print(f"\nNCCL self send/recv of {mib:.0f} MiB: {nccl_ms:.3f} ms ({mib / 1024 / nccl_ms * 1e3:.1f} GiB/s), "
          f"device copy {copy_ms:.3f} ms, ratio {nccl_ms / copy_ms:.2f}; cupy {cupy.__version__}")


# -- pdserve's NCCL pair group (`PairNccl`) on one GPU ------------------------------------------------

def _dict_kv(store: dict) -> dict:
    return {"kv_put": lambda k, v, overwrite=True: store.__setitem__(k, v), "kv_get": store.get,
            "kv_del": lambda k: store.pop(k, None)}


def _cuda_usable(timeout_s: float = 15.0) -> bool:
    """A kernel runs and the whole device synchronises (no NCCL kernel left spinning) within timeout_s."""
    def probe() -> bool:
        x = torch.ones(1024, device="cuda")
        ok = float((x * 2).sum().item()) == 2048.0
        torch.cuda.synchronize()
        return ok

    try:
        status, value, _ = in_thread(probe).get(timeout=timeout_s)
    except queue.Empty:
        return False
    return status == "ok" and value


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_pair_nccl_creates_its_communicator_at_connect_and_moves_kv_through_itself():
    kv: dict = {}
    threads_before = _threads()
    group = PairNccl(1, 0, "gpu-self")
    group.connect(60, device="cuda", **_dict_kv(kv))
    assert group.is_connected and not kv  # rendezvous key gone
    pg = group._pg
    watchdog = getattr(getattr(pg, "options", None), "_timeout", None)
    print(f"\nPairNccl.connect (one rank): {group.connect_s * 1e3:.1f} ms in all, communicator "
          f"{group.comm_init_s * 1e3:.1f} ms, warm-up exchange {group.warmup_s * 1e3:.1f} ms; process-group "
          f"timeout {watchdog}; torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}")
    assert watchdog is None or watchdog >= datetime.timedelta(days=1)

    small_out = torch.arange(256, dtype=torch.int32, device="cuda")
    small_in = torch.zeros_like(small_out)
    started = time.perf_counter()
    group.send_recv(small_out, small_in, 0, timeout_s=10)
    first_ms = (time.perf_counter() - started) * 1e3
    assert torch.equal(small_in, small_out)
    next_ms = _median_ms(lambda: group.send_recv(small_out, small_in, 0, timeout_s=10))

    payload = gather_blocks(_caches(5), list(range(64)))  # [32 layers, 64 blocks, 2, 16, 8, 128] bf16
    header = KVHeader(xfer_key("g1"), 1024, 64, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED,
                      checksum(payload, CHECKSUM_WEIGHTED))
    comm = NcclPairComm(group, 0, timeout_s=30)  # the channel's link, peer = itself
    comm.send(header.encode("cuda"), 1, 30)  # header: a control message through the pair's store
    wire = torch.empty(HEADER_SLOTS, dtype=torch.int64, device="cuda")
    comm.recv(wire, 1)
    assert KVHeader.decode(wire) == header
    payload_in = torch.empty_like(payload)
    group.send_recv(payload, payload_in, 0, timeout_s=30)
    assert torch.equal(payload_in, payload) and checksum(payload_in, CHECKSUM_WEIGHTED) == header.checksum
    nccl_ms = _median_ms(lambda: group.send_recv(payload, payload_in, 0, timeout_s=30))
    copy_ms = _median_ms(lambda: payload_in.copy_(payload))
    mib = payload.numel() * payload.element_size() / 2**20
    print(f"PairNccl one-rank exchange: first 1 KiB after connect {first_ms:.3f} ms, then {next_ms:.3f} ms; "
          f"{mib:.0f} MiB {nccl_ms:.3f} ms (call to completion, {mib / 1024 / nccl_ms * 1e3:.1f} GiB/s), "
          f"device copy {copy_ms:.3f} ms, ratio {nccl_ms / copy_ms:.2f}")
    group.destroy_group()
    assert not group.is_connected and not kv
    with pytest.raises(NcclPairError):
        group.send_recv(small_out, small_in, 0, timeout_s=1)
    print(f"threads before connect {threads_before}, after destroy {_threads()}")


def test_idle_pair_holds_no_gpu_kernel_and_destroy_leaves_nothing_behind():
    kv: dict = {}
    group = PairNccl(1, 0, "gpu-idle")
    group.connect(60, device="cuda", **_dict_kv(kv))
    host, port = group._control.store.host, group._control.store.port
    idle = in_thread(group.recv_control, 0, None)  # how decode waits for the next transfer
    time.sleep(0.3)
    started = time.monotonic()
    assert _cuda_usable(10)  # a device-wide synchronise is not held up by the idle pair
    sync_ms = (time.monotonic() - started) * 1e3
    started = time.monotonic()
    group.destroy_group()
    destroy_ms = (time.monotonic() - started) * 1e3
    status, exc, _ = idle.get(timeout=10)
    woke_ms = (time.monotonic() - started) * 1e3
    assert status == "error" and isinstance(exc, NcclPairError)
    assert not kv
    time.sleep(0.2)
    import torch.distributed as dist

    with pytest.raises(Exception):  # noqa: B017 - the pair's store closed with the group
        dist.TCPStore(host, port, None, is_master=False, timeout=datetime.timedelta(seconds=1))
    print(f"\nidle pair: device synchronise {sync_ms:.1f} ms while a receive waited; destroy {destroy_ms:.1f} ms, "
          f"the waiting receive failed {woke_ms:.1f} ms after it; no rendezvous key, store port closed")


# Two processes on the one GPU: NCCL refuses two ranks on one device ("Duplicate GPU detected"), a check
# keyed on the host hash and the bus id. NCCL_HOSTID gives each process its own host hash, so NCCL
# would take them for two hosts and use its network transport over loopback (no P2P, no SHM).
TWO_RANKS_ON_ONE_GPU = {"NCCL_HOSTID": "pdserve-rank{rank}", "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1",
                        "NCCL_NET": "Socket"}  # the arrangement NCCL accepts ({rank}: each process its own)
_TWO_PROC_VARIANTS = [
    ("NCCL defaults", {}, 25),
    ("NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1", {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}, 25),
    ("NCCL_HOSTID per process, sockets over loopback", TWO_RANKS_ON_ONE_GPU, 40),
]


def run_two_ranks(worker: str, args: str, workdir: Path, extra_env: dict[str, str], limit_s: float
                  ) -> tuple[list[dict], list[str], bool]:
    """`tests.<worker>(rank, <args>)` as ranks 0 and 1, each in a process of its own on this GPU with `extra_env`
    (`{rank}` filled in), killed if still running after `limit_s`. Returns each rank's result (what it wrote to
    `workdir/rank<r>.json`, or an error saying it wrote nothing), both logs, and whether any rank hung."""
    root = Path(__file__).resolve().parents[1]
    module, function = worker.rsplit(".", 1)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(root), "NCCL_DEBUG": "WARN",
               **{k: v.format(rank=rank) for k, v in extra_env.items()}}
        code = f"from tests.{module} import {function}; {function}({rank}, {args})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + limit_s
    hung = False
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            hung = True
        logs.append(out or "")
    results = []
    for rank in (0, 1):
        path = workdir / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "error": "no result"})
    return results, logs, hung


def _file_kv(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)

    def put(key: bytes, value: bytes, overwrite: bool = True) -> None:
        tmp = folder / f"{key.hex()}.tmp{os.getpid()}"
        tmp.write_bytes(value)
        tmp.rename(folder / key.hex())

    def get(key: bytes) -> bytes | None:
        try:
            return (folder / key.hex()).read_bytes()
        except FileNotFoundError:
            return None

    def delete(key: bytes) -> None:
        (folder / key.hex()).unlink(missing_ok=True)

    return {"kv_put": put, "kv_get": get, "kv_del": delete}


def _two_proc_payload(i: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(100 + i)
    return torch.randn((32, 16, 2, 16, 8, 128), generator=gen, device="cuda", dtype=torch.bfloat16)  # 32 MiB


def _pair_worker(rank: int, workdir: str, connect_timeout_s: float) -> None:
    """One rank of a two-process pair on this GPU (run by the test below in a subprocess)."""
    result: dict = {"rank": rank}
    try:
        _pair_scenario(rank, Path(workdir), connect_timeout_s, result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def _pair_scenario(rank: int, workdir: Path, connect_timeout_s: float, result: dict) -> None:
    group = PairNccl(2, rank, "gpu-two-proc")
    group.connect(connect_timeout_s, device="cuda", **_file_kv(workdir / "kv"))
    result.update(connect_ms=round(group.connect_s * 1e3, 1), comm_init_ms=round(group.comm_init_s * 1e3, 1),
                  warmup_ms=round(group.warmup_s * 1e3, 1))
    comm = NcclPairComm(group, 1 - rank, timeout_s=20)
    payloads = [_two_proc_payload(i) for i in range(3)]
    if rank == 0:
        sender = KVSender(comm, timeout_s=20)
        sent: queue.Queue = queue.Queue()
        for i, payload in enumerate(payloads):
            header = KVHeader(xfer_key(f"t{i}"), 256, 16, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED,
                              checksum(payload, CHECKSUM_WEIGHTED))
            sender.submit(header, payload, lambda res, err: sent.put((res, err)))
        outcomes = [sent.get(timeout=60) for _ in payloads]
        result["send_errors"] = [repr(err)[:200] for _, err in outcomes if err is not None]
        result["send_ms"] = [round(res.send_s * 1e3, 2) for res, _ in outcomes if res is not None]
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # announced by no header: never received
        started = time.monotonic()
        try:
            group.send_tagged(big, 1, TAG_PAYLOAD, timeout_s=3)
            result["deadline"] = {"error": None, "after_s": round(time.monotonic() - started, 2)}
        except Exception as exc:  # noqa: BLE001
            result["deadline"] = {"error": f"{type(exc).__name__}: {exc}"[:300],
                                  "after_s": round(time.monotonic() - started, 2)}
        result["usable_after_abort"] = _cuda_usable()
        sender.close()
        group.destroy_group()
    else:
        delivered: queue.Queue = queue.Queue()
        broken: queue.Queue = queue.Queue()
        receiver = KVReceiver(comm, delivered.put, broken.put)
        got = [delivered.get(timeout=60) for _ in payloads]
        result["intact"] = [r.error is None and torch.equal(r.payload, p) for r, p in zip(got, payloads, strict=True)]
        result["recv_ms"] = [round(r.recv_s * 1e3, 2) for r in got]
        started = time.monotonic()
        exc = broken.get(timeout=60)  # rank 0 times a send out, aborts and destroys its group
        result["peer_gone"] = {"error": f"{type(exc).__name__}: {exc}"[:300],
                               "after_s": round(time.monotonic() - started, 2)}
        result["usable_after"] = _cuda_usable()
        receiver.close()
        group.destroy_group()


def test_two_processes_on_one_gpu_as_a_two_rank_nccl_pair(tmp_path):
    summary = []
    for index, (name, extra, limit_s) in enumerate(_TWO_PROC_VARIANTS):
        work = tmp_path / f"variant{index}"
        work.mkdir()
        results, logs, hung = run_two_ranks("test_gpu_kv._pair_worker", f"{str(work)!r}, {limit_s - 8}", work, extra,
                                            limit_s)
        warns = sorted({line.split("NCCL WARN", 1)[1].strip()[:160] for log in logs for line in log.splitlines()
                        if "NCCL WARN" in line})
        print(f"\ntwo processes on one GPU, {name}: hung={hung} " + json.dumps(results))
        if warns:
            print("  NCCL WARN: " + " | ".join(warns[:3]))
        summary.append((name, results, hung))
    assert not any(hung for _, _, hung in summary), "a two-process attempt hung instead of failing"
    for _name, (r0, r1), _ in summary:
        if "error" in r0 or "error" in r1:
            continue  # NCCL refused this arrangement; the print above says how
        assert r1["intact"] == [True, True, True] and not r0["send_errors"]
        assert r0["deadline"]["error"] and r0["deadline"]["after_s"] < 3 + 12
        assert r0["usable_after_abort"] and r1["usable_after"]


def test_nccl_operation_with_no_peer_fails_within_its_deadline_and_the_process_stays_usable():
    """Last in the file: if abort left a kernel spinning, later CUDA work in this process would hang.
    In a one-rank group NCCL refuses a lone receive or send to itself at once (invalid usage, seen on an
    H100 with NCCL 2.28.9): that breaks the group like a missed deadline. The deadline against a peer that
    never receives is exercised by the two-process test above, where NCCL lets two processes pair."""
    kv: dict = {}
    group = PairNccl(1, 0, "gpu-deadline")
    group.connect(60, device="cuda", **_dict_kv(kv))
    buf = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    status, exc, took = in_thread(group.recv_tagged, buf, 0, TAG_PAYLOAD, 2.0).get(timeout=40)
    print(f"\none-rank receive with no send: {status} after {took:.2f}s (deadline 2 s): "
          f"{type(exc).__name__}: {str(exc)[:160]}")
    assert status == "error" and isinstance(exc, (NcclPairError, TimeoutError)) and took < 2 + 12
    assert not group.is_connected
    assert _cuda_usable()  # nothing left running on the device
    group.destroy_group()
    assert not kv

    again = PairNccl(1, 0, "gpu-deadline-2")
    again.connect(60, device="cuda", **_dict_kv(kv))
    x = torch.arange(1024, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    again.send_recv(x, y, 0, timeout_s=10)
    assert torch.equal(x, y)
    status, exc, took = in_thread(again.send_tagged, buf, 0, TAG_PAYLOAD, 2.0).get(timeout=40)
    print(f"one-rank send with no receive: {status} after {took:.2f}s (deadline 2 s): "
          f"{type(exc).__name__}: {str(exc)[:160]}")
    assert status == "error" and took < 2 + 12 and not again.is_connected
    assert _cuda_usable()
    again.destroy_group()
    assert not kv
