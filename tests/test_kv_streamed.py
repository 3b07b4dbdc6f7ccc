"""A payload on the pair's socket in chunks, its checksum after them (app/kv/streamed.py), over a real gloo pair."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from app.kv import streamed
from app.kv.header import UNSEALED, KVHeader, xfer_key
from app.kv.held import HeldBlocks, SavedKV
from app.kv.payload import CHECKSUM_XXH3, gather_blocks
from app.kv.streamed import RecvBuffers, chunk_plan

BLOCK = (2, 32, 128)  # the tiny model's block: 32 KiB of fp32 per layer
CHUNK = 64 << 10  # two blocks of a layer per chunk in these tests


def test_chunks_cover_every_row_once_in_order_within_large_layers_and_across_small_ones():
    f32 = torch.float32
    small = chunk_plan((4, 5, *BLOCK), f32)  # a layer's part (5 blocks, 160 KiB) is under a quarter of a chunk
    assert small == [(0, 20)]  # ... so the layers share one chunk
    large = chunk_plan((3, 200, *BLOCK), f32)  # 6.25 MiB per layer: chunks of 128 blocks, never across layers
    assert large == [(0, 128), (128, 200), (200, 328), (328, 400), (400, 528), (528, 600)]
    for shape in [(3, 200, *BLOCK), (4, 5, *BLOCK), (32, 16, 8, 32, 256), (2, 1, 1 << 21)]:
        plan = chunk_plan(shape, f32)
        assert [first for first, _ in plan] == [0] + [end for _, end in plan[:-1]]  # in order, no gap or overlap
        assert plan[-1][1] == shape[0] * shape[1]
        row_bytes = torch.Size(shape[2:]).numel() * 4
        assert all(end - first == 1 or (end - first) * row_bytes <= streamed.CHUNK_BYTES for first, end in plan)


def test_receive_buffers_are_reused_given_back_once_and_kept_only_up_to_their_cap():
    buffers = RecvBuffers(max_idle_bytes=3 << 20)
    a, give_a = buffers.take((4, 64, 1024), torch.float32)  # 1 MiB
    a.fill_(1.0)
    give_a()
    give_a()  # a second call gives nothing back twice
    assert buffers.idle_bytes() == 1 << 20
    b, give_b = buffers.take((2, 64, 1024), torch.float32)  # smaller: the same buffer
    assert b.data_ptr() == a.data_ptr() and buffers.num_allocated == 1 and buffers.idle_bytes() == 0
    c, give_c = buffers.take((4, 64, 2048), torch.float32)  # 2 MiB: none idle fits, a new one
    d, give_d = buffers.take((4, 64, 2048), torch.float32)
    assert buffers.num_allocated == 3
    for give in (give_b, give_c, give_d):
        give()
    assert buffers.idle_bytes() == 3 << 20  # the third (2 MiB) would pass the cap: dropped


def test_a_receive_that_fails_keeps_its_buffer_out_of_reuse():
    class Failing:
        device = torch.device("cpu")

        def irecv(self, tensor, tag):
            class Pending:
                def wait(self, timeout_s):
                    raise RuntimeError("peer gone")

            return Pending()

    buffers = RecvBuffers()
    header = KVHeader(1, 32, 8, torch.float32, (4, 200, *BLOCK), CHECKSUM_XXH3, -2)  # 25 MiB: 8 chunks posted
    with pytest.raises(RuntimeError, match="peer gone"):
        streamed.receive_streamed(Failing(), header, buffers, time.perf_counter())
    # the receives posted into it may still land until the pair is torn down: another payload must not get it
    assert buffers.idle_bytes() == 0 and buffers.num_allocated == 1


@pytest.fixture()
def gloo_pair(monkeypatch):
    """(send, received, layers, buffers, gathers, held) of a real gloo pair in one process, chunks of 64 KiB:
    `send(request_id, block_ids, tamper=None, kv=None)` holds those blocks (or sends `kv`) and returns the sender's
    (result, error); `gathers` says how each chunk went."""
    from app.kv.channel import KVReceiver, KVSender
    from app.kv.pairs import GlooPairComm
    from tests.test_kv_units import _connected_pair

    monkeypatch.setattr(streamed, "CHUNK_BYTES", CHUNK)
    gathers: list[str] = []  # per chunk: "ring" (gathered into the sender's ring) or "in place" (sent from its layer)
    gather_rows, in_place = streamed._gather_rows, streamed._in_place
    monkeypatch.setattr(streamed, "_gather_rows", lambda *a: (gathers.append("ring"), gather_rows(*a))[1])

    def spy_in_place(*args):
        part = in_place(*args)
        if part is not None:
            gathers.append("in place")
        return part

    monkeypatch.setattr(streamed, "_in_place", spy_in_place)
    layers = [torch.randn(64, *BLOCK) for _ in range(4)]
    g0, g1 = _connected_pair(f"st-{time.monotonic_ns()}")
    received: queue.Queue = queue.Queue()
    broken: list[BaseException] = []
    buffers = RecvBuffers()
    sender = KVSender(GlooPairComm(g0, 1), timeout_s=5, watch_peer=True, stream=True)
    receiver = KVReceiver(GlooPairComm(g1, 0), received.put, broken.append, buffers=buffers)
    held = HeldBlocks(lease_s=60)

    def send(request_id: str, block_ids: tuple[int, ...], tamper=None, kv: SavedKV | None = None):
        if kv is None:
            held.hold(request_id)
            held.finish(request_id)
            kv = SavedKV.held(held, request_id, layers, block_ids, None)
        header = KVHeader(xfer_key(request_id), 32 * len(block_ids), len(block_ids), torch.float32,
                          (len(layers), len(block_ids), *BLOCK), CHECKSUM_XXH3, UNSEALED)
        done: queue.Queue = queue.Queue()
        sender.submit(header, kv, lambda res, err: done.put((res, err)), tamper=tamper)
        return done.get(timeout=10)

    yield send, received, layers, buffers, gathers, held
    assert not broken and sender.broken is None  # no test here breaks the pair
    sender.close()
    receiver.close()
    g0.destroy_group()
    g1.destroy_group()


def test_a_streamed_payload_arrives_whole_from_where_its_blocks_are_and_its_buffer_is_reused(gloo_pair):
    send, received, layers, buffers, gathers, held = gloo_pair
    cases = [("consecutive", tuple(range(10, 17)), {"in place"}),  # slices of each layer: sent from where they are
             ("scattered", (40, 3, 7, 9, 21, 60), {"ring"}),  # gathered into the sender's ring
             ("consecutive-again", tuple(range(30, 37)), {"in place"})]
    for name, block_ids, how in cases:
        gathers.clear()
        result, error = send(name, block_ids)
        assert error is None and result.streamed and not result.in_segment
        assert set(gathers) == how and len(gathers) == len(layers) * -(-len(block_ids) // 2)  # 2 blocks a chunk
        got = received.get(timeout=10)
        assert got.error is None and got.header.xfer_key == xfer_key(name)
        assert torch.equal(got.payload, gather_blocks(layers, list(block_ids)))
        assert name in held.take_finished()  # the engine may free the blocks: every chunk was read and sent
        got.release()
    assert buffers.num_allocated == 1  # the second and third payloads landed in the first one's buffer
    # a payload gathered before its turn (a drill's) goes from where it is, the same way
    payload = gather_blocks(layers, [5, 6, 9])
    result, error = send("gathered", (5, 6, 9), kv=SavedKV.gathered(payload.clone()))
    got = received.get(timeout=10)
    assert error is None and result.streamed and torch.equal(got.payload, payload)


def test_a_chunk_changed_after_its_checksum_is_refused_and_the_pair_goes_on(gloo_pair):
    send, received, layers, buffers, _, held = gloo_pair
    before = layers[0].clone()
    result, error = send("tampered", tuple(range(4, 12)), tamper=lambda chunk: chunk.view(-1)[0].add_(1.0))
    assert error is None and result.streamed  # sent: decode's verification is what refuses it
    got = received.get(timeout=10)
    assert got.payload is None and "checksum mismatch" in got.error
    assert torch.equal(layers[0], before)  # the change was made to the copy that went, never to the engine's blocks
    assert buffers.idle_bytes() > 0  # a refused payload's buffer went back at once
    result, error = send("next", tuple(range(4, 12)))
    got = received.get(timeout=10)
    assert error is None and got.error is None and torch.equal(got.payload, gather_blocks(layers, list(range(4, 12))))


def test_a_chunk_the_sender_cannot_read_fails_only_its_transfer(gloo_pair):
    from app.kv.held import KVNotGathered

    send, received, layers, _, _, held = gloo_pair
    good = layers[2]
    layers[2] = torch.zeros(64, *BLOCK, dtype=torch.float64)  # its gather into a float32 chunk raises mid-stream
    try:
        result, error = send("unreadable", (1, 5, 9, 13))
    finally:
        layers[2] = good
    assert result is None and isinstance(error, KVNotGathered)  # this transfer failed; the pair did not break
    got = received.get(timeout=10)
    assert got.payload is None and "could not read" in got.error
    assert "unreadable" in held.take_finished()  # its blocks went back all the same
    result, error = send("after", (1, 5, 9, 13))  # every chunk still went, so the next transfer is in step
    got = received.get(timeout=10)
    assert error is None and torch.equal(got.payload, gather_blocks(layers, [1, 5, 9, 13]))
