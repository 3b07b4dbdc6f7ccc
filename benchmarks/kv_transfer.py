"""KV transfer benchmark: latency and bandwidth of one prompt's KV, prefill process -> decode process.

Two Ray actors stand in for a prefill and a decode replica and use pdserve's real transfer path:
`gather_blocks` + checksum (serialise), the pair's `KVSender` over a `PDSERVE_GLOO` group (send),
the decode side's receive loop with checksum verification into a `KVMailbox` (receive), and
`scatter_blocks` into the decode cache (scatter). Beside it, in the same run and process, a plain
memory copy of the same bytes: the ratio transfer / memcpy is the figure to compare across machines.

    .venv/bin/python benchmarks/kv_transfer.py                     # the default model's KV shape
    .venv/bin/python benchmarks/kv_transfer.py --layers 32 --kv-heads 8 --head-size 128   # 8B-like
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import ray
import torch


@ray.remote(num_cpus=0)
class _End:
    def __init__(self, role: str, my_id: str, peer_id: str, num_layers: int, block_shape: tuple[int, ...],
                 num_total_blocks: int):
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
                                       deliver=self._deliver if role == "decode" else None)

    def ensure(self) -> None:
        self.transport.ensure(self.peer_id)

    def _deliver(self, received) -> None:
        self.arrived_at[received.header.xfer_key] = time.perf_counter()
        self.mailbox.deliver(received)

    def _arrived(self) -> None:
        with self._arrival:
            self._arrival.notify_all()

    def send(self, xfer_id: str, num_blocks: int) -> dict:
        from app.kv.header import KVHeader, xfer_key
        from app.kv.payload import checksum, gather_blocks

        done = threading.Event()
        result: dict = {}
        started = time.perf_counter()
        payload = gather_blocks(self.layers, list(range(num_blocks)))  # [layers, num_blocks, *block_shape]
        gathered = time.perf_counter()
        header = KVHeader(xfer_key(xfer_id), num_blocks * 32, num_blocks, payload.dtype, tuple(payload.shape), 1,
                          checksum(payload))
        summed = time.perf_counter()
        self.transport.send(self.peer_id, header, payload,
                            lambda res, err: (result.update(res=res, err=err), done.set()))
        done.wait(60)
        if result.get("err") is not None:
            raise result["err"]
        sent = time.perf_counter()
        copy_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            payload.clone()
            copy_times.append(time.perf_counter() - t0)
        return {"started": started, "gather_s": gathered - started, "checksum_s": summed - gathered,
                "send_s": sent - summed, "num_bytes": header.num_bytes, "memcpy_s": min(copy_times)}

    def receive(self, xfer_id: str, num_blocks: int) -> dict:
        from app.kv.header import xfer_key
        from app.kv.mailbox import XferState
        from app.kv.payload import scatter_blocks

        key = xfer_key(xfer_id)
        with self._arrival:
            self._arrival.wait_for(lambda: self.mailbox.state(key)[0] == XferState.ARRIVED, timeout=60)
        header, payload = self.mailbox.claim(key)
        t0 = time.perf_counter()
        scatter_blocks(self.layers, list(range(100, 100 + num_blocks)), payload)
        scattered = time.perf_counter()
        self.mailbox.forget(key)
        return {"arrived": self.arrived_at.pop(key), "scatter_s": scattered - t0, "done": scattered}

    def close(self) -> None:
        self.transport.close()


def run(num_layers: int, block_shape: tuple[int, ...], sizes: list[int], repeats: int) -> list[dict]:
    prefill = _End.remote("prefill", "bench-p", "bench-d", num_layers, block_shape, max(sizes) + 128)
    decode = _End.remote("decode", "bench-d", "bench-p", num_layers, block_shape, max(sizes) + 128)
    ray.get([prefill.ensure.remote(), decode.ensure.remote()])
    rows = []
    for num_blocks in sizes:
        samples = []
        for i in range(repeats + 1):
            xfer = f"bench-{num_blocks}-{i}"
            recv_ref = decode.receive.remote(xfer, num_blocks)
            sent = ray.get(prefill.send.remote(xfer, num_blocks))
            got = ray.get(recv_ref)
            if i == 0:
                continue  # first transfer of a size allocates; not counted
            samples.append({**sent, "total_s": got["done"] - sent["started"], "scatter_s": got["scatter_s"],
                            "receive_s": got["arrived"] - sent["started"] - sent["gather_s"] - sent["checksum_s"]})
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k not in ("started", "num_bytes")}
        num_bytes = samples[0]["num_bytes"]
        rows.append({"num_blocks": num_blocks, "num_bytes": num_bytes, **med,
                     "gib_per_s": num_bytes / med["total_s"] / 2**30,
                     "ratio_vs_memcpy": med["total_s"] / med["memcpy_s"]})
    ray.get([prefill.close.remote(), decode.close.remote()])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="model layers (default: the tiny model's 4)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64", help="prompt sizes in blocks")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    block_shape = (args.kv_heads, args.block_size, 2 * args.head_size)  # CPU layout
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rows = run(args.layers, block_shape, [int(s) for s in args.sizes.split(",")], args.repeats)
    finally:
        ray.shutdown()
    print(f"KV transfer, {args.layers} layers x block {list(block_shape)} fp32, pdserve gloo pair group, "
          f"medians of {args.repeats}")
    print(f"{'blocks':>6} {'KiB':>8} {'total ms':>9} {'GiB/s':>6} {'memcpy ms':>10} {'ratio':>6} | "
          f"{'gather':>7} {'checksum':>8} {'send+recv':>9} {'scatter':>7}")
    for r in rows:
        print(f"{r['num_blocks']:>6} {r['num_bytes'] / 1024:>8.0f} {r['total_s'] * 1e3:>9.2f} {r['gib_per_s']:>6.2f} "
              f"{r['memcpy_s'] * 1e3:>10.3f} {r['ratio_vs_memcpy']:>6.1f} | {r['gather_s'] * 1e3:>7.2f} "
              f"{r['checksum_s'] * 1e3:>8.2f} {r['receive_s'] * 1e3:>9.2f} {r['scatter_s'] * 1e3:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
