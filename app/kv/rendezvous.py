"""Rendezvous of a pair group's two ranks, shared by the gloo and NCCL pair groups.

Rank 0 opens a `TCPStore` on a free port and publishes `host:port` in Ray's internal KV under
`pdserve:<kind>:<group name>`; rank 1 polls for it and connects. Then every rank checks in on the store
(`check_in`) and rank 0 waits for the others until the deadline: a process group's constructor waits for
its peers with the group's own timeout, which is idle-long (days) so that idle receives never time out, so
a peer that died after the rendezvous key was read (or never came) must be caught here, in `timeout_s`.
The caller builds its process group on the store inside `pair_store(...)`; on leaving it (success or
failure) rank 0 deletes the key, so no key outlives the rendezvous. Ray is imported only when the KV
functions are not injected (unit tests and the GPU checks pass their own), and `node_ip()` falls back to
loopback outside Ray.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist

KVPut = Callable[..., object]
KVGet = Callable[[bytes], bytes | None]
KVDel = Callable[[bytes], object]


def rendezvous_key(kind: str, group_name: str) -> bytes:
    return f"pdserve:{kind}:{group_name}".encode()


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests), or no Ray at all (the GPU checks)
        return "127.0.0.1"


def kv_functions(kv_put: KVPut | None, kv_get: KVGet | None, kv_del: KVDel | None) -> tuple[KVPut, KVGet, KVDel]:
    """The injected KV functions, or Ray's internal KV for those not given."""
    if kv_put is None or kv_get is None or kv_del is None:
        from ray.experimental import internal_kv

        kv_put = kv_put or internal_kv._internal_kv_put
        kv_get = kv_get or internal_kv._internal_kv_get
        kv_del = kv_del or internal_kv._internal_kv_del
    return kv_put, kv_get, kv_del


def check_in(store: dist.TCPStore, rank: int, world_size: int, deadline: float, group_name: str) -> None:
    """Every rank checks in on the store; rank 0 waits for all until `deadline` (`TimeoutError` past it)."""
    if rank != 0:
        store.set(f"joined/{rank}", b"1")
        return
    keys = [f"joined/{r}" for r in range(1, world_size)]
    if not keys:
        return
    try:
        store.wait(keys, datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
    except dist.DistStoreError as exc:
        raise TimeoutError(f"peer never joined pair group {group_name}: {exc}") from exc


def wait_for_address(key: bytes, kv_get: KVGet, timeout_s: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = kv_get(key)
        if value:
            host, port = value.decode().rsplit(":", 1)
            return host, int(port)
        time.sleep(0.02)
    raise TimeoutError(f"no rendezvous address for {key.decode()} within {timeout_s:.1f}s (is the peer up?)")


@contextmanager
def pair_store(kind: str, group_name: str, rank: int, world_size: int, timeout_s: float,
               kv_put: KVPut | None = None, kv_get: KVGet | None = None,
               kv_del: KVDel | None = None) -> Iterator[dist.TCPStore]:
    """Yield the pair's `TCPStore` (rank 0 hosts it) once every rank checked in (`TimeoutError` after `timeout_s`);
    build the process group inside the block."""
    kv_put, kv_get, kv_del = kv_functions(kv_put, kv_get, kv_del)
    key = rendezvous_key(kind, group_name)
    deadline, timeout = time.monotonic() + timeout_s, datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        host, port = wait_for_address(key, kv_get, timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        check_in(store, rank, world_size, deadline, group_name)
        yield store
        return
    store = dist.TCPStore(node_ip(), 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    kv_put(key, f"{node_ip()}:{store.port}".encode(), overwrite=True)
    try:
        check_in(store, rank, world_size, deadline, group_name)
        yield store
    finally:
        kv_del(key)


__all__ = ["check_in", "kv_functions", "node_ip", "pair_store", "rendezvous_key", "wait_for_address"]
