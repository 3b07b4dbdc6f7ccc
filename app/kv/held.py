"""Prefill: a saved prompt's blocks stay allocated after its request finished until its KV has left them.

vLLM's delayed free: a connector whose `request_finished` returns True keeps the request's blocks allocated (vLLM
neither frees nor reuses them) until its `get_finished` reports the request id in `finished_sending`. pdserve's
prefill engine uses it so that the copy out of the engine's cache runs on the pair's sender thread, when the send's
turn comes, not inside the engine step; on one node decode copies the held blocks themselves (one copy,
app/kv/kv_share.py).

Life cycle of one hold (keyed by vLLM's request id):
1. `hold` (worker half, engine thread, in the step whose forward completed the prompt): the blocks are to stay; a
   lease starts (`lease_s`).
2. `finish` (scheduler half, engine thread, from `request_finished` in the same step): True, so vLLM keeps them.
3. `claim` (the reader, any thread) before reading them: False once the lease ended (the blocks may be reused: the
   reader must not touch them). A claimed hold never expires.
4. `release` (the reader, any thread; idempotent) when it is done with them, or will never read them (send dropped,
   failed, cancelled). It wakes the engine driver: a running step reports it, an idle driver frees it itself.
5. `take_finished` (worker half's `get_finished`, engine thread): each finished hold that was released, or whose lease
   ended unclaimed, until vLLM confirms it freed them (`confirm`, from the scheduler half's `update_connector_output`,
   called as vLLM frees them): a step that fails between the report and the free loses the report, and the next step
   repeats it. vLLM asserts on an id it was not told to hold or one given twice; confirmed ids are never given again.
A hold whose `finish` never comes (the request did not end in the step that saved it) is reported once it does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.kv.payload import gather_blocks, payload_shape


@dataclass
class _Hold:
    deadline: float  # monotonic: the lease ends here unless the reader claimed the blocks
    finished: bool = False  # vLLM was told to keep the blocks (request_finished returned True)
    claimed: bool = False
    released: bool = False
    expired: bool = False  # the lease ended unclaimed: reported, and no reader may claim it any more


class HeldBlocks:
    def __init__(self, lease_s: float = 30.0, wake: Callable[[], None] | None = None):
        self.lease_s = lease_s
        self.wake = wake or (lambda: None)  # the engine driver's: a release needs a step to be reported
        self._holds: dict[str, _Hold] = {}
        self._lock = threading.Lock()
        self.num_held = 0
        self.num_expired = 0  # leases that ended before the reader came: its transfer failed

    def hold(self, request_id: str) -> None:
        with self._lock:
            self._holds[request_id] = _Hold(time.monotonic() + self.lease_s)
            self.num_held += 1

    def finish(self, request_id: str) -> bool:
        """Whether vLLM must keep the request's blocks (it finished with a hold on them)."""
        with self._lock:
            if (held := self._holds.get(request_id)) is None:
                return False
            held.finished = True
            return True

    def claim(self, request_id: str) -> bool:
        """Whether the blocks are still the prompt's (the lease has not ended); a claimed hold never expires."""
        with self._lock:
            held = self._holds.get(request_id)
            if held is None or held.expired or held.released or (not held.claimed and time.monotonic() > held.deadline):
                return False
            held.claimed = True
            return True

    def lapse(self, request_id: str, after_s: float) -> None:
        """A claimed hold whose reader can no longer say when it is done (decode, once the pair broke): its lease
        ends `after_s` from now, as an unclaimed one's."""
        with self._lock:
            if (held := self._holds.get(request_id)) is not None and not held.released:
                held.claimed, held.deadline = False, time.monotonic() + after_s

    def release(self, request_id: str) -> None:
        with self._lock:
            if (held := self._holds.get(request_id)) is None or held.released:
                return
            held.released = True
        self.wake()

    def take_finished(self) -> set[str]:
        """Engine thread: the holds vLLM may free now (again, until it `confirm`s them)."""
        now, done = time.monotonic(), set()
        with self._lock:
            for request_id, held in self._holds.items():
                if not held.finished:
                    continue
                if not (held.released or held.expired or held.claimed) and now > held.deadline:
                    held.expired = True
                    self.num_expired += 1
                if held.released or held.expired:
                    done.add(request_id)
        return done

    def confirm(self, request_ids: set[str]) -> None:
        """vLLM freed these holds' blocks: forget them."""
        with self._lock:
            for request_id in request_ids:
                self._holds.pop(request_id, None)

    def next_deadline(self) -> float | None:
        """The earliest lease end among finished holds nobody claimed (monotonic), for the driver's wait; None: none."""
        with self._lock:
            pending = [h.deadline for h in self._holds.values()
                       if h.finished and not (h.claimed or h.released or h.expired)]
        return min(pending) if pending else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)


class KVNotGathered(RuntimeError):
    """A saved prompt's KV could not be read out of the engine's blocks (its lease ended first, or the copy failed):
    nothing was sent, so the transfer fails and the pair stays."""


class SavedKV:
    """A saved prompt's KV on its way to the pair's sender: either gathered already (`SavedKV.gathered`: a GPU gathers
    in the engine step) or still in the engine's blocks under a hold (`SavedKV.held`), gathered once by whoever reads
    it first (the sender thread when the send's turn comes; the engine thread for KV that is parked or tampered with).
    Whoever ends up not reading it calls `drop` (idempotent; after a gather it does nothing)."""

    def __init__(self, shape: tuple[int, ...], gather: Callable[[], torch.Tensor] | None = None,
                 payload: torch.Tensor | None = None, release: Callable[[], None] | None = None,
                 block_ids: tuple[int, ...] = (), claim: Callable[[], bool] | None = None,
                 layers: list[torch.Tensor] | None = None):
        self.shape = shape  # [num_layers, num_blocks, *block_shape]
        self.block_ids = block_ids  # the engine's blocks it is read from (held), in payload order
        self.layers = layers or []  # the engine's KV cache layers they are in (held), each [num_total_blocks, ...]
        self._claim = claim
        self._lapse: Callable[[float], None] | None = None
        self._gather, self._payload, self._release = gather, payload, release
        self.gather_s = 0.0  # how long the gather took (0: gathered before, in the engine step)

    @classmethod
    def gathered(cls, payload: torch.Tensor) -> SavedKV:
        return cls(tuple(payload.shape), payload=payload)

    @classmethod
    def held(cls, held: HeldBlocks, request_id: str, layers: list[torch.Tensor], block_ids: tuple[int, ...],
             out: torch.Tensor | None) -> SavedKV:
        """`block_ids` of every layer (each `[num_total_blocks, *block_shape]`), held for `request_id`; gathered into
        `out` (`[num_layers, num_blocks, *block_shape]`, e.g. a shared-memory segment's view) or a new tensor."""

        def gather(into: torch.Tensor | None) -> torch.Tensor:
            if not held.claim(request_id):
                raise KVNotGathered(f"the KV blocks of {request_id} were freed before their send's turn "
                                     f"(held {held.lease_s:.0f} s)")
            try:
                with torch.inference_mode():  # read the engine's (inference) tensors as the engine does
                    return gather_blocks(layers, list(block_ids), out=into if into is not None else out)
            finally:
                held.release(request_id)

        kv = cls(payload_shape(layers, len(block_ids)), gather=gather, release=lambda: held.release(request_id),
                 block_ids=block_ids, claim=lambda: held.claim(request_id), layers=layers)
        kv._lapse = lambda after_s: held.lapse(request_id, after_s)
        return kv

    @property
    def in_blocks(self) -> bool:
        """Whether the KV is still only in the engine's held blocks (not gathered, not dropped)."""
        return self._payload is None and self._gather is not None

    def claim(self) -> bool:
        """For a reader of the blocks in place (decode, one copy): whether they are still the prompt's; if so they
        stay until `drop`."""
        if self._claim is None or not self.in_blocks:
            return False
        self._gather = None  # read in place: never gathered
        return self._claim()

    def gather(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """The payload (`[num_layers, num_blocks, *block_shape]`); reads the held blocks the first time (into `into`
        if given, e.g. a segment leased at the send's turn, else where `held` said)."""
        if self._payload is None:
            assert self._gather is not None
            started = time.perf_counter()
            self._payload, self._gather, self._release = self._gather(into), None, None
            self.gather_s = time.perf_counter() - started
        return self._payload

    def lapse(self, after_s: float) -> None:
        """Read in place by a reader that will not say when it is done (the pair broke): keep the blocks `after_s`
        more, then let the engine free them."""
        self._release, self._gather = None, None
        if self._lapse is not None:
            self._lapse(after_s)

    def drop(self) -> None:
        """Nobody will read the blocks: let the engine free them."""
        release, self._release, self._gather = self._release, None, None
        if release is not None:
            release()
