"""The NCCL pair group's store side: its control messages.

A pair's `TCPStore` (rank 0 hosts it; `app.kv.rendezvous`, where every rank checks in at connect so that no
NCCL set-up waits on a rank that never came) carries what must not wait in NCCL:
- a transfer's header travels as a control message (`StoreControl`): rank r's n-th message is the key
  `ctl/<r>/<n>`, so messages are FIFO per receiving rank. The receiver blocks in a store wait on the CPU,
  on a connection of its own, and posts no NCCL receive until a header has announced the payload; an idle
  pair thus holds no kernel on the GPU.
Closing: `close()` wakes this side's waiting receive with a closing marker; when rank 0's store goes
(its process died or destroyed the group) rank 1's wait fails at once. Either breaks the pair.
The peer watch, the other way round: rank 1 also hosts a small store of its own (address under
`watch/1` in the pair's store) and rank 0 blocks on it (`wait_peer_gone`). The operating system closes
that store's sockets when rank 1's process dies, and rank 1 drops it when it destroys the group; either
way rank 0's wait fails at once and breaks the pair. (Across nodes, a host that vanishes without closing
its sockets is still caught by the next send's deadline.)
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist

from app.kv.nccl_ops import IDLE_TIMEOUT, NcclPairError, remaining
from app.kv.rendezvous import node_ip

_CLOSED = b"\x00pdserve:pair-closed"  # what `close()` puts under the key a receive waits on
_WATCH_KEY = "watch/1"  # in the pair's store: where rank 1 hosts the store rank 0 watches
_WATCH_CLOSED = "closed"  # in the watched store: what rank 0's `close()` sets to wake its own watch


class StoreControl:
    """Small FIFO messages between the ranks of one pair, through the pair's store.

    `broken()` gives the group's broken reason (None while usable); `fail(reason)` breaks the group, as a
    lost store does."""

    def __init__(self, store: dist.TCPStore, rank: int, group_name: str, deadline: float,
                 broken: Callable[[], str | None], fail: Callable[[str], None], watch: bool = False):
        self.rank, self.group_name = rank, group_name
        self.store: dist.TCPStore | None = store  # sends and wake-ups (rank 0: the store's own client)
        # A second connection, only for the blocking wait (a wait holds its connection).
        self._ctl: dist.TCPStore | None = dist.TCPStore(
            store.host, store.port, None, is_master=False,
            timeout=datetime.timedelta(seconds=max(remaining(deadline), 1.0)))
        self._broken, self._fail = broken, fail
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._sent = self._received = 0
        self._waiting: str | None = None  # the key a receive waits on now
        self._watched: dist.TCPStore | None = None  # rank 1 (`watch`): the store rank 0 watches
        self._watch: list[dist.TCPStore] = []  # rank 0 (`watch`): [waiting connection, waking connection]
        self._closing = threading.Event()  # where there is nothing to watch, `wait_peer_gone` waits for close
        if watch:
            self._start_watch(store, deadline)

    def _start_watch(self, store: dist.TCPStore, deadline: float) -> None:
        timeout = datetime.timedelta(seconds=max(remaining(deadline), 1.0))
        if self.rank != 0:
            self._watched = dist.TCPStore(node_ip(), 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
            store.set(_WATCH_KEY, f"{node_ip()}:{self._watched.port}")
            return
        try:
            store.wait([_WATCH_KEY], timeout)
        except dist.DistStoreError as exc:
            raise TimeoutError(f"peer of {self.group_name} never published its watch store: {exc}") from exc
        host, port = store.get(_WATCH_KEY).decode().rsplit(":", 1)
        self._watch = [dist.TCPStore(host, int(port), None, is_master=False, timeout=timeout) for _ in range(2)]

    def send(self, data: bytes, dst_rank: int) -> None:
        """Queue a small message for `dst_rank` (FIFO); returns at once."""
        store = self.store
        if store is None:
            raise NcclPairError(f"pair group {self.group_name} was destroyed")
        with self._send_lock:
            key = f"ctl/{dst_rank}/{self._sent}"
            self._sent += 1
            store.set(key, data)

    def recv(self, timeout_s: float | None = None) -> bytes:
        """The next message for this rank. Waits on the CPU, posting nothing on the GPU; `timeout_s=None`
        waits until one comes, `close()` is called, or the store goes away."""
        with self._recv_lock:
            ctl = self._ctl
            key = f"ctl/{self.rank}/{self._received}"
            self._waiting = key  # before the check below: a `close()` after it sees the key and wakes us
            try:
                if ctl is None or self._broken() is not None:  # closed before it could see our key
                    raise NcclPairError(f"pair group {self.group_name} was destroyed")
                ctl.wait([key], IDLE_TIMEOUT if timeout_s is None else datetime.timedelta(seconds=timeout_s))
                value = ctl.get(key)
                ctl.delete_key(key)
            except dist.DistStoreError as exc:
                if timeout_s is not None and "timeout" in str(exc).lower() and self._broken() is None:
                    raise TimeoutError(f"no control message on {self.group_name} within {timeout_s}s") from exc
                self._lost(exc)
            except NcclPairError:
                raise
            except Exception as exc:  # the store's host (rank 0) is gone
                self._lost(exc)
            finally:
                self._waiting = None
            if value == _CLOSED or self._broken() is not None:
                raise NcclPairError(f"pair group {self.group_name} was destroyed")
            self._received += 1
            return value

    def wait_peer_gone(self) -> NoReturn:
        """Rank 0: block until rank 1's watch store goes (its process died or it destroyed the group), then
        break the pair; or until `close()`. Raises `NcclPairError` either way."""
        watch = self._watch
        if watch:
            try:
                watch[0].wait([_WATCH_CLOSED], IDLE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - the connection to rank 1 closed: rank 1 is gone
                if self._broken() is None and self._watch:
                    self._fail(f"peer gone: {exc}")
                    raise NcclPairError(f"the peer of {self.group_name} is gone: {exc}") from exc
        else:
            self._closing.wait()
        raise NcclPairError(f"pair group {self.group_name} was destroyed")

    def _lost(self, exc: Exception) -> NoReturn:
        self._fail(f"control channel lost: {exc}")
        raise NcclPairError(f"control channel of {self.group_name} lost: {exc}") from exc

    def close(self) -> None:
        """Drop the connections and stores (rank 0's pair store and rank 1's watched store close with their last
        reference) and wake a waiting receive and rank 0's peer watch. The group is marked broken before this, so a
        receive that starts later fails at once."""
        store, waiting, watch = self.store, self._waiting, self._watch
        self.store = self._ctl = self._watched = None  # rank 1: dropping the watched store fails rank 0's watch
        self._watch = []
        self._closing.set()
        if waiting is not None and store is not None:
            with contextlib.suppress(Exception):
                store.set(waiting, _CLOSED)
        if watch:
            with contextlib.suppress(Exception):  # wakes our own watch (fails at once if rank 1 is gone)
                watch[1].set(_WATCH_CLOSED, b"1")
