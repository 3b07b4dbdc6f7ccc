"""The pair groups one replica belongs to: created lazily, reused, dropped when broken.

A pair is (prefill replica, decode replica), joined in one `ray.util.collective` group named after
both replica ids (prefill is rank 0, decode rank 1). One replica can be in many pairs. Life cycle:
1. `ensure(peer_id)` (blocking; call it off the event loop) joins the group on first use: both ends
   are called by the ingress for the same request at about the same time, so both join together.
   Concurrent callers for the same peer wait for one join.
2. Prefill sends through the pair's `KVSender`; decode drains it with a `KVReceiver` into `deliver`.
3. Any failure (send timeout, peer gone, undecodable header) `drop`s the pair: threads stop, the
   group is destroyed, and the next `ensure` forms a new one. A replaced replica has a new id, so
   its pairs are new groups; the old ones break on first use and are dropped.

Same node (gloo, CPU KV): while the pair forms, prefill offers shared memory and decode says whether it can
map it (`app/kv/shm.py`); if it can, payloads are gathered into the pair's segments and only headers cross
the socket. `shm_max_bytes` 0 turns that off (the offer and answer are still exchanged, so both ends agree).

Backends: "gloo" is pdserve's `PDSERVE_GLOO` (CPU, tags, per-send timeout); "nccl" is pdserve's
`PDSERVE_NCCL` (GPU; headers through the pair's store, payloads over NCCL, FIFO per pair, every NCCL
operation waited for with the transfer deadline and aborted past it). Both join the same way and are
dropped the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from app.kv import gloo_group, nccl_group
from app.kv.channel import ChannelBroken, KVReceiver, KVSender, Received, SendResult
from app.kv.header import KVHeader
from app.kv.held import KVNotGathered, SavedKV
from app.kv.kv_share import SharedCache, share_kv_cache_over
from app.kv.loans import BlocksOnLoan
from app.kv.nccl_comm import NcclPairComm
from app.kv.shm import Segment, SegmentPool, share_memory
from app.kv.streamed import RecvBuffers

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]


def pair_group_name(prefill_id: str, decode_id: str) -> str:
    return f"pdkv-{prefill_id}-{decode_id}"


def resolve_backend(configured: str, device: torch.device) -> str:
    """`auto` -> nccl for CUDA KV caches, gloo otherwise."""
    if configured != "auto":
        return configured
    return "nccl" if device.type == "cuda" else "gloo"


class GlooPairComm:
    """Point-to-point over a `PairGlooGroup` (CPU tensors, tagged)."""

    device = torch.device("cpu")

    def __init__(self, group: gloo_group.PairGlooGroup, peer_rank: int):
        self.group = group
        self.peer_rank = peer_rank

    def send(self, tensor: torch.Tensor, tag: int, timeout_s: float | None) -> None:
        self.group.send_tagged(tensor, self.peer_rank, tag, timeout_s)

    def recv(self, tensor: torch.Tensor, tag: int) -> None:
        self.group.recv_tagged(tensor, self.peer_rank, tag)

    def isend(self, tensor: torch.Tensor, tag: int) -> gloo_group.Pending:  # a streamed payload's chunks
        return self.group.isend_tagged(tensor, self.peer_rank, tag)

    def irecv(self, tensor: torch.Tensor, tag: int) -> gloo_group.Pending:
        return self.group.irecv_tagged(tensor, self.peer_rank, tag)

    def close(self) -> None:
        self.group.destroy_group()


@dataclass
class _Pair:
    group_name: str
    comm: GlooPairComm | NcclPairComm
    sender: KVSender | None = None
    receiver: KVReceiver | None = None


class PairTransport:
    def __init__(self, role: Role, replica_id: str, backend: str, timeout_s: float, device: torch.device,
                 deliver: Callable[[Received], None] | None = None,
                 on_drop: Callable[[str, str], None] | None = None, shm_max_bytes: int = 0):
        if role == "decode" and deliver is None:
            raise ValueError("a decode transport needs `deliver` for received KV")
        self.role, self.replica_id, self.backend, self.timeout_s = role, replica_id, backend, timeout_s
        self.device, self._deliver = device, deliver
        self.shm_max_bytes = shm_max_bytes if backend == "gloo" and device.type == "cpu" else 0
        self.shared_cache: Callable[[], SharedCache | None] = lambda: None  # prefill: its KV cache, if shared
        self.loans = lambda: BlocksOnLoan()  # prefill: each pair's book of blocks lent to decode (one copy)
        self._on_drop = on_drop or (lambda peer, reason: None)
        self.recv_buffers = RecvBuffers() if backend == "gloo" else None  # decode: for payloads its pairs stream
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()
        self._join_locks: dict[str, threading.Lock] = {}
        self.num_pairs_formed, self.num_pairs_dropped = 0, 0
        self.num_pairs_formed_at_warmup = 0  # formed ahead of traffic (warm-up), not on a request's path
        self.pair_setup_s: list[float] = []  # how long each join took, newest last (at most 64)
        if (register := {"gloo": gloo_group.register, "nccl": nccl_group.register}.get(backend)) is None:
            raise ValueError(f"unknown KV transfer backend {backend!r} (gloo or nccl)")
        register()

    # -- life cycle -----------------------------------------------------------------------------

    def ensure(self, peer_id: str, timeout_s: float | None = None, warmup: bool = False) -> None:
        """Join the pair with `peer_id` unless in it (blocks up to `timeout_s`); `warmup`: ahead of traffic."""
        with self._lock:
            if peer_id in self._pairs:
                return
            join_lock = self._join_locks.setdefault(peer_id, threading.Lock())
        with join_lock:
            with self._lock:
                if peer_id in self._pairs:
                    return
            started = time.perf_counter()
            pair = self._join(peer_id, timeout_s or self.timeout_s)
            with self._lock:
                self._pairs[peer_id] = pair
                self.num_pairs_formed += 1
                self.num_pairs_formed_at_warmup += warmup
                self.pair_setup_s = [*self.pair_setup_s[-63:], time.perf_counter() - started]

    def _join(self, peer_id: str, timeout_s: float) -> _Pair:
        from ray.util import collective

        prefill_id, decode_id = (self.replica_id, peer_id) if self.role == "prefill" else (peer_id, self.replica_id)
        name = pair_group_name(prefill_id, decode_id)
        rank, peer_rank = (0, 1) if self.role == "prefill" else (1, 0)
        if collective.is_group_initialized(name):  # a broken earlier incarnation
            collective.destroy_collective_group(name)
        try:
            if self.backend == "gloo":
                collective.init_collective_group(2, rank, backend=gloo_group.BACKEND_NAME, group_name=name)
                group = collective.get_group_handle(name)
                group.connect(timeout_s)
                comm: GlooPairComm | NcclPairComm = GlooPairComm(group, peer_rank)
                pool, maps = share_memory(self.role, group, peer_rank, timeout_s, self.shm_max_bytes)
                one_copy, remote = share_kv_cache_over(group, peer_rank, timeout_s, pool is not None, maps is not None,
                                                       self.shared_cache())
            else:  # the communicator is created and warmed up here, not at the first transfer
                collective.init_collective_group(2, rank, backend=nccl_group.BACKEND_NAME, group_name=name)
                group = collective.get_group_handle(name)
                group.connect(timeout_s, device=self.device)
                comm = NcclPairComm(group, peer_rank, self.timeout_s)
                pool, maps, one_copy, remote = None, None, False, None
        except BaseException as exc:
            if collective.is_group_initialized(name):
                collective.destroy_collective_group(name)
            raise ChannelBroken(f"could not form pair {name}: {exc}") from exc
        pair = _Pair(name, comm)
        if self.role == "prefill":
            pair.sender = KVSender(comm, self.timeout_s, name=name, watch_peer=True,
                                   on_broken=lambda exc: self.drop(peer_id, f"peer connection lost: {exc}"), pool=pool,
                                   one_copy=one_copy, loans=self.loans(), stream=self.backend == "gloo")
        else:
            assert self._deliver is not None
            pair.receiver = KVReceiver(comm, self._deliver, lambda exc: self.drop(peer_id, f"receive failed: {exc}"),
                                       name=name, maps=maps, remote=remote, buffers=self.recv_buffers)
        logger.info("pair %s formed (%s, rank %d, shared memory %s, one copy %s)", name, self.backend, rank,
                    pool is not None or maps is not None, one_copy or remote is not None)
        return pair

    def drop(self, peer_id: str, reason: str) -> None:
        with self._lock:
            pair = self._pairs.pop(peer_id, None)
            if pair is None:
                return
            self.num_pairs_dropped += 1
        logger.warning("dropping pair %s: %s", pair.group_name, reason)
        if pair.sender is not None:
            pair.sender.close()
        if pair.receiver is not None:
            pair.receiver.close()
        pair.comm.close()
        try:
            from ray.util import collective

            if collective.is_group_initialized(pair.group_name):
                collective.destroy_collective_group(pair.group_name)
        except Exception:  # noqa: BLE001 - best effort: the group is unusable either way
            logger.exception("destroying %s failed", pair.group_name)
        self._on_drop(peer_id, reason)

    def close(self) -> None:
        for peer_id in self.peers():
            self.drop(peer_id, "replica shutting down")

    def stats(self) -> dict:
        """The pair groups and their history, for both phases' kv_stats."""
        with self._lock:
            return {"pairs": list(self._pairs), "num_pairs_formed": self.num_pairs_formed,
                    "num_pairs_formed_at_warmup": self.num_pairs_formed_at_warmup,
                    "pair_setup_s": list(self.pair_setup_s), "num_pairs_dropped": self.num_pairs_dropped,
                    **_shm_stats(list(self._pairs.values()))}

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._pairs)

    # -- prefill side -----------------------------------------------------------------------------

    def lease_segment(self, peer_id: str, num_bytes: int) -> Segment | None:
        """A shared-memory segment of the pair with `peer_id` to gather a payload into (None: not on this pair)."""
        pair = self._pairs.get(peer_id)
        if pair is not None and pair.sender is not None and pair.sender.one_copy:
            return None  # decode copies the held blocks themselves
        pool = _pool_of(pair)
        return pool.lease(num_bytes) if pool is not None else None

    def send(self, peer_id: str, header: KVHeader, payload: torch.Tensor | SavedKV,
             on_done: Callable[[SendResult | None, BaseException | None], None],
             is_cancelled: Callable[[], bool] = lambda: False, segment: Segment | None = None,
             tamper: Callable[[torch.Tensor], None] | None = None) -> None:
        """Queue one transfer to `peer_id` (see `KVSender.submit`); `on_done` runs on the sender thread."""
        with self._lock:
            pair = self._pairs.get(peer_id)
        if pair is None or pair.sender is None:
            if isinstance(payload, SavedKV):
                payload.drop()
            on_done(None, ChannelBroken(f"not paired with {peer_id}"))
            return

        def done(result: SendResult | None, error: BaseException | None) -> None:
            if error is not None and not is_cancelled() and not isinstance(error, KVNotGathered):
                # a cancelled transfer, or one whose KV could not be read, sent nothing: the pair is intact
                self.drop(peer_id, f"send failed: {error}")
            on_done(result, error)

        pair.sender.submit(header, payload, done, is_cancelled, segment, tamper)


def _pool_of(pair: _Pair | None) -> SegmentPool | None:
    return pair.sender.pool if pair is not None and pair.sender is not None else None


def _shm_stats(pairs: list[_Pair]) -> dict:
    pools = [pool for pair in pairs if (pool := _pool_of(pair)) is not None]
    num_maps = sum(pair.receiver is not None and pair.receiver.maps is not None for pair in pairs)
    num_one_copy = sum(bool(p.sender is not None and p.sender.one_copy or p.receiver is not None
                            and p.receiver.remote is not None) for p in pairs)
    loans = [p.sender.on_loan for p in pairs if p.sender is not None]
    return {"num_shm_pairs": len(pools) + num_maps, "num_one_copy_pairs": num_one_copy,
            "num_one_copy_payloads": sum(loan.num_lent for loan in loans),
            "num_blocks_on_loan": sum(loan.num_blocks() for loan in loans),
            "num_loans_full": sum(loan.num_full for loan in loans),
            "num_segment_payloads": sum(p.num_leased for p in pools),
            "num_streamed_payloads": sum(p.sender.num_streamed for p in pairs if p.sender is not None),
            "num_segment_pool_full": sum(p.num_full for p in pools), "segment_bytes": sum(p.num_bytes() for p in pools),
            "num_segments_busy": sum(p.num_busy() for p in pools)}
