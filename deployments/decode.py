"""`Decode`: receives a request's KV from its prefill replica and generates, streaming tokens.

Life cycle of `generate(request, prefill_id, xfer_id)`:
1. Tell the mailbox to expect the transfer (deadline: prefill phase + transfer) and join the pair
   group with `prefill_id` if needed; the pair's receive loop drains transfers into the mailbox. Wait
   on the event loop until the KV arrived or failed: every running request keeps decoding meanwhile.
   A failure with `kv_transfer.on_failure: fail` ends here with a 503.
2. Add the request to the engine with `kv_transfer_params={"pdserve": {"xfer_id": ...}}`. The
   connector loads the KV into the blocks vLLM allocated and the request continues from the last
   prompt token. If the transfer failed, the prompt is recomputed here and the response says so
   (`pdserve.kv_source`, `pdserve.fallback_reason`). (Should a request reach the engine before its
   KV, the connector's "ask again later" keeps it waiting in the scheduler.)
3. Stream the chunks; the first carries the `pdserve` metadata. On exit the mailbox entry is dropped,
   whatever happened, so unclaimed KV never outlives its request.
A sweeper thread ends overdue expectations and unclaimed leases and wakes the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import torch
from ray import serve

from app.config import EngineSpec, KVTransferConfig, WarmupConfig
from app.engine import EngineDriver, EngineLoad
from app.kv.header import xfer_key
from app.kv.hub import PARAMS_KEY, reset_hub
from app.kv.mailbox import KVMailbox, XferState
from app.kv.pairs import PairTransport, resolve_backend
from app.messages import GenerateRequest, GenerationChunk
from app.metrics import record_fallback, record_recompute
from app.protocol import OpenAIError
from deployments.engine_replica import EngineReplica
from deployments.prefill import CONNECTOR

SWEEP_INTERVAL_S = 0.1


@serve.deployment
class Decode(EngineReplica):
    role = "decode"

    async def __init__(self, spec: EngineSpec, kv: KVTransferConfig, warmup: WarmupConfig | None = None):
        self.spec, self.kv = spec, kv
        self.warmup_config, self.pair_timeout_s = warmup or WarmupConfig(), kv.pair_timeout_s
        self.hub = reset_hub()
        self.mailbox = KVMailbox(kv.lease_s, on_change=self._wake)
        self.hub.mailbox = self.mailbox
        self.driver = EngineDriver.from_spec(
            spec, {**CONNECTOR, "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute"})
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        device = self.hub.kv_layers[0].device if self.hub.kv_layers else torch.device("cpu")
        self.transport = PairTransport("decode", self.replica_id, resolve_backend(kv.backend, device), kv.timeout_s,
                                       device, deliver=self.mailbox.deliver)
        self._stopped = threading.Event()
        threading.Thread(target=self._sweep, name="kv-mailbox-sweep", daemon=True).start()
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id}

    async def generate(self, request: GenerateRequest, prefill_id: str | None, xfer_id: str,
                       local_reason: str | None = None) -> AsyncIterator[GenerationChunk]:
        """Stream `request`; its KV comes from `prefill_id` (None: no prefill replica, run the prompt here)."""
        if prefill_id is None:
            async for chunk in self._generate_locally(request, local_reason or "no prefill replica"):
                yield chunk
            return
        key = xfer_key(xfer_id)
        # 1. expect the KV, pair with its sender, wait for it (off the engine: others keep decoding)
        self.mailbox.expect(key, self.kv.prefill_timeout_s + self.kv.timeout_s)
        try:
            await asyncio.to_thread(self.transport.ensure, prefill_id)
        except Exception as exc:  # noqa: BLE001 - pairing failed: this request falls back
            self.mailbox.fail(key, f"pairing with prefill failed: {exc}")
        state, error = await self.mailbox.wait_decided(key)
        if state == XferState.FAILED and self.kv.on_failure == "fail":
            self.mailbox.forget(key)
            self.hub.counters.num_fallbacks["failed_fast"] = self.hub.counters.num_fallbacks.get("failed_fast", 0) + 1
            record_fallback("failed_fast")
            raise OpenAIError(503, f"the prompt's KV did not arrive intact ({error}) and local recompute is off "
                              "(kv_transfer.on_failure: fail); retry the request", type="server_error",
                              code="kv_transfer_failed", headers={"Retry-After": "1"})
        # 2./3. generate; the connector loads the KV (or, if it failed, counts the recompute)
        first = True
        try:
            async for chunk in self.driver.generate(
                request.request_id, list(request.prompt_token_ids), request.sampling, cache_salt=request.cache_salt,
                kv_transfer_params={PARAMS_KEY: {"xfer_id": xfer_id}},
            ):
                if first:
                    first = False
                    chunk = chunk.with_metadata(**self._kv_metadata(xfer_id, prefill_id, chunk))
                yield chunk
        finally:
            self.mailbox.forget(key)
            self.hub.pop_source(xfer_id)

    async def set_on_failure(self, policy: str) -> None:
        """Operators' switch: `recompute` (fall back locally) or `fail` (503) when KV does not arrive intact."""
        self.kv = self.kv.model_copy(update={"on_failure": KVTransferConfig.model_validate(
            {"on_failure": policy}).on_failure})

    async def _generate_locally(self, request: GenerateRequest, reason: str) -> AsyncIterator[GenerationChunk]:
        """`prefill.when_no_replica: decode_locally`: the prompt runs here, reported as a fallback."""
        record_recompute(reason)
        first = True
        async for chunk in self.driver.generate(request.request_id, list(request.prompt_token_ids), request.sampling,
                                                cache_salt=request.cache_salt):
            if first:
                first = False
                chunk = chunk.with_metadata(
                    mode="disaggregated", prefill_replica=None, decode_replica=self.replica_id,
                    kv_source="recomputed", fallback="no_prefill_replica", fallback_reason=reason,
                    num_cached_tokens=chunk.num_cached_tokens)
            yield chunk

    async def transfer_failed(self, xfer_id: str, reason: str, replica_pin: str | None = None) -> None:
        """The router saw prefill fail: end the wait for this transfer now (fallback or 503)."""
        self.mailbox.fail(xfer_key(xfer_id), reason)

    def _kv_metadata(self, xfer_id: str, prefill_id: str, chunk: GenerationChunk) -> dict:
        source, reason = self.hub.pop_source(xfer_id)
        if source == "recomputed":
            record_recompute(reason)
        return {"mode": "disaggregated", "prefill_replica": prefill_id, "decode_replica": self.replica_id,
                "kv_source": source, "fallback_reason": reason,
                "num_cached_tokens": chunk.num_cached_tokens}

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_loaded": counters.num_loaded, "num_loaded_tokens": counters.num_loaded_tokens,
                "num_load_errors": counters.num_load_errors, "fallbacks": dict(counters.num_fallbacks),
                "mailbox_entries": len(self.mailbox), "mailbox_bytes": self.mailbox.num_held_bytes(),
                "replica_id": self.replica_id, **self.transport.stats()}

    # -- load: metrics and the autoscaling signal --------------------------------------------------

    def load(self) -> tuple[EngineLoad, int, int]:
        return self.driver.load, self.mailbox.num_expected(), 0

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this periodically (num_replicas: auto); app/autoscaling.py:DecodePolicy reads it.
        Requests still waiting for their KV are left out: they are prefill's backlog, and hold no blocks here."""
        load = self.driver.load
        return {"running_requests": float(load.num_running + load.num_waiting), "kv_usage": load.kv_usage}

    def _wake(self) -> None:
        driver = getattr(self, "driver", None)
        if driver is not None:
            driver.wake()

    def _sweep(self) -> None:
        while not self._stopped.wait(SWEEP_INTERVAL_S):
            if self.mailbox.sweep():  # a deadline passed: a request may now fall back
                self._wake()
