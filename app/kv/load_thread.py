"""Decode on CPU: the KV loads the engine step hands off, copied on a thread of their own (vLLM's asynchronous loads).

Life cycle of one load (vLLM 0.32; docs/async_load_plan.md has the scheduler's side with line numbers):
1. Step N, scheduler: the connector's scheduler half told vLLM the KV is here and loads asynchronously; vLLM allocates
   the request's blocks (not prefix-cached yet) and parks it (WAITING_FOR_REMOTE_KVS: it costs no token budget).
2. Step N, worker half (`start_load_kv`, engine thread): the payload is claimed from the mailbox (`started`), then
   queued here (`put`); a claim that fails ends the load at once, failed.
3. This thread copies it into the allocated blocks (the worker half's `run`), which says how it `ended`; the engine
   driver is woken.
4. The next step's `get_transfer_results` hands vLLM what ended (`take`: each load once; the failed ones also as
   failed, and vLLM recomputes their prompt); vLLM caches the blocks of a load that succeeded and schedules the
   request. A request aborted meanwhile keeps its blocks until then, so the driver keeps stepping while any load is
   pending (`ConnectorCounters.num_loads_pending`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from app.kv.connector_meta import LoadSpec
from app.kv.hub import KVHub

logger = logging.getLogger(__name__)


class LoadThread:
    def __init__(self, hub: KVHub, run: Callable[..., None]):
        self.hub = hub
        self._run = run  # (load, header, payload, started): copies, then calls `ended` (the worker half's)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: set[str] = set()  # loads that ended (also the failed ones), not handed to vLLM yet
        self._failed: set[str] = set()
        # Started by the thread that builds the engine: it keeps that thread's cores, not the engine thread's pinned
        # ones, and torch's compute threads as the engine thread set them.
        threading.Thread(target=self._serve, name="pdserve-kv-load", daemon=True).start()

    def started(self) -> None:
        with self._lock:
            self.hub.counters.num_loads_pending += 1

    def put(self, load: LoadSpec, *args: Any) -> None:
        self._queue.put((load, *args))

    def ended(self, request_id: str, failed: bool) -> None:
        with self._lock:
            self._done.add(request_id)
            if failed:
                self._failed.add(request_id)

    def take(self) -> tuple[set[str], set[str]]:
        """The requests whose load ended since the last call (each once), and which of them failed."""
        with self._lock:
            done, failed, self._done, self._failed = self._done, self._failed, set(), set()
            self.hub.counters.num_loads_pending -= len(done)
        return done, failed

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._run(*item)
            except BaseException:  # noqa: BLE001 - whatever it is, the request must hear of it, or it waits forever
                logger.exception("KV load for %s failed", item[0].request_id)
                self.ended(item[0].request_id, failed=True)
            self.hub.held.wake()  # the engine driver's: the next step reports it
