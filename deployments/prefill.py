"""`Prefill`: runs prompts and ships their KV blocks to the decode replica the ingress chose.

Life cycle of `prefill(request, decode_id, xfer_id)`:
1. Join the pair group with `decode_id` if this replica is not in it yet (off the event loop).
2. Run the prompt for one token with `kv_transfer_params={"pdserve": {"xfer_id": ...}}`. In the step
   that completes the prompt, the connector's worker half gathers its blocks and calls `_on_saved`
   (engine thread), which queues header + payload on the pair's sender thread. The engine frees the
   blocks when the step ends; the payload copy is what travels.
3. Wait until the send completed (or failed / timed out: the pair is dropped, and the error goes back
   to the ingress, while decode's deadline turns into its fallback).

Two-step API (`disagg_mode`): `prefill_park` runs the prompt the same way but parks the gathered KV in
the replica's `ParkingLot` under a lease and returns a `kv_cache_id`; later `claim_parked` (and
`release_parked` if the decode request is refused) and `send_parked` ship it to a decode replica.
Calls for one parked entry are pinned to this replica by `PinnableRouter` (the id names the replica).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from ray import serve

from app.batching import BatchWindow
from app.config import EngineSpec, FaultInjection, KVTransferConfig, PrefillBatchingConfig, TwoStepConfig, WarmupConfig
from app.engine import EngineDriver, EngineLoad
from app.kv.channel import SendResult
from app.kv.header import KVHeader, xfer_key
from app.kv.hub import PARAMS_KEY, reset_hub
from app.kv.pairs import PairTransport, resolve_backend
from app.kv.parking import ParkedKV, ParkingFull, ParkingLot, kv_cache_not_found, new_kv_cache_id
from app.messages import GenerateRequest, PrefillResult, SamplingSpec
from app.metrics import observe_transfer, set_parked
from app.protocol import OpenAIError
from deployments.engine_replica import EngineReplica

FAULTS_ENV = "PDSERVE_FAULT_INJECTION"
CONNECTOR = {"kv_connector": "PDConnector", "kv_connector_module_path": "app.kv.connector"}


@dataclass
class _Outgoing:
    decode_id: str | None  # None: park the KV here instead of sending it
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # SendResult, or (header, payload) when parking
    arrived_at: float = field(default_factory=time.perf_counter)
    gathered_at: float = 0.0
    cancelled: bool = False  # the request gave up (deadline): the KV must not be sent late


@dataclass(frozen=True)
class ParkResult:
    kv_cache_id: str
    expires_at: float
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int


@serve.deployment
class Prefill(EngineReplica):
    role = "prefill"

    async def __init__(self, spec: EngineSpec, kv: KVTransferConfig, two_step: TwoStepConfig | None = None,
                       warmup: WarmupConfig | None = None, batching: PrefillBatchingConfig | None = None):
        self.spec, self.kv = spec, kv
        self.warmup_config, self.pair_timeout_s = warmup or WarmupConfig(), kv.pair_timeout_s
        batching = batching or PrefillBatchingConfig()
        self.window = BatchWindow(batching.window_ms / 1000, batching.window_max_requests)
        self.hub = reset_hub()
        self.hub.on_saved = self._on_saved
        self.driver = EngineDriver.from_spec(spec, {**CONNECTOR, "kv_role": "kv_producer"})
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        device = self.hub.kv_layers[0].device if self.hub.kv_layers else torch.device("cpu")
        self.transport = PairTransport("prefill", self.replica_id, resolve_backend(kv.backend, device), kv.timeout_s,
                                       device)
        self._outgoing: dict[str, _Outgoing] = {}
        self._faults = kv.fault_injection
        if os.environ.get(FAULTS_ENV):  # drills without a config change: PDSERVE_FAULT_INJECTION='{"delay_s": 2}'
            self._faults = FaultInjection.model_validate_json(os.environ[FAULTS_ENV])
        self._fault_rng = random.Random(self._faults.seed)
        self.two_step = two_step or TwoStepConfig()
        self.parking = ParkingLot(self.two_step.max_parked_per_replica)
        self._stopped = threading.Event()
        threading.Thread(target=self._sweep, name="kv-parking-sweep", daemon=True).start()
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id}

    async def prefill(self, request: GenerateRequest, decode_id: str, xfer_id: str) -> PrefillResult:
        # 1. pair
        await asyncio.to_thread(self.transport.ensure, decode_id)
        # 2. prompt -> KV gathered -> queued on the pair's sender
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(decode_id, loop, loop.create_future())
        self._outgoing[xfer_id] = outgoing
        started = outgoing.arrived_at
        first_token, num_cached = None, 0
        try:
            async with asyncio.timeout(self.kv.prefill_timeout_s):  # the phase deadline; leaving aborts it
                await self.window.admit(len(request.prompt_token_ids))
                async for chunk in self.driver.generate(
                    f"{request.request_id}-prefill", list(request.prompt_token_ids),
                    SamplingSpec(max_tokens=1, temperature=0.0), cache_salt=request.cache_salt,
                    kv_transfer_params={PARAMS_KEY: {"xfer_id": xfer_id}},
                ):
                    first_token = chunk.token_ids[0] if chunk.token_ids else first_token
                    num_cached = chunk.num_cached_tokens
            # 3. wait for the send
            sent: SendResult = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
        except BaseException:
            outgoing.cancelled = True  # late is failed on both ends: a queued send never goes out
            raise
        finally:
            self._outgoing.pop(xfer_id, None)
        observe_transfer(self.transport.backend, sent.send_s, sent.num_bytes)
        return PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(request.prompt_token_ids),
                             num_bytes=sent.num_bytes, prefill_s=outgoing.gathered_at - started, send_s=sent.send_s,
                             first_token_id=first_token, num_cached_tokens=num_cached)

    # -- two-step API -----------------------------------------------------------------------------

    async def prefill_park(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None
                           ) -> ParkResult:
        """Run the prompt (one token, the request's sampling) and park its KV; raises OpenAIError 429 when full."""
        try:
            self.parking.check_room(tenant, tenant_parked_limit)
        except ParkingFull as exc:
            raise OpenAIError(429, str(exc), type="rate_limit_error", code=exc.code,
                              headers={"Retry-After": str(int(self.two_step.ttl_s))}) from None
        xfer_id = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(None, loop, loop.create_future())
        self._outgoing[xfer_id] = outgoing
        text, token_ids, finish, cached = "", (), "length", 0
        sampling = replace(request.sampling, max_tokens=1)
        try:
            await self.window.admit(len(request.prompt_token_ids))
            async for chunk in self.driver.generate(
                f"{request.request_id}-park", list(request.prompt_token_ids), sampling,
                cache_salt=request.cache_salt, kv_transfer_params={PARAMS_KEY: {"xfer_id": xfer_id}},
            ):
                text, token_ids = text + chunk.text, token_ids + chunk.token_ids
                finish, cached = chunk.finish_reason or finish, chunk.num_cached_tokens
            header, payload = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
        finally:
            self._outgoing.pop(xfer_id, None)
        kv_cache_id = new_kv_cache_id(self.replica_id)
        expires_at = time.time() + self.two_step.ttl_s
        self.parking.park(ParkedKV(kv_cache_id, tenant, tuple(request.prompt_token_ids), request.cache_salt, header,
                                   payload, expires_at))
        return ParkResult(kv_cache_id, expires_at, text, tuple(token_ids), finish, len(request.prompt_token_ids),
                          cached)

    async def claim_parked(self, kv_cache_id: str, tenant: str, replica_pin: str | None = None
                           ) -> tuple[tuple[int, ...], str | None]:
        """Take a parked entry for a decode_only request: (prompt token ids, cache salt); 404 if not ours."""
        try:
            entry = self.parking.claim(kv_cache_id, tenant)
        except KeyError:
            raise kv_cache_not_found() from None
        return entry.prompt_token_ids, entry.cache_salt

    async def release_parked(self, kv_cache_id: str, replica_pin: str | None = None) -> None:
        self.parking.release(kv_cache_id)

    async def send_parked(self, kv_cache_id: str, decode_id: str, xfer_id: str, replica_pin: str | None = None
                          ) -> PrefillResult:
        """Ship a claimed entry to `decode_id` under transfer id `xfer_id`."""
        try:
            entry = self.parking.take_claimed(kv_cache_id)
        except KeyError:
            raise kv_cache_not_found() from None
        await asyncio.to_thread(self.transport.ensure, decode_id)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        header = replace(entry.header, xfer_key=xfer_key(xfer_id))
        self.transport.send(decode_id, header, entry.payload,
                            lambda res, err: loop.call_soon_threadsafe(_settle, done, res, err))
        sent: SendResult = await asyncio.wait_for(done, self.kv.timeout_s)
        observe_transfer(self.transport.backend, sent.send_s, sent.num_bytes)
        return PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(entry.prompt_token_ids),
                             num_bytes=sent.num_bytes, prefill_s=0.0, send_s=sent.send_s, first_token_id=None)

    async def parking_stats(self) -> dict:
        return {"num_parked": self.parking.count(), "parked_bytes": self.parking.num_bytes(),
                "num_expired": self.parking.num_expired}

    def _sweep(self) -> None:
        while not self._stopped.wait(0.5):
            self.parking.sweep()

    # -- load: metrics and the autoscaling signal --------------------------------------------------

    def load(self) -> tuple[EngineLoad, int, int]:
        num_held, tokens_held = self.window.num_waiting()
        return self.driver.load, num_held, tokens_held

    def oldest_wait_s(self) -> float:
        """Age of the oldest prompt still without its KV gathered (0 when none waits)."""
        waiting = [o.arrived_at for o in list(self._outgoing.values()) if not o.gathered_at]
        return time.perf_counter() - min(waiting) if waiting else 0.0

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this periodically (num_replicas: auto); app/autoscaling.py:PrefillPolicy reads it."""
        load, _, tokens_held = self.load()
        return {"queued_prompt_tokens": float(load.num_queued_prompt_tokens + tokens_held),
                "oldest_wait_s": self.oldest_wait_s()}

    def _publish_extra(self) -> None:
        set_parked(self.parking.count(), self.parking.num_bytes())

    # -- engine thread ----------------------------------------------------------------------------

    def _on_saved(self, xfer_id: str, header: KVHeader, payload: torch.Tensor) -> None:
        """Engine thread: the prompt's KV is gathered; hand it to the pair's sender (or park it)."""
        outgoing = self._outgoing.get(xfer_id)
        if outgoing is None:
            return  # the caller gave up already
        outgoing.gathered_at = time.perf_counter()
        if outgoing.decode_id is None:
            outgoing.loop.call_soon_threadsafe(_settle, outgoing.done, (header, payload), None)
            return

        def done(result: SendResult | None, error: BaseException | None) -> None:
            outgoing.loop.call_soon_threadsafe(_settle, outgoing.done, result, error)

        faults = self._faults
        if faults.fail_fraction and self._fault_rng.random() < faults.fail_fraction:
            done(None, RuntimeError("injected transfer failure"))
            return
        if faults.corrupt_fraction and self._fault_rng.random() < faults.corrupt_fraction:
            payload.view(-1)[0] += 1.0  # after the checksum: decode's verification must catch it
        def send() -> None:
            self.transport.send(outgoing.decode_id, header, payload, done, lambda: outgoing.cancelled)

        if faults.delay_s:
            threading.Timer(faults.delay_s, send).start()
            return
        send()

    async def set_fault_injection(self, faults: dict, replica_pin: str | None = None) -> None:
        """Operators' drill switch (and the tests'): replace the fault-injection settings at runtime."""
        self._faults = FaultInjection.model_validate(faults)
        self._fault_rng = random.Random(self._faults.seed)

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_saved": counters.num_saved, "gather_s": counters.gather_s,
                "num_outgoing": len(self._outgoing), "replica_id": self.replica_id, **self.transport.stats()}


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
