"""`PinnableRouter`: the Serve request-router plugin that the Prefill and Decode deployments use.

Serve's power-of-two router, plus two things the orchestrator needs:
- pinning: a call with `replica_pin=<replica id>` goes to exactly that replica (calls about one transfer
  or one parked KV cache must reach the replica that holds it);
- avoiding: `choose_replica(..., avoid=[ids])` and open circuit breakers (`app/circuit.py`) take replicas
  out of the choice, unless none would be left;
- preferring (prefix-aware routing): `choose_replica(..., prefer={id: cached prompt tokens}, load={id: requests},
  slack=n)` takes the replica holding the longest cached prefix among those with at most `n` requests more than
  the least busy one (`load`: the caller's own count; a replica it does not name has none).
It runs in the caller's process (the ingress), where the orchestrator records into the same breakers.

`pick_replica` is how the orchestrator chooses: Serve's `choose_replica` without its slot reservation (an RPC to
the chosen replica before the call can go: 4.8-5.8 ms of a lone request's time to first token on the 2-core
machine, traced stage by stage on 2026-11-29), then the call goes pinned to the choice and the replica admits it as
it admits any call (Serve's rejection protocol: a full replica makes it wait in the router, not fail). Without a
reservation Serve takes the first candidate the policy returns, so for a pick (`pick_only`) `choose_replicas`
leaves out the replicas this router knows are full (with none left, Serve's router backs off and asks again: the
pick waits, as a reservation would) and puts the rest in order of their queue length as this router last heard it
(sent, finished, rejected): power of two choices on cached lengths.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from app.errors import WrongReplica, causes, short_error
from app.messages import GenerateRequest, GenerationChunk

logger = logging.getLogger(__name__)

PIN_KWARG = "replica_pin"
AVOID_KWARG = "avoid"
PREFER_KWARG, LOAD_KWARG, SLACK_KWARG = "prefer", "load", "slack"
MAX_REPICKS = 2  # picks again after a pinned call found its replica gone (each time, the router knows one more)
PICK_KWARG = "pick_only"  # `pick_replica`'s choice: no reservation follows


class PinnableRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two router, plus: a call with `replica_pin=<replica id>` goes to that replica (or,
    if it is gone, to any replica, which then refuses it or answers that it has nothing); `avoid=[ids]` (given to
    `choose_replica`) and open circuit breakers take replicas out of the choice unless none is left."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if not kwargs.get(PICK_KWARG):
            return await self._choose(candidate_replicas, pending_request, kwargs)
        candidate_replicas = [r for r in candidate_replicas if self._has_room(r)]
        ranks = await self._choose(candidate_replicas, pending_request, kwargs) if candidate_replicas else []
        return [sorted(filter(self._has_room, rank), key=self._queue_len) for rank in ranks]

    def _queue_len(self, replica) -> int:
        """The replica's queue length as this router last heard it; unknown counts as 0."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _has_room(self, replica) -> bool:
        return self._queue_len(replica) < replica.max_ongoing_requests

    async def _choose(self, candidate_replicas, pending_request, kwargs: dict):
        pin = kwargs.get(PIN_KWARG)
        if pin is not None:
            matches = [r for r in candidate_replicas if r.replica_id.unique_id == pin]
            return [matches] if matches else [candidate_replicas]
        avoid = set(kwargs.get(AVOID_KWARG) or ())
        # Serve may hand this class over by value, with its own copy of this module's globals: look the
        # process's breakers up in sys.modules, where the ingress's router records into them.
        breakers = importlib.import_module("app.circuit").BREAKERS
        usable = [r for r in candidate_replicas
                  if r.replica_id.unique_id not in avoid and not breakers.is_open(r.replica_id.unique_id)]
        if (preferred := prefix_choice(usable or candidate_replicas, kwargs)) is not None:
            return [[preferred]]
        if len(usable) == len(candidate_replicas) or not usable:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # Power of two choices among the usable replicas (the parent class would draw from all of them).
        return [random.sample(usable, min(2, len(usable)))]

    def _fulfill_next_pending_request(self, replica, request_metadata=None) -> None:
        """Serve hands a chosen replica to the oldest pending request, which may not be the one it was
        chosen for; never give a pinned request another replica, nor an `avoid`ing one a replica it avoids."""
        replica_id = replica.replica_id.unique_id
        live = {r.replica_id.unique_id for r in self._replicas_list}
        for pending in self._pending_requests_to_fulfill:
            if not pending.future.done() and _accepts(pending.kwargs, replica_id, live):
                self._pending_requests_to_fulfill.remove(pending)
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return


async def pick_replica(method: Any, *args: Any, **kwargs: Any) -> Any:
    """The replica Serve's router chooses for `method(*args, **kwargs)` (a `ReplicaSelection`: its `replica_id`,
    `replica_metadata`), without reserving a slot on it; send the call with `replica_pin=selection.replica_id`."""
    async with method.choose_replica(*args, _reserve=False, **{PICK_KWARG: True}, **kwargs) as selection:
        return selection


def _accepts(kwargs: dict, replica_id: str, live: set[str]) -> bool:
    pin = kwargs.get(PIN_KWARG)
    if pin is not None:
        return pin == replica_id or pin not in live  # a gone pin: any replica answers "not here"
    avoid = set(kwargs.get(AVOID_KWARG) or ())
    return replica_id not in avoid or live <= avoid


def prefix_choice(candidates: list, kwargs: dict):
    """The candidate holding the longest cached prefix (`prefer`), among those within `slack` requests of the least
    busy (`load`); None when no candidate has the prefix or all that do are too busy."""
    prefer: dict[str, int] = kwargs.get(PREFER_KWARG) or {}
    if not prefer:
        return None
    load: dict[str, int] = kwargs.get(LOAD_KWARG) or {}
    by_id = {r.replica_id.unique_id: r for r in candidates}
    ceiling = min(load.get(replica_id, 0) for replica_id in by_id) + kwargs.get(SLACK_KWARG, 0)
    eligible = [i for i in prefer if i in by_id and load.get(i, 0) <= ceiling]
    if not eligible:
        return None
    return by_id[max(eligible, key=lambda i: (prefer[i], -load.get(i, 0)))]


async def picked_again(attempt, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
    """`attempt(request)`'s chunks; run again while it fails, before any chunk, because the replica picked for it had
    gone (`WrongReplica`), up to `MAX_REPICKS` times."""
    for repick in range(MAX_REPICKS + 1):
        produced = False
        try:
            async for chunk in attempt(request):
                produced = True
                yield chunk
            return
        except Exception as exc:
            if produced or repick == MAX_REPICKS or not any(isinstance(e, WrongReplica) for e in causes(exc)):
                raise
            logger.info("request %s picked again: %s", request.request_id, short_error(exc))
