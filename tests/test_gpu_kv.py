"""GPU checks of the KV path (payload, checksum, channel, NCCL), skipped without CUDA.

Run on a GPU machine (needs torch with CUDA and cupy; not vLLM or Ray):
    python -m pytest tests/test_gpu_kv.py --noconftest -s
One GPU cannot host two NCCL ranks, so the NCCL test uses a one-rank communicator with a grouped
send/recv to itself: it checks that NCCL moves our header and payload tensors intact and measures it.
"""

from __future__ import annotations

import queue
import statistics
import time

import pytest
import torch

from app.kv.channel import KVReceiver, KVSender
from app.kv.header import KVHeader, xfer_key
from app.kv.payload import CHECKSUM_WEIGHTED, checksum, gather_blocks, scatter_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# A Llama-8B-like layer: GPU flash-attention block shape [2, block_size, num_kv_heads, head_size].
NUM_LAYERS, NUM_TOTAL_BLOCKS, BLOCK_SHAPE = 32, 512, (2, 16, 8, 128)


def _caches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn((NUM_TOTAL_BLOCKS, *BLOCK_SHAPE), generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(NUM_LAYERS)]


def _median_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


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
