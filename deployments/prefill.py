"""`Prefill`: runs prompts and ships their KV blocks to the decode replica the ingress chose.

Life cycle of `prefill(request, decode_id, xfer_id)`:
1. Join the pair group with `decode_id` if this replica is not in it yet (off the event loop).
2. Run the prompt for one token with `kv_transfer_params={"pdserve": {"xfer_id": ...}}`. In the step
   that completes the prompt, the connector's worker half gathers its blocks and calls `_on_saved`
   (engine thread), which queues header + payload on the pair's sender thread. The engine frees the
   blocks when the step ends; the payload copy is what travels.
3. Wait until the send completed (or failed / timed out: the pair is dropped, and the error goes back
   to the ingress, while decode's deadline turns into its fallback).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

import torch
from ray import serve

from app.config import EngineSpec, FaultInjection, KVTransferConfig
from app.engine import EngineDriver
from app.kv.channel import SendResult
from app.kv.header import KVHeader
from app.kv.hub import PARAMS_KEY, reset_hub
from app.kv.pairs import PairTransport, resolve_backend
from app.messages import GenerateRequest, PrefillResult, SamplingSpec
from deployments.engine_replica import EngineReplica

CONNECTOR = {"kv_connector": "PDConnector", "kv_connector_module_path": "app.kv.connector"}


@dataclass
class _Outgoing:
    decode_id: str
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    gathered_at: float = 0.0


@serve.deployment
class Prefill(EngineReplica):
    def __init__(self, spec: EngineSpec, kv: KVTransferConfig):
        self.spec, self.kv = spec, kv
        self.hub = reset_hub()
        self.hub.on_saved = self._on_saved
        self.driver = EngineDriver.from_spec(spec, {**CONNECTOR, "kv_role": "kv_producer"})
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        device = self.hub.kv_layers[0].device if self.hub.kv_layers else torch.device("cpu")
        self.transport = PairTransport("prefill", self.replica_id, resolve_backend(kv.backend, device), kv.timeout_s,
                                       device)
        self._outgoing: dict[str, _Outgoing] = {}
        self._faults = kv.fault_injection
        self._fault_rng = random.Random(self._faults.seed)

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id}

    async def prefill(self, request: GenerateRequest, decode_id: str, xfer_id: str) -> PrefillResult:
        # 1. pair
        await asyncio.to_thread(self.transport.ensure, decode_id)
        # 2. prompt -> KV gathered -> queued on the pair's sender
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(decode_id, loop, loop.create_future())
        self._outgoing[xfer_id] = outgoing
        started = time.perf_counter()
        first_token = None
        try:
            async for chunk in self.driver.generate(
                f"{request.request_id}-prefill", list(request.prompt_token_ids),
                SamplingSpec(max_tokens=1, temperature=0.0), cache_salt=request.cache_salt,
                kv_transfer_params={PARAMS_KEY: {"xfer_id": xfer_id}},
            ):
                first_token = chunk.token_ids[0] if chunk.token_ids else first_token
            # 3. wait for the send
            sent: SendResult = await asyncio.wait_for(outgoing.done, self.kv.timeout_s)
        finally:
            self._outgoing.pop(xfer_id, None)
        return PrefillResult(xfer_id=xfer_id, num_prompt_tokens=len(request.prompt_token_ids),
                             num_bytes=sent.num_bytes, prefill_s=outgoing.gathered_at - started, send_s=sent.send_s,
                             first_token_id=first_token)

    def _on_saved(self, xfer_id: str, header: KVHeader, payload: torch.Tensor) -> None:
        """Engine thread: the prompt's KV is gathered; hand it to the pair's sender."""
        outgoing = self._outgoing.get(xfer_id)
        if outgoing is None:
            return  # the caller gave up already
        outgoing.gathered_at = time.perf_counter()

        def done(result: SendResult | None, error: BaseException | None) -> None:
            outgoing.loop.call_soon_threadsafe(_settle, outgoing.done, result, error)

        faults = self._faults
        if faults.fail_fraction and self._fault_rng.random() < faults.fail_fraction:
            done(None, RuntimeError("injected transfer failure"))
            return
        if faults.corrupt_fraction and self._fault_rng.random() < faults.corrupt_fraction:
            payload.view(-1)[0] += 1.0  # after the checksum: decode's verification must catch it
        if faults.delay_s:
            threading.Timer(faults.delay_s, self.transport.send, (outgoing.decode_id, header, payload, done)).start()
            return
        self.transport.send(outgoing.decode_id, header, payload, done)

    async def set_fault_injection(self, faults: dict) -> None:
        """Operators' drill switch (and the tests'): replace the fault-injection settings at runtime."""
        self._faults = FaultInjection.model_validate(faults)
        self._fault_rng = random.Random(self._faults.seed)

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_saved": counters.num_saved, "gather_s": counters.gather_s, "pairs": self.transport.peers(),
                "num_pairs_formed": self.transport.num_pairs_formed,
                "num_pairs_dropped": self.transport.num_pairs_dropped}

    def shutdown(self) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()
        super().shutdown()


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
