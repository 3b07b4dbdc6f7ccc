"""KV transfer benchmark: latency and bandwidth of one prompt's KV, prefill process -> decode process.

Two Ray actors stand in for a prefill and a decode replica and use pdserve's real transfer path, once per
backend: `socket` (the payload over the pair's `PDSERVE_GLOO` group; in chunks when it is larger than one, gather and
checksum overlapping the wire: app/kv/streamed.py), `shm` (the same pair with its
same-node path: the payload gathered into a shared-memory segment decode maps, only the header on the
socket) and `one_copy` (the default on one node: prefill's KV cache lives in memfds decode maps; only the
header and the block ids go on the socket, and decode copies the blocks straight out of prefill's cache). Each
transfer is split into its parts: gather (prefill's sender thread, out of the held blocks into the send buffer
or segment; none with one copy), checksum (the same thread seals the header; with one copy, read in place after
the header went), wire (from the sealed header to decode holding the payload: socket send/receive or the segment's
mapping, plus decode's checksum; streamed, everything from the start to decode holding the verified payload, gather
and checksum included, since they overlap it; with one copy, what the header and decode's checksum, read in place out
of prefill's cache at the same time as prefill's, add to prefill's) and scatter (decode's engine thread, into its
blocks; with one copy, the copy out of prefill's cache). Beside it, in the same run and process, a memory copy of
the same bytes into a buffer that exists already: `x memcpy` is memcpy's time over the transfer's (1.0: as fast as
one copy; gather + scatter make two, one copy one).

    .venv/bin/python benchmarks/kv_transfer.py                     # the default model's KV shape
    .venv/bin/python benchmarks/kv_transfer.py --layers 32 --kv-heads 8 --head-size 128 --sizes 1,4,16  # 8B-like
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import ray
import torch

BACKENDS = {"socket": (0, False), "shm": (1 << 30, False), "one_copy": (1 << 30, True)}  # (shm_max_bytes, one copy)


@ray.remote(num_cpus=0)
class _End:
    def __init__(self, role: str, my_id: str, peer_id: str, num_layers: int, block_shape: tuple[int, ...],
                 num_total_blocks: int, shm_max_bytes: int, one_copy: bool):
        from app.kv.kv_share import share_kv_cache
        from app.kv.mailbox import KVMailbox
        from app.kv.pairs import PairTransport

        torch.set_num_threads(1)
        self.role, self.peer_id = role, peer_id
        gen = torch.Generator().manual_seed(0 if role == "prefill" else 1)
        self.layers = [torch.randn((num_total_blocks, *block_shape), generator=gen) for _ in range(num_layers)]
        self.mailbox = KVMailbox(lease_s=60, on_change=self._arrived)
        self._arrival = threading.Condition()
        self.arrived_at: dict[int, float] = {}
        self.transport = PairTransport(role, my_id, "gloo", 60, torch.device("cpu"),
                                       deliver=self._deliver if role == "decode" else None,
                                       shm_max_bytes=shm_max_bytes)
        if role == "prefill" and one_copy:  # as prefill's connector does at register_kv_caches
            shared = share_kv_cache(self.layers)
            self.transport.shared_cache = lambda: shared

    def ensure(self) -> tuple[bool, bool]:
        self.transport.ensure(self.peer_id)
        stats = self.transport.stats()
        return stats["num_shm_pairs"] == 1, stats["num_one_copy_pairs"] == 1

    def _deliver(self, received) -> None:
        self.arrived_at[received.header.xfer_key] = time.perf_counter()
        self.mailbox.deliver(received)

    def _arrived(self) -> None:
        with self._arrival:
            self._arrival.notify_all()

    def send(self, xfer_id: str, num_blocks: int) -> dict:
        """What prefill's connector and outbox do: hold the prompt's blocks, lease a segment if the pair has one, queue;
        the pair's sender thread gathers (into the segment) and seals."""
        from app.kv.header import UNSEALED, KVHeader, xfer_key
        from app.kv.held import HeldBlocks, SavedKV
        from app.kv.payload import CHECKSUM_XXH3, gather_blocks, payload_shape

        done = threading.Event()
        result: dict = {}
        started = time.perf_counter()
        shape = payload_shape(self.layers, num_blocks)  # [layers, num_blocks, *block_shape]
        num_bytes = torch.Size(shape).numel() * self.layers[0].element_size()
        segment = self.transport.lease_segment(self.peer_id, num_bytes)
        out = segment.view(shape, self.layers[0].dtype) if segment is not None else None
        held = HeldBlocks(lease_s=60)
        held.hold(xfer_id)
        held.finish(xfer_id)
        kv = SavedKV.held(held, xfer_id, self.layers, tuple(range(num_blocks)), out)
        header = KVHeader(xfer_key(xfer_id), num_blocks * 32, num_blocks, self.layers[0].dtype, shape, CHECKSUM_XXH3,
                          UNSEALED)
        self.transport.send(self.peer_id, header, kv,
                            lambda res, err: (result.update(res=res, err=err), done.set()), segment=segment)
        done.wait(60)
        if result.get("err") is not None:
            raise result["err"]
        payload = gather_blocks(self.layers, list(range(num_blocks)))  # the same bytes, for the memcpy baseline
        dst = torch.empty_like(payload)
        copy_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(payload)
            copy_times.append(time.perf_counter() - t0)
        return {"started": started, "gather_s": result["res"].gather_s, "checksum_s": result["res"].checksum_s,
                "num_bytes": num_bytes, "memcpy_s": statistics.median(copy_times),
                "in_segment": result["res"].in_segment, "streamed": result["res"].streamed}

    def receive(self, xfer_id: str, num_blocks: int) -> dict:
        """What decode's connector does: claim the payload, scatter it (one copy: copy and verify the blocks), say it
        is loaded."""
        from app.kv.header import xfer_key
        from app.kv.kv_share import RemoteBlocks, copy_blocks
        from app.kv.mailbox import XferState
        from app.kv.payload import scatter_blocks

        key = xfer_key(xfer_id)
        self.mailbox.expect(key, 60)
        with self._arrival:
            self._arrival.wait_for(lambda: self.mailbox.state(key)[0] == XferState.ARRIVED, timeout=60)
        header, payload = self.mailbox.claim(key)
        t0 = time.perf_counter()
        if isinstance(payload, RemoteBlocks):
            copy_blocks(payload.layers, payload.block_ids, self.layers, list(range(100, 100 + num_blocks)))
        else:
            scatter_blocks(self.layers, list(range(100, 100 + num_blocks)), payload)
        scattered = time.perf_counter()
        del payload
        self.mailbox.loaded(key)
        self.mailbox.forget(key)
        return {"arrived": self.arrived_at.pop(key), "scatter_s": scattered - t0, "done": scattered}

    def close(self) -> None:
        self.transport.close()


def run(backend: str, num_layers: int, block_shape: tuple[int, ...], sizes: list[int], repeats: int) -> list[dict]:
    (shm, one_copy), total = BACKENDS[backend], max(sizes) + 128
    prefill = _End.remote("prefill", f"bench-p-{backend}", f"bench-d-{backend}", num_layers, block_shape, total, shm,
                          one_copy)
    decode = _End.remote("decode", f"bench-d-{backend}", f"bench-p-{backend}", num_layers, block_shape, total, shm,
                         one_copy)
    paths = ray.get([prefill.ensure.remote(), decode.ensure.remote()])
    if any(path != (bool(shm), one_copy) for path in paths):
        raise RuntimeError(f"{backend}: the pair's (shared memory, one copy) is {paths}, "
                           f"expected {(bool(shm), one_copy)}")
    rows = []
    for num_blocks in sizes:
        samples = []
        for i in range(repeats + 1):
            xfer = f"bench-{backend}-{num_blocks}-{i}"
            recv_ref = decode.receive.remote(xfer, num_blocks)
            sent = ray.get(prefill.send.remote(xfer, num_blocks))
            got = ray.get(recv_ref)
            assert sent["in_segment"] == bool(shm)
            if i == 0:
                continue  # first transfer of a size allocates (a new segment, on shm); not counted
            # streamed (socket, more than one chunk): gather and checksum overlap the wire, which runs to the arrival
            serial = 0.0 if sent["streamed"] else sent["gather_s"] + sent["checksum_s"]
            samples.append({**sent, "total_s": got["done"] - sent["started"], "scatter_s": got["scatter_s"],
                            "wire_s": got["arrived"] - sent["started"] - serial})
        med = {k: statistics.median(s[k] for s in samples)
               for k in samples[0] if k not in ("started", "num_bytes", "in_segment", "streamed")}
        num_bytes = samples[0]["num_bytes"]
        rows.append({"backend": backend, "num_blocks": num_blocks, "num_bytes": num_bytes, **med,
                     "gib_per_s": num_bytes / med["total_s"] / 2**30, "x_memcpy": med["memcpy_s"] / med["total_s"]})
    ray.get([prefill.close.remote(), decode.close.remote()])
    for actor in (prefill, decode):
        ray.kill(actor)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="model layers (default: the tiny model's 4)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--sizes", default="1,4,16,32,64", help="prompt sizes in blocks")
    parser.add_argument("--backends", default="socket,shm,one_copy", help=f"of {', '.join(BACKENDS)}")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    block_shape = (args.kv_heads, args.block_size, 2 * args.head_size)  # CPU layout
    sizes = [int(s) for s in args.sizes.split(",")]
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rows = [row for backend in args.backends.split(",")
                for row in run(backend, args.layers, block_shape, sizes, args.repeats)]
    finally:
        ray.shutdown()
    print(f"KV transfer, {args.layers} layers x block {list(block_shape)} fp32, pdserve gloo pair group, "
          f"medians of {args.repeats} (ms)")
    print(f"{'backend':>8} {'blocks':>6} {'MiB':>7} {'total':>7} {'GiB/s':>6} {'memcpy':>7} {'x memcpy':>8} | "
          f"{'gather':>7} {'checksum':>8} {'wire':>7} {'scatter':>7}")
    for r in rows:
        print(f"{r['backend']:>8} {r['num_blocks']:>6} {r['num_bytes'] / 2**20:>7.2f} {r['total_s'] * 1e3:>7.2f} "
              f"{r['gib_per_s']:>6.2f} {r['memcpy_s'] * 1e3:>7.3f} {r['x_memcpy']:>8.2f} | "
              f"{r['gather_s'] * 1e3:>7.2f} {r['checksum_s'] * 1e3:>8.2f} {r['wire_s'] * 1e3:>7.2f} "
              f"{r['scatter_s'] * 1e3:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
