"""What every engine replica (Collocated, Prefill, Decode) shares: warm-up, pairing, load reporting
(Prometheus gauges and Serve autoscaling stats), stats, health and shutdown.

Life cycle: the subclass constructor calls `_init_replica` (identity, config), builds its engine (and
transport), then awaits `_start()`:
warm-up (app/warmup.py) runs before the constructor returns, so Serve routes nothing to the replica
until its engine ran and its pair groups exist; then a publisher thread sets the load gauges every
`PUBLISH_INTERVAL_S`, and, with `warmup.interval_s`, a periodic warm-up runs while the replica idles.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.config import WarmupConfig
from app.engine import EngineDriver, EngineLoad
from app.engine_setup import freeze_gc_heap
from app.errors import WrongReplica
from app.kv.pairs import PairTransport
from app.metrics import set_engine_load
from app.request_inbox import RequestInbox
from app.specs import EngineSpec
from app.warmup import PEER_DEPLOYMENT, pair_with_peers, warm_engine

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 1.0


class EngineReplica:
    """Base of the engine deployments. A subclass constructor calls `_init_replica` first, builds its
    engine (and transport), then awaits `_start()`."""

    role: str  # "prefill" | "decode" | "collocated"
    spec: EngineSpec
    warmup_config: WarmupConfig
    pair_timeout_s: float = 10.0
    replica_id: str = ""
    # Set by the subclass constructor; None until then (shutdown may run on a half-built replica).
    driver: EngineDriver | None = None
    transport: PairTransport | None = None
    inbox: RequestInbox | None = None  # requests that start before their Serve call (app/request_inbox.py)
    _stopped: threading.Event | None = None

    def _init_replica(self, spec: EngineSpec, warmup: WarmupConfig) -> None:
        import ray
        from ray import serve

        context = serve.get_replica_context()
        self.spec, self.warmup_config = spec, warmup
        self.replica_id, self.app_name = context.replica_id.unique_id, context.app_name
        self.node_id = ray.get_runtime_context().get_node_id()  # the Ray node it runs on (stats)
        self._stopped = threading.Event()
        self.warmup_stats: dict[str, Any] = {"num_runs": 0, "num_requests": 0, "paired": []}

    @property
    def engine(self) -> EngineDriver:
        assert self.driver is not None, "the replica's engine is not built yet"
        return self.driver

    async def _start(self) -> None:
        """End of the constructor: warm up, then publish load; Serve marks the replica ready after this. Last, the
        heap built so far (model, engine, vLLM's modules) is frozen out of the garbage collector's reach, as vLLM's
        own server does after start-up: the collections that serving triggers then walk only what serving made."""
        if self.warmup_config.enabled:
            await self.warm_up()
            if self.warmup_config.interval_s:
                asyncio.get_running_loop().create_task(self._warm_periodically())
        threading.Thread(target=self._publish, name="pdserve-metrics", daemon=True).start()
        freeze_gc_heap()

    # -- the request inbox ---------------------------------------------------------------------------

    def inbox_metadata(self) -> dict[str, str]:
        return self.inbox.metadata() if self.inbox is not None else {}

    def _started(self, inbox_key: str | None, start: Callable[..., AsyncIterator[Any]], args: tuple,
                 kwargs: dict[str, Any]) -> AsyncIterator[Any]:  # the inbox's run, or `start(*args, **kwargs)` here
        if inbox_key is not None and self.inbox is not None:
            return self.inbox.attach(inbox_key, args, kwargs)
        return start(*args, **kwargs)

    # -- warm-up and pairing ------------------------------------------------------------------------

    async def warm_up(self) -> dict[str, Any]:
        """Synthetic requests through the engine, then pair groups with every running peer replica."""
        max_tokens = 1 if self.role == "prefill" else self.warmup_config.max_tokens
        done = await warm_engine(self.engine, self.warmup_config, self.spec.max_model_len, max_tokens,
                                 f"{self.replica_id or self.role}-{self.warmup_stats['num_runs']}")
        paired: list[str] = []
        if self.transport is not None:
            paired = await pair_with_peers(self.transport, self.replica_id, PEER_DEPLOYMENT[self.role], self.app_name,
                                           self.pair_timeout_s)
        self.warmup_stats = {"num_runs": self.warmup_stats["num_runs"] + 1,
                             "num_requests": self.warmup_stats["num_requests"] + done,
                             "paired": sorted({*self.warmup_stats["paired"], *paired})}
        return self.warmup_stats

    async def _warm_periodically(self) -> None:
        assert self.warmup_config.interval_s is not None and self._stopped is not None
        while not self._stopped.is_set():
            await asyncio.sleep(self.warmup_config.interval_s)
            if self.engine.num_unfinished() == 0:  # never compete with real traffic
                try:
                    await self.warm_up()
                except Exception:  # noqa: BLE001 - a failed warm-up must not stop the replica
                    logger.exception("periodic warm-up failed")

    async def pair_with(self, peer_id: str, replica_pin: str | None = None, warmup: bool = False) -> None:
        """Join the pair group with `peer_id` (a warming-up peer, or a retried prefill decode did not expect)."""
        self._check_pin("pair_with", replica_pin)
        if self.transport is None:
            raise RuntimeError(f"a {self.role} replica has no pair groups")
        timeout = self.pair_timeout_s if warmup else None
        await asyncio.to_thread(self.transport.ensure, peer_id, timeout, warmup)

    def _check_pin(self, method: str, replica_pin: str | None) -> None:
        """A call pinned to another replica (it is gone, so Serve's router sent it here) must not run here."""
        if replica_pin is not None and replica_pin != self.replica_id:
            raise WrongReplica(method, replica_pin, self.replica_id)

    # -- load ---------------------------------------------------------------------------------------

    def load(self) -> tuple[EngineLoad, int, int]:
        """(engine load, requests waiting outside the engine, their prompt tokens); subclasses add theirs."""
        return self.engine.load, 0, 0

    def _publish(self) -> None:
        assert self._stopped is not None
        while not self._stopped.wait(PUBLISH_INTERVAL_S):
            try:
                load, num_outside, tokens_outside = self.load()
                set_engine_load(self.role, load.num_waiting + num_outside, load.num_queued_prompt_tokens
                                + tokens_outside, load.num_running, load.kv_usage, load.step_s)
                self._publish_extra()
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.debug("publishing metrics failed", exc_info=True)

    def _publish_extra(self) -> None:
        pass

    async def stats(self) -> dict[str, Any]:
        driver = self.engine
        load = driver.load
        return {
            "num_free_blocks": driver.num_free_blocks(),
            "num_total_blocks": driver.num_total_blocks(),
            "num_unfinished": driver.num_unfinished(),
            # pdserve's own threads (engine, pairs, sweeps): the chaos soak checks that they do not pile up
            "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith(("kv-", "pdserve-"))),
            "replica_id": self.replica_id,
            "node_id": self.node_id,
            "load": {"num_running": load.num_running, "num_waiting": load.num_waiting,
                     "num_queued_prompt_tokens": load.num_queued_prompt_tokens, "kv_usage": load.kv_usage,
                     "step_s": load.step_s},
            "warmup": self.warmup_stats,
            "inbox": self.inbox.stats() if self.inbox is not None else {},
        }

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("engine driver thread died")

    def shutdown(self) -> None:
        """Stop background threads (`_stopped`), leave every pair group (`transport`), stop the engine."""
        if self._stopped is not None:
            self._stopped.set()
        if self.inbox is not None:
            self.inbox.close()
        if self.transport is not None:
            self.transport.close()
        if self.driver is not None:
            self.driver.shutdown()

    def __del__(self):
        self.shutdown()
