"""`Prefill`: runs prompts and ships their KV blocks to the decode replica the ingress chose.

Life cycle of `prefill(request, decode_id, xfer_id)` (its run starts when the ingress's message reaches the replica's
request inbox, ahead of the Serve call, which attaches to it: app/request_inbox.py):
1. Join the pair group with `decode_id` if this replica is not in it yet (off the event loop).
2. Open the transfer in the `KVOutbox`, then run the prompt for one token with the transfer's
   `kv_transfer_params`. In the step that completes the prompt, the connector's worker half hands the prompt's
   KV to the outbox, which queues it on the pair's sender thread (engine thread). The engine keeps the prompt's
   blocks after the request ends until that thread has copied them out (app/kv/held.py; lease `kv_transfer.lease_s`);
   the copy is what travels.
3. Wait until the send completed (or failed / timed out: the pair is dropped, and the error goes back
   to the ingress, while decode's deadline turns into its fallback).
`prefill_first` (streaming) is the same with the first token sampled here, with the request's sampling: its chunk
is yielded as soon as the engine gives it, ahead of the result (app/serving/first_token.py).

Two-step API (`disagg_mode`): the methods of `ParkingReplica` (deployments/parked.py) park a prompt's gathered
KV under a lease and ship it to a decode replica later.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

from ray import serve

from app.batching import BatchWindow
from app.config import FaultInjection
from app.engine import EngineDriver, EngineLoad
from app.kv.channel import SendResult
from app.kv.connector import kv_transfer_config
from app.kv.header import NO_TOKEN
from app.kv.hub import reset_hub, transfer_params
from app.kv.loans import BlocksOnLoan
from app.kv.outbox import KVOutbox
from app.kv.pairs import PairTransport, resolve_backend
from app.kv.parking import ParkingLot
from app.messages import GenerateRequest, GenerationChunk, PrefillResult, SamplingSpec
from app.metrics import observe_transfer, set_parked
from app.request_inbox import RequestInbox
from app.serving.first_token import first_chunk, prefill_sampling
from app.specs import PrefillSpec
from deployments.engine_replica import EngineReplica
from deployments.parked import ParkingReplica

FAULTS_ENV = "PDSERVE_FAULT_INJECTION"


@serve.deployment
class Prefill(ParkingReplica, EngineReplica):
    role = "prefill"

    async def __init__(self, spec: PrefillSpec):
        self._init_replica(spec.engine, spec.warmup)
        self.kv, self.two_step, self.pair_timeout_s = spec.kv, spec.two_step, spec.kv.pair_timeout_s
        self.window = BatchWindow(spec.window_s, spec.window_max_requests)
        self.hub = reset_hub()
        self.hub.held.lease_s = spec.kv.lease_s  # held blocks wait this long for their send's turn
        self.hub.share_kv_cache = spec.kv.shared_memory_mib > 0 and spec.kv.one_copy  # decode may copy in place
        self.driver = EngineDriver.from_spec(spec.engine, kv_transfer_config("kv_producer"))
        self.transport = PairTransport("prefill", self.replica_id, resolve_backend(spec.kv.backend, self.hub.device),
                                       spec.kv.timeout_s, self.hub.device,
                                       shm_max_bytes=spec.kv.shared_memory_mib << 20)
        faults = spec.kv.fault_injection
        if os.environ.get(FAULTS_ENV):  # drills without a config change: PDSERVE_FAULT_INJECTION='{"delay_s": 2}'
            faults = FaultInjection.model_validate_json(os.environ[FAULTS_ENV])
        self.transport.shared_cache = lambda: self.hub.kv_cache_shared
        # one copy: at most half of the engine's blocks lent to one decode; lent blocks outlive a broken pair by
        # decode's lease (it keeps verified KV that long), and a margin
        self.transport.loans = lambda: BlocksOnLoan(self.driver.num_total_blocks() // 2, spec.kv.lease_s + 5.0)
        self.outbox = KVOutbox(self.transport, faults)
        self.hub.on_saved, self.hub.payload_buffer = self.outbox.on_saved, self.outbox.payload_buffer
        self.parking = ParkingLot(spec.two_step.max_parked_per_replica, retry_after_s=spec.two_step.ttl_s,
                                  claim_timeout_s=spec.kv.timeout_s + spec.kv.prefill_timeout_s)
        threading.Thread(target=self._sweep, name="kv-parking-sweep", daemon=True).start()
        self.inbox = RequestInbox(self._run).bind()  # prompts start here before their Serve call arrives
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id, **self.inbox_metadata()}

    async def prefill(self, request: GenerateRequest, decode_id: str, xfer_id: str, replica_pin: str | None = None,
                      inbox_key: str | None = None) -> PrefillResult:
        """Run the prompt and send its KV to `decode_id`; decode samples the first token. A call pinned to another
        replica is refused (decode expects the KV from the one the router chose). With `inbox_key`, the result of
        the run its inbox message started."""
        args, kwargs = (request, decode_id, xfer_id), {"replica_pin": replica_pin, "first_token": False}
        results = [item async for item in self._started(inbox_key, self._run, args, kwargs)]
        return results[-1]  # the only item: no first token without `first_token`

    async def prefill_first(self, request: GenerateRequest, decode_id: str, xfer_id: str,
                            replica_pin: str | None = None, inbox_key: str | None = None
                            ) -> AsyncIterator[GenerationChunk | PrefillResult]:
        """Streaming: as `prefill`, but the first token is sampled here with the request's sampling and its chunk
        yielded the moment the engine gives it, before the `PrefillResult` (app/serving/first_token.py)."""
        args, kwargs = (request, decode_id, xfer_id), {"replica_pin": replica_pin, "first_token": True}
        async for item in self._started(inbox_key, self._run, args, kwargs):
            yield item

    async def _run(self, request: GenerateRequest, decode_id: str, xfer_id: str, replica_pin: str | None = None,
                   first_token: bool = False) -> AsyncIterator[GenerationChunk | PrefillResult]:
        """The body of both methods, and what the inbox starts (`first_token`: which of the two it stands for)."""
        self._check_pin("prefill_first" if first_token else "prefill", replica_pin)
        async for item in self._prefill(request, decode_id, xfer_id, first_token):
            yield item

    async def _prefill(self, request: GenerateRequest, decode_id: str, xfer_id: str, first_token: bool
                       ) -> AsyncIterator[GenerationChunk | PrefillResult]:
        # 1. pair
        await asyncio.to_thread(self.transport.ensure, decode_id)
        # 2. prompt -> KV gathered -> queued on the pair's sender (the first token sampled, with `first_token`)
        outgoing = self.outbox.open(xfer_id, decode_id, hold=first_token)  # with it, the header carries the token
        sampling = prefill_sampling(request.sampling) if first_token else SamplingSpec(max_tokens=1, temperature=0.0)
        first: GenerationChunk | None = None
        try:
            async with asyncio.timeout(self.kv.prefill_timeout_s):  # the phase deadline; leaving aborts it
                await self.window.admit(len(request.prompt_token_ids))
                async for chunk in self.engine.generate(
                    f"{request.request_id}-prefill", list(request.prompt_token_ids), sampling,
                    cache_salt=request.cache_salt, kv_transfer_params=transfer_params(xfer_id),
                ):
                    first = chunk if first is None else first.joined(chunk)
            if first_token:
                if outgoing.done.done() and outgoing.done.exception() is not None:
                    raise outgoing.done.exception()  # failed already: the ingress may still retry elsewhere
                token_id = first.token_ids[0] if first is not None and first.token_ids else NO_TOKEN
                outgoing.release_first_token(token_id)  # the KV goes now, its header naming the token
                if token_id != NO_TOKEN and self.outbox.breaks_stream():  # drill: the replica "dies" right here
                    await asyncio.wait_for(asyncio.shield(outgoing.done), self.kv.timeout_s)
                    raise RuntimeError("injected: prefill's stream broke after its KV left, before its first token")
                if token_id != NO_TOKEN:
                    yield first_chunk(first, request.sampling)
            # 3. wait for the send
            sent: SendResult = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
        except BaseException:
            outgoing.cancelled = True  # late is failed on both ends: a queued send never goes out
            raise
        finally:
            self.outbox.close(xfer_id)
        observe_transfer(self.transport.backend, sent.send_s, sent.num_bytes)
        yield PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(request.prompt_token_ids),
                            num_bytes=sent.num_bytes, prefill_s=outgoing.gathered_at - outgoing.arrived_at,
                            send_s=sent.send_s, num_cached_tokens=first.num_cached_tokens if first else 0)

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
        self._check_pin("set_fault_injection", replica_pin)
        self.outbox.set_faults(FaultInjection.model_validate(faults))
        return self.replica_id

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_saved": counters.num_saved, "num_chunked_saved": counters.num_chunked_saved,
                "gather_s": counters.gather_s, "num_outgoing": len(self.outbox), "num_parked": self.parking.count(),
                "num_cancelled_sends": self.outbox.num_cancelled_sends, "replica_id": self.replica_id,
                "num_held": len(self.hub.held), "num_held_expired": self.hub.held.num_expired,
                "inbox": self.inbox.stats() if self.inbox is not None else {},
                **self.transport.stats()}
