"""`PDSERVE_NCCL`: a `ray.util.collective` backend with one standalone NCCL process group per pair.

Ray's built-in NCCL group (Ray 2.60) reports a send done once it is enqueued on a CUDA stream, ignores
timeouts, cannot be aborted, creates its communicator at the first send (so warm-up sets up nothing),
gives up a second rank's rendezvous after 180 s (breaking idle pairs) and keeps its unique id in a
detached actor that outlives a dead peer. Here, as in `PDSERVE_GLOO` (`gloo_group.py`), every group owns
its own `TCPStore` and a standalone `torch.distributed.ProcessGroupNCCL`:
- `connect()` creates the communicator and moves a few bytes each way on it, so warm-up pays for the
  communicator and NCCL's lazily built peer connections, and the first request pays for neither;
- `send`/`recv` return only once the NCCL operation has finished on the GPU (the work's completion is
  polled), and fail at their deadline: the communicator is then aborted (its kernels exit), the group is
  unusable from then on, and its owner drops the pair;
- no NCCL kernel waits while a pair idles: a transfer's header goes as a control message through the
  pair's store, and the receiver posts its NCCL receive only once a header has announced the payload.
  An idle pair is a blocked store wait on the CPU, not a spinning kernel that would stall
  `torch.cuda.synchronize()` or `cudaFree` in the engine, and the process group's own timeout is 30 days,
  so nothing breaks a pair that sits unused;
- when rank 0's store goes away (its process died or destroyed the group) rank 1's control wait fails at
  once; likewise rank 0's peer watch (`wait_peer_gone`) fails at once when a small store rank 1 hosts goes
  away, so a dead decode replica breaks the pair before the next transfer, not at that send's deadline
  (NCCL's P2P transports would not notice a dead peer; its socket transport notices in about 0.6 s).
NCCL has no tags: messages on a pair are FIFO, which is all the channel needs. Every operation is one
grouped (coalesced) NCCL call, which is also what lets a one-rank group send to itself (the GPU checks).

Life cycle: `init_collective_group(2, rank, backend="pdserve_nccl", group_name=...)` only records the
group (Ray holds a process-wide lock during construction, so nothing may block there); `connect()`
then rendezvouses outside that lock (`app.kv.rendezvous`, shared with the gloo pair group), builds the
process group, creates the communicator and warms the link up, all within its `timeout_s`; rank 0
deletes the rendezvous key before `connect()` returns, whether it succeeded or not. `destroy_group()`
aborts the communicator (this side's pending operations fail) and drops the store, which fails the
peer's control wait, so the pair breaks on its side too.

Parts: `PairNccl` (here) keeps the life cycle and the group's state (process group, broken flag, locks);
the NCCL calls themselves (build, bring-up, grouped issue, completion polling, abort) are
`app.kv.nccl_ops`, and the store side (check-in, control messages) is `app.kv.nccl_control`. None of
them imports Ray or vLLM (they run where only torch and NCCL are, as on the GPU check machine);
`PairNcclGroup`, the `BaseGroup` subclass Ray instantiates, is built on first use of its name, which
imports Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from app.kv import nccl_ops, rendezvous
from app.kv.nccl_control import StoreControl
from app.kv.nccl_ops import IDLE_TIMEOUT, NcclPairError, nbytes, nccl_available

logger = logging.getLogger(__name__)

BACKEND_NAME = "PDSERVE_NCCL"
_T = TypeVar("_T")


class _PairGroupBase:
    """What Ray's `BaseGroup` asks of a group besides point-to-point: its names, its backend, and the
    collectives, which a pair refuses."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        self._world_size, self._rank, self._group_name = world_size, rank, group_name

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def group_name(self) -> str:
        return self._group_name

    @classmethod
    def backend(cls) -> str:
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return nccl_available()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(f"{BACKEND_NAME} groups do point-to-point send/recv only")

    allreduce = barrier = reduce = allgather = broadcast = reducescatter = _unsupported


class PairNccl(_PairGroupBase):
    """A two-rank NCCL group of its own (one rank also works: it sends to itself); point-to-point only."""

    # Builds the process group: (store, rank, world_size, timeout) -> ProcessGroupNCCL. The CPU unit
    # tests put a stand-in here.
    new_process_group = staticmethod(nccl_ops.new_process_group)

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self.device: torch.device | None = None
        self._pg: Any = None
        self._control: StoreControl | None = None  # control messages through the pair's store
        self._lock = threading.Lock()  # connect / destroy
        self._issue_lock = threading.Lock()  # one grouped NCCL call at a time
        self._broken: str | None = None
        self._abort_lock = threading.Lock()
        self._aborted = False
        self.connect_s: float | None = None  # rendezvous + communicator + warm-up
        self.comm_init_s: float | None = None  # creating the NCCL communicator
        self.warmup_s: float | None = None  # the first exchange each way (NCCL's peer connections)

    # -- life cycle -------------------------------------------------------------------------------

    def connect(self, timeout_s: float, kv_put=None, kv_get=None, kv_del=None,
                device: torch.device | str | None = None) -> None:
        """Form the group with the peer, create the communicator and warm the link up, within `timeout_s`
        (`TimeoutError` past it); idempotent."""
        with self._lock:
            if self._pg is not None:
                return
            if self._broken is not None:
                raise NcclPairError(f"pair group {self.group_name} is broken: {self._broken}")
            started = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            self.device = nccl_ops.resolve_device(device)
            pg = None
            try:
                with rendezvous.pair_store("nccl", self.group_name, self.rank, self.world_size, timeout_s,
                                           kv_put, kv_get, kv_del) as store:
                    control = StoreControl(store, self.rank, self.group_name, deadline, lambda: self._broken,
                                           self._break, watch=self.world_size > 1)
                    pg = self.new_process_group(dist.PrefixStore("nccl", store), self.rank, self.world_size,
                                                IDLE_TIMEOUT)
                    peer = (self.rank + 1) % self.world_size  # itself in a one-rank group
                    self.comm_init_s, self.warmup_s = nccl_ops.bring_up(pg, self.device, self.rank, peer, deadline,
                                                                        self.group_name, self._break)
            except BaseException:
                if pg is not None:
                    nccl_ops.abort(pg)
                raise
            self._control, self._pg = control, pg
            self.connect_s = time.perf_counter() - started

    @property
    def is_connected(self) -> bool:
        return self._pg is not None and self._broken is None

    def destroy_group(self) -> None:
        """Abort the communicator (this side's pending operations fail) and drop the store (the peer's
        control wait fails); idempotent."""
        with self._lock:
            self._broken = self._broken or "destroyed"  # first: a control wait that starts later sees it
            pg, control = self._pg, self._control
            self._pg = self._control = None
        if control is not None:
            control.close()  # wakes our own control wait
        self._abort_once(pg)

    # -- point to point ---------------------------------------------------------------------------

    def send_tagged(self, tensor: torch.Tensor, dst_rank: int, tag: int, timeout_s: float | None = None) -> None:
        """Send `tensor`; returns once NCCL finished sending it. `tag` is ignored (NCCL is FIFO per pair)."""
        self._run(tensor, None, dst_rank, timeout_s, f"NCCL send of {nbytes(tensor)} bytes to rank {dst_rank}")

    def recv_tagged(self, tensor: torch.Tensor, src_rank: int, tag: int, timeout_s: float | None = None) -> None:
        """Receive into `tensor`; returns once the bytes are in it. `timeout_s=None` waits until the group
        fails or is destroyed."""
        self._run(None, tensor, src_rank, timeout_s, f"NCCL receive of {nbytes(tensor)} bytes from rank {src_rank}")

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor, peer_rank: int, timeout_s: float | None = None) -> None:
        """Send `send` to and receive `recv` from `peer_rank` in one grouped call (to itself in a one-rank
        group)."""
        self._run(send, recv, peer_rank, timeout_s, f"NCCL exchange of {nbytes(send)} bytes with rank {peer_rank}")

    def send(self, tensors, send_options) -> None:
        self.send_tagged(tensors[0], send_options.dst_rank, 0)

    def recv(self, tensors, recv_options) -> None:
        self.recv_tagged(tensors[0], recv_options.src_rank, 0)

    def _run(self, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int, timeout_s: float | None,
             what: str) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for tensor in (send, recv):
            if tensor is not None and not tensor.is_contiguous():
                raise ValueError(f"{what}: tensor must be contiguous")
        pg = self._usable(self._pg)
        try:
            with self._issue_lock:
                work = nccl_ops.issue(pg, self.device, send, recv, peer)
        except Exception as exc:  # NCCL refused it at enqueue (e.g. invalid usage): the group is done
            self._break(f"{what} refused: {exc}")
            raise NcclPairError(f"{what} refused by NCCL: {exc}") from exc
        nccl_ops.wait_for(work, deadline, what, self.group_name, lambda: self._broken, self._break)

    # -- control messages (headers), through the pair's store --------------------------------------

    def send_control(self, data: bytes, dst_rank: int) -> None:
        """Queue a small message for `dst_rank` (FIFO); returns at once."""
        self._usable(self._control).send(data, dst_rank)

    def recv_control(self, src_rank: int, timeout_s: float | None = None) -> bytes:
        """The next control message for this rank. Waits on the CPU, posting nothing on the GPU;
        `timeout_s=None` waits until one comes, the group is destroyed, or the store goes away."""
        return self._usable(self._control).recv(timeout_s)

    def wait_peer_gone(self) -> None:
        """Block until the peer's process or group is gone (the group breaks), or this side destroys the
        group; raises `NcclPairError` either way. Watched from rank 0 only (rank 1 sees rank 0 go through
        its control wait): elsewhere this waits for destroy."""
        self._usable(self._control).wait_peer_gone()

    # -- failure ----------------------------------------------------------------------------------

    def _break(self, reason: str) -> None:
        """Mark the group broken and abort its communicator (pending operations on this side fail)."""
        if self._broken is None:
            self._broken = reason
            logger.warning("pair group %s broken: %s", self.group_name, reason)
        self._abort_once(self._pg)

    def _abort_once(self, pg: Any) -> None:
        with self._abort_lock:
            if pg is None or self._aborted:
                return
            self._aborted = True
        nccl_ops.abort(pg)

    def _usable(self, part: _T | None) -> _T:
        """`part` (the process group or the control channel) while the group is connected and unbroken."""
        if part is None or self._broken is not None:
            raise NcclPairError(f"pair group {self.group_name} is unusable ({self._broken or 'not connected'})")
        return part


_GROUP_CLASS: type | None = None


def _ray_group_class() -> type:
    """`PairNccl` as a `ray.util.collective` `BaseGroup` (imports Ray)."""
    global _GROUP_CLASS
    if _GROUP_CLASS is None:
        from ray.util.collective.collective_group.base_collective_group import BaseGroup

        class PairNcclGroup(PairNccl, BaseGroup):
            """`PairNccl` registered with `ray.util.collective` as `PDSERVE_NCCL`."""

            def __init__(self, world_size: int, rank: int, group_name: str):
                PairNccl.__init__(self, world_size, rank, group_name)

        _GROUP_CLASS = PairNcclGroup
    return _GROUP_CLASS


def __getattr__(name: str) -> Any:
    if name == "PairNcclGroup":
        return _ray_group_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the backend in this process (every process that joins a pair group must)."""
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    if not _global_registry.is_registered(BACKEND_NAME):
        register_collective_backend(BACKEND_NAME, _ray_group_class())


__all__ = ["BACKEND_NAME", "NcclPairError", "PairNccl", "nccl_available", "register"]
