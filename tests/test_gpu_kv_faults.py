"""GPU fault checks of the KV path: a CUDA payload sealed on the sender thread, and a peer that dies in the
middle of a transfer or while its pair idles, on a real two-rank NCCL pair; skipped without CUDA.

Run on a GPU machine, with tests/test_gpu_kv.py (same needs: torch with CUDA, no vLLM or Ray):
    python -m pytest tests/test_gpu_kv.py tests/test_gpu_kv_faults.py --noconftest -s
Two processes share the one GPU as two NCCL ranks the way test_gpu_kv's two-process test found that NCCL
allows it: a distinct NCCL_HOSTID per process, NCCL's socket transport over loopback. One rank kills
itself (SIGKILL, no clean-up) at a chosen moment; the other reports how its side of the pair ended, and
prefill's peer watch how soon it saw an idle decode go.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from app.kv.channel import KVReceiver, KVSender
from app.kv.header import UNSEALED, KVHeader, xfer_key
from app.kv.nccl_comm import NcclPairComm
from app.kv.nccl_group import PairNccl
from app.kv.payload import CHECKSUM_WEIGHTED, checksum, gather_blocks
from tests.test_gpu_kv import TWO_RANKS_ON_ONE_GPU, _caches, _cuda_usable, _CudaLoopback, _file_kv, run_two_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEADLINE_S = 5.0


def test_sender_thread_seals_a_cuda_payload_gathered_on_the_engine_thread():
    """As the connector does: gather on the engine thread's stream, synchronise that stream, hand the
    payload over unsealed; the sender thread's checksum must see the gathered bytes, not a buffer still
    being written."""
    link = _CudaLoopback()
    delivered: queue.Queue = queue.Queue()
    receiver = KVReceiver(link, delivered.put, lambda exc: delivered.put(exc))
    sender = KVSender(link, timeout_s=10)
    caches = _caches(7)
    sent: queue.Queue = queue.Queue()
    payloads = []
    for i in range(4):
        side = torch.cuda.Stream()  # vLLM's engine runs on streams of its own, not the default one
        with torch.cuda.stream(side):
            payload = gather_blocks(caches, list(range(i * 64, i * 64 + 64)))  # [32, 64, 2, 16, 8, 128], 64 MiB
        side.synchronize()
        payloads.append(payload)
        header = KVHeader(xfer_key(f"s{i}"), 1024, 64, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED, UNSEALED)
        sender.submit(header, payload, lambda res, err: sent.put((res, err)))
    for payload in payloads:
        res, err = sent.get(timeout=30)
        got = delivered.get(timeout=30)
        assert err is None and res.checksum_s > 0
        assert got.error is None and torch.equal(got.payload, payload)
        assert got.header.checksum == checksum(payload.cpu(), CHECKSUM_WEIGHTED)  # device-independent
    receiver.close()
    sender.close()


def _fault_worker(rank: int, workdir: str, scenario: str) -> None:
    """One rank of a pair in which one side dies (run by the test below in a subprocess)."""
    work = Path(workdir)
    result: dict = {"rank": rank}
    try:
        group = PairNccl(2, rank, f"gpu-fault-{scenario}")
        group.connect(30, device="cuda", **_file_kv(work / "kv"))
        comm = NcclPairComm(group, 1 - rank, timeout_s=DEADLINE_S)
        dies = (scenario.startswith("decode") and rank == 1) or (scenario.startswith("prefill") and rank == 0)
        payload = torch.ones((32, 256, 2, 16, 8, 64), dtype=torch.bfloat16, device="cuda")  # 256 MiB, 256 blocks
        header = KVHeader(xfer_key("f"), 4096, 256, payload.dtype, tuple(payload.shape), CHECKSUM_WEIGHTED,
                          checksum(payload, CHECKSUM_WEIGHTED))
        if dies:
            _die_at(scenario, work, comm, header)
        elif rank == 0:
            result.update(_prefill_sees(scenario, work, comm, header, payload))
        else:
            result.update(_decode_sees(comm))
        result["usable_after"] = _cuda_usable()
        group.destroy_group()
        result["keys_left"] = len(list((work / "kv").iterdir()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    (work / f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def _die_at(scenario: str, work: Path, comm: NcclPairComm, header: KVHeader) -> None:
    if scenario == "decode_dies_idle":
        time.sleep(1.0)  # the pair is formed and idle; prefill has nothing to send
    elif scenario == "decode_dies_mid_transfer":
        wire = torch.empty(header.encode("cuda").shape, dtype=torch.int64, device="cuda")
        comm.recv(wire, 1)  # the header came: prefill is sending the payload now
    elif scenario == "prefill_dies_mid_transfer":
        comm.send(header.encode("cuda"), 1, DEADLINE_S)  # announced, never sent
        time.sleep(0.2)
    (work / "died_at").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _prefill_sees(scenario: str, work: Path, comm: NcclPairComm, header: KVHeader, payload: torch.Tensor) -> dict:
    seen: dict = {}
    broken: queue.Queue = queue.Queue()
    sender = KVSender(comm, timeout_s=DEADLINE_S, watch_peer=True, on_broken=broken.put)  # as PairTransport's
    if scenario == "decode_dies_idle":
        exc = broken.get(timeout=30)  # the peer watch, with no transfer going on
        seen["watch_after_death_s"] = round(time.time() - float((work / "died_at").read_text()), 2)
        seen["watch_error"] = str(exc)[:200]
    done: queue.Queue = queue.Queue()
    started = time.monotonic()
    sender.submit(header, payload, lambda res, err: done.put(err))
    err = done.get(timeout=60)
    sender.close()
    took = round(time.monotonic() - started, 2)
    return {**seen, "send_error": None if err is None else str(err)[:300], "after_s": took}


def _decode_sees(comm: NcclPairComm) -> dict:
    outcomes: queue.Queue = queue.Queue()
    started = time.monotonic()
    receiver = KVReceiver(comm, lambda got: outcomes.put(("delivered", got.error)),
                          lambda exc: outcomes.put(("broken", str(exc)[:300])))
    what, detail = outcomes.get(timeout=60)
    took = time.monotonic() - started
    receiver.close()
    return {"outcome": what, "detail": detail, "after_s": round(took, 2)}


@pytest.mark.parametrize("scenario", ["decode_dies_mid_transfer", "prefill_dies_mid_transfer", "decode_dies_idle"])
def test_a_peer_killed_on_a_two_rank_nccl_pair_fails_the_other_side_within_the_deadline(tmp_path, scenario):
    results, logs, _ = run_two_ranks("test_gpu_kv_faults._fault_worker", f"{str(tmp_path)!r}, {scenario!r}", tmp_path,
                                     TWO_RANKS_ON_ONE_GPU, 90)
    survivor = 1 if scenario.startswith("prefill") else 0
    result = results[survivor]
    print(f"\n{scenario}: survivor rank {survivor}: {json.dumps(result)}")
    assert "error" not in result, logs[survivor][-2000:]
    if scenario == "decode_dies_idle":  # prefill's peer watch broke the pair: the next send fails at once
        assert result["watch_after_death_s"] < 2 and result["after_s"] < 1
    if survivor == 0:
        assert result["send_error"] and result["after_s"] < DEADLINE_S + 10
    else:
        assert result["outcome"] == "broken" and result["after_s"] < DEADLINE_S + 10
    assert result["usable_after"] and result["keys_left"] == 0
