"""The prefill replica's half of the two-step API (`disagg_mode`), a base of `Prefill`.

Life cycle of one parked prompt: `prefill_park` runs the prompt (one token, the request's sampling) and parks its
gathered KV in the replica's `ParkingLot` under a lease, answering with a `kv_cache_id`; `claim_parked` hands it
to one decode_only request of the same tenant (`release_parked` gives it back if that request is refused), and
`send_parked` ships it to the decode replica that request went to. A sweeper thread ends leases. Calls for one
parked entry are pinned to this replica by `PinnableRouter` (the id names the replica). Errors leave as domain
errors (`ParkingFull`, `KVCacheNotFound`); the ingress maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import replace

from app.batching import BatchWindow
from app.config import KVTransferConfig, TwoStepConfig
from app.engine import EngineDriver
from app.kv.channel import SendResult
from app.kv.header import xfer_key
from app.kv.hub import transfer_params
from app.kv.outbox import KVOutbox, settle
from app.kv.pairs import PairTransport
from app.kv.parking import ParkedKV, ParkingLot, new_kv_cache_id
from app.messages import GenerateRequest, ParkedPrompt, ParkResult, PrefillResult
from app.metrics import observe_transfer
from app.serving.first_token import prefill_sampling


class ParkingReplica:
    """What `Prefill` adds for the two-step API; it sets the attributes below in its constructor."""

    kv: KVTransferConfig
    two_step: TwoStepConfig
    engine: EngineDriver
    window: BatchWindow
    transport: PairTransport
    outbox: KVOutbox
    parking: ParkingLot
    replica_id: str
    _stopped: threading.Event | None

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
                f"{request.request_id}-park", list(request.prompt_token_ids), prefill_sampling(request.sampling),
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
