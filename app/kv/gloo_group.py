"""`PDSERVE_GLOO`: a `ray.util.collective` backend with one standalone gloo process group per pair.

Ray's built-in gloo backend initialises the process's default torch.distributed group once and reuses
it for every later group: a replica could only ever talk to its first peers, and concurrent transfers
were seen to swap tensors between requests. Here every group owns its own `TCPStore` and
`ProcessGroupGloo`, so a replica can sit in many pairs and re-pair after a peer restarts, and
send/recv carry gloo message tags.

Life cycle: `init_collective_group(2, rank, backend="pdserve_gloo", group_name=...)` only records the
group (Ray holds a process-wide lock during construction, so nothing may block there); `connect()`
then rendezvouses outside that lock (`app.kv.rendezvous`, shared with the NCCL pair group): rank 0 opens
a `TCPStore` on a free port and publishes its address in Ray's internal KV under the group name, rank 1
polls for it, both build the gloo group, rank 0 deletes the key. `destroy_group()` drops the process
group; a blocked peer then sees its connection close and fails, which breaks the pair on its side too.
"""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from app.kv import rendezvous

BACKEND_NAME = "PDSERVE_GLOO"
# Idle receive loops wait on their pair for as long as it lives; liveness comes from the TCP
# connection (a dead peer fails the wait) and from the sender's own per-send timeout.
_IDLE_TIMEOUT = datetime.timedelta(days=30)


class PairGlooGroup(BaseGroup):
    """A two-rank gloo group of its own; point-to-point only."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self._pg: dist.ProcessGroupGloo | None = None
        self._store: dist.TCPStore | None = None
        self._lock = threading.Lock()

    @classmethod
    def backend(cls) -> str:
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_gloo_available()

    # -- rendezvous -----------------------------------------------------------------------------

    def connect(self, timeout_s: float, kv_put=None, kv_get=None, kv_del=None) -> None:
        """Form the gloo group with the peer (blocks up to `timeout_s`); idempotent."""
        with self._lock:
            if self._pg is not None:
                return
            with rendezvous.pair_store("gloo", self.group_name, self.rank, self.world_size, timeout_s,
                                       kv_put, kv_get, kv_del) as store:
                pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, _IDLE_TIMEOUT)
            self._store, self._pg = store, pg

    @property
    def is_connected(self) -> bool:
        return self._pg is not None

    # -- point to point ---------------------------------------------------------------------------

    def send_tagged(self, tensor: torch.Tensor, dst_rank: int, tag: int, timeout_s: float | None = None) -> None:
        _wait(self._require_pg().send([tensor], dst_rank, tag), timeout_s)

    def recv_tagged(self, tensor: torch.Tensor, src_rank: int, tag: int, timeout_s: float | None = None) -> None:
        _wait(self._require_pg().recv([tensor], src_rank, tag), timeout_s)

    def isend_tagged(self, tensor: torch.Tensor, dst_rank: int, tag: int) -> Pending:
        """Start a send (gloo's own thread writes it) and return at once; `wait` on the result."""
        return Pending(self._require_pg().send([tensor], dst_rank, tag))

    def irecv_tagged(self, tensor: torch.Tensor, src_rank: int, tag: int) -> Pending:
        return Pending(self._require_pg().recv([tensor], src_rank, tag))

    def send(self, tensors, send_options) -> None:
        self.send_tagged(tensors[0], send_options.dst_rank, 0)

    def recv(self, tensors, recv_options) -> None:
        self.recv_tagged(tensors[0], recv_options.src_rank, 0)

    def _require_pg(self) -> dist.ProcessGroupGloo:
        pg = self._pg
        if pg is None:
            raise RuntimeError(f"pair group {self.group_name} is not connected (or was destroyed)")
        return pg

    def destroy_group(self) -> None:
        with self._lock:
            pg, self._pg, self._store = self._pg, None, None
        if pg is not None:
            try:
                pg.abort()  # fails our pending receives and closes the peer's connection
            except Exception:  # noqa: BLE001 - already broken
                pass

    # -- collectives a pair never uses ------------------------------------------------------------

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(f"{BACKEND_NAME} groups do point-to-point send/recv only")

    allreduce = barrier = reduce = allgather = broadcast = reducescatter = _unsupported


class Pending:
    """A send or receive under way; `wait(timeout_s)` for it (None: the group's own, idle-long timeout)."""

    def __init__(self, work):
        self.work = work

    def wait(self, timeout_s: float | None) -> None:
        _wait(self.work, timeout_s)


def _wait(work, timeout_s: float | None) -> None:
    """Wait for a gloo work item, up to `timeout_s` (None: the group's own, idle-long timeout)."""
    if timeout_s is None:
        work.wait()
    else:
        work.wait(datetime.timedelta(seconds=timeout_s))


def register() -> None:
    """Register the backend in this process (every process that joins a pair group must)."""
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    if not _global_registry.is_registered(BACKEND_NAME):
        register_collective_backend(BACKEND_NAME, PairGlooGroup)
