"""`Prefill`: runs prompts and ships their KV blocks to the decode replica the ingress chose.

Life cycle of `prefill(request, decode_id, xfer_id)`:
1. Join the pair group with `decode_id` if this replica is not in it yet (off the event loop).
2. Open the transfer in the `KVOutbox`, then run the prompt for one token with the transfer's
   `kv_transfer_params`. In the step that completes the prompt, the connector's worker half gathers its
   blocks and the outbox queues header + payload on the pair's sender thread (engine thread). The engine
   frees the blocks when the step ends; the payload copy is what travels.
3. Wait until the send completed (or failed / timed out: the pair is dropped, and the error goes back
   to the ingress, while decode's deadline turns into its fallback).

Two-step API (`disagg_mode`): `prefill_park` runs the prompt the same way but parks the gathered KV in
the replica's `ParkingLot` under a lease and returns a `kv_cache_id`; later `claim_parked` (and
`release_parked` if the decode request is refused) and `send_parked` ship it to a decode replica.
Calls for one parked entry are pinned to this replica by `PinnableRouter` (the id names the replica).
Errors leave as domain errors (`ParkingFull`, `KVCacheNotFound`); the ingress maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from dataclasses import replace

from ray import serve

from app.batching import BatchWindow
from app.config import FaultInjection
from app.engine import EngineDriver, EngineLoad
from app.kv.channel import SendResult
from app.kv.connector import kv_transfer_config
from app.kv.header import xfer_key
from app.kv.hub import reset_hub, transfer_params
from app.kv.outbox import KVOutbox, settle
from app.kv.pairs import PairTransport, resolve_backend
from app.kv.parking import ParkedKV, ParkingLot, new_kv_cache_id
from app.messages import GenerateRequest, ParkedPrompt, ParkResult, PrefillResult, SamplingSpec
from app.metrics import observe_transfer, set_parked
from app.specs import PrefillSpec
from deployments.engine_replica import EngineReplica

FAULTS_ENV = "PDSERVE_FAULT_INJECTION"


@serve.deployment
class Prefill(EngineReplica):
    role = "prefill"

    async def __init__(self, spec: PrefillSpec):
        self._init_replica(spec.engine, spec.warmup)
        self.kv, self.two_step, self.pair_timeout_s = spec.kv, spec.two_step, spec.kv.pair_timeout_s
        self.window = BatchWindow(spec.window_s, spec.window_max_requests)
        self.hub = reset_hub()
        self.driver = EngineDriver.from_spec(spec.engine, kv_transfer_config("kv_producer"))
        self.transport = PairTransport("prefill", self.replica_id, resolve_backend(spec.kv.backend, self.hub.device),
                                       spec.kv.timeout_s, self.hub.device,
                                       shm_max_bytes=spec.kv.shared_memory_mib << 20)
        faults = spec.kv.fault_injection
        if os.environ.get(FAULTS_ENV):  # drills without a config change: PDSERVE_FAULT_INJECTION='{"delay_s": 2}'
            faults = FaultInjection.model_validate_json(os.environ[FAULTS_ENV])
        self.outbox = KVOutbox(self.transport, faults)
        self.hub.on_saved, self.hub.payload_buffer = self.outbox.on_saved, self.outbox.payload_buffer
        self.parking = ParkingLot(spec.two_step.max_parked_per_replica, retry_after_s=spec.two_step.ttl_s,
                                  claim_timeout_s=spec.kv.timeout_s + spec.kv.prefill_timeout_s)
        threading.Thread(target=self._sweep, name="kv-parking-sweep", daemon=True).start()
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id}

    async def prefill(self, request: GenerateRequest, decode_id: str, xfer_id: str) -> PrefillResult:
        # 1. pair
        await asyncio.to_thread(self.transport.ensure, decode_id)
        # 2. prompt -> KV gathered -> queued on the pair's sender
        outgoing = self.outbox.open(xfer_id, decode_id)
        num_cached = 0
        try:
            async with asyncio.timeout(self.kv.prefill_timeout_s):  # the phase deadline; leaving aborts it
                await self.window.admit(len(request.prompt_token_ids))
                async for chunk in self.engine.generate(
                    f"{request.request_id}-prefill", list(request.prompt_token_ids),
                    SamplingSpec(max_tokens=1, temperature=0.0), cache_salt=request.cache_salt,
                    kv_transfer_params=transfer_params(xfer_id),
                ):
                    num_cached = chunk.num_cached_tokens
            # 3. wait for the send
            sent: SendResult = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
        except BaseException:
            outgoing.cancelled = True  # late is failed on both ends: a queued send never goes out
            raise
        finally:
            self.outbox.close(xfer_id)
        observe_transfer(self.transport.backend, sent.send_s, sent.num_bytes)
        return PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(request.prompt_token_ids),
                             num_bytes=sent.num_bytes, prefill_s=outgoing.gathered_at - outgoing.arrived_at,
                             send_s=sent.send_s, num_cached_tokens=num_cached)

    # -- two-step API -----------------------------------------------------------------------------

    async def prefill_park(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None
                           ) -> ParkResult:
        """Run the prompt (one token, the request's sampling) and park its KV; `ParkingFull` when full."""
        reservation = self.parking.reserve(tenant, tenant_parked_limit)
        xfer_id = secrets.token_hex(16)
        outgoing = self.outbox.open(xfer_id, None)
        text, token_ids, finish, cached = "", (), "length", 0
        parked = False
        try:
            await self.window.admit(len(request.prompt_token_ids))
            async for chunk in self.engine.generate(
                f"{request.request_id}-park", list(request.prompt_token_ids), replace(request.sampling, max_tokens=1),
                cache_salt=request.cache_salt, kv_transfer_params=transfer_params(xfer_id),
            ):
                text, token_ids = text + chunk.text, token_ids + chunk.token_ids
                finish, cached = chunk.finish_reason or finish, chunk.num_cached_tokens
            header, payload = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
            kv_cache_id = new_kv_cache_id(self.replica_id)
            expires_at = time.time() + self.two_step.ttl_s
            self.parking.park(ParkedKV(kv_cache_id, tenant, tuple(request.prompt_token_ids), request.cache_salt,
                                       header, payload, expires_at), reservation)
            parked = True
        finally:
            self.outbox.close(xfer_id)
            if not parked:
                self.parking.cancel(reservation)
        return ParkResult(kv_cache_id, expires_at, text, tuple(token_ids), finish, len(request.prompt_token_ids),
                          cached)

    async def claim_parked(self, kv_cache_id: str, tenant: str, replica_pin: str | None = None) -> ParkedPrompt:
        """Take a parked entry for a decode_only request; `KVCacheNotFound` unless it is here for `tenant`."""
        entry = self.parking.claim(kv_cache_id, tenant)
        return ParkedPrompt(entry.prompt_token_ids, entry.cache_salt)

    async def release_parked(self, kv_cache_id: str, replica_pin: str | None = None) -> None:
        self.parking.release(kv_cache_id)

    async def send_parked(self, kv_cache_id: str, decode_id: str, xfer_id: str, replica_pin: str | None = None
                          ) -> PrefillResult:
        """Ship a claimed entry to `decode_id` under transfer id `xfer_id`."""
        entry = self.parking.take_claimed(kv_cache_id)
        await asyncio.to_thread(self.transport.ensure, decode_id)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        header = replace(entry.header, xfer_key=xfer_key(xfer_id))
        self.transport.send(decode_id, header, entry.payload,
                            lambda res, err: loop.call_soon_threadsafe(settle, done, res, err))
        sent: SendResult = await asyncio.wait_for(done, self.kv.timeout_s)
        observe_transfer(self.transport.backend, sent.send_s, sent.num_bytes)
        return PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(entry.prompt_token_ids),
                             num_bytes=sent.num_bytes, prefill_s=0.0, send_s=sent.send_s)

    async def parking_stats(self) -> dict:
        return {"num_parked": self.parking.count(), "parked_bytes": self.parking.num_bytes(),
                "num_expired": self.parking.num_expired}

    def _sweep(self) -> None:
        assert self._stopped is not None
        while not self._stopped.wait(0.5):
            self.parking.sweep()

    # -- load: metrics and the autoscaling signal --------------------------------------------------

    def load(self) -> tuple[EngineLoad, int, int]:
        num_held, tokens_held = self.window.num_waiting()
        return self.engine.load, num_held, tokens_held

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this periodically (num_replicas: auto); app/autoscaling.py:PrefillPolicy reads it."""
        load, _, tokens_held = self.load()
        return {"queued_prompt_tokens": float(load.num_queued_prompt_tokens + tokens_held),
                "oldest_wait_s": self.outbox.oldest_wait_s()}

    def _publish_extra(self) -> None:
        set_parked(self.parking.count(), self.parking.num_bytes())

    # -- operators and tests ------------------------------------------------------------------------

    async def set_fault_injection(self, faults: dict, replica_pin: str | None = None) -> str:
        """Operators' drill switch (and the tests'): replace the fault-injection settings at runtime. Returns this
        replica's id; a call pinned to another replica (one the caller's router did not know) is refused, so that a
        drill never lands on the wrong replica unnoticed."""
        if replica_pin is not None and replica_pin != self.replica_id:
            raise RuntimeError(f"set_fault_injection was meant for replica {replica_pin}, not {self.replica_id}")
        self.outbox.set_faults(FaultInjection.model_validate(faults))
        return self.replica_id

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_saved": counters.num_saved, "num_chunked_saved": counters.num_chunked_saved,
                "gather_s": counters.gather_s, "num_outgoing": len(self.outbox), "num_parked": self.parking.count(),
                "num_cancelled_sends": self.outbox.num_cancelled_sends, "replica_id": self.replica_id,
                **self.transport.stats()}
