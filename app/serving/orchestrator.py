"""`DisaggregatedClient`: the prefill/decode orchestrator, an `EngineClient` for `mode: disaggregated`.

One request (`generate`):
0. Choose the decode replica (Serve's router, `pick_replica`: no slot is reserved, the calls go pinned; one that
   probably holds the longest cached prefix of the prompt is preferred unless it is much busier, `prefix_index.py`),
   then place the prompt (`placement.py`):
   a prompt with few tokens uncached there whose decode replica holds nothing else of this ingress, holds at
   least L of its tokens and no prefill replica more, or that arrives while prefill is backlogged (and one asking
   for prompt logprobs), prefills on that decode replica, reported as `kv_source: local` with the reason; the rest
   go on:
1. Choose the prefill replica (Serve's router, `pick_replica`; replicas and pairs whose circuit breaker is open
   are avoided, one that holds the prompt's prefix preferred), so both ends of the transfer are known before it
   starts; each replica publishes its pair id through `record_replica_metadata`. With
   `autoscaling.prefill.when_no_replica: decode_locally`, if no prefill replica is free within
   `no_replica_wait_s` (scaled to zero, or all busy), decode runs the prompt itself (reported as a
   fallback) and one wake-up call waits on the prefill deployment so Serve starts a replica.
2. Send both calls at once, each pinned to its replica, with a fresh transfer id: prefill runs the prompt and
   sends its KV to that decode replica, while the decode replica pairs up, waits for the KV and then streams
   tokens. Where the request allows it (`placement.first_token_from_prefill`, app/serving/first_token.py), prefill
   samples the first token and streams it at once, and decode continues after it.
3. `Handoff` streams decode's chunks while it watches prefill (retry, breakers, telling decode).
A pick is not a reservation: a replica that died just before may still be picked, and Serve's router learns of it
only when the pinned call is sent (it then sends the call to a live replica, which refuses it: `WrongReplica`).
Nothing ran anywhere, so the request is picked again, up to `MAX_REPICKS` times.

Two-step API: `prefill_only` runs the prompt on a prefill replica that parks its KV and answers with a
`kv_cache_id`; `decode_only` claims that entry on the replica the id names (calls pinned with the
`replica_pin` keyword, which `PinnableRouter` honours), then streams from a decode replica exactly as
steps 2-3, with the parked KV as the transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from typing import Literal

from ray.serve.handle import DeploymentHandle

from app.circuit import BREAKERS
from app.circuit import configure as configure_breakers
from app.errors import KVCacheNotFound
from app.kv.parking import replica_of
from app.messages import GenerateRequest, GenerationChunk, KVReport, ParkedPrompt, ParkResult
from app.metrics import PhaseRatio, record_placement
from app.serving.first_token import can_continue
from app.serving.handoff import Handoff, Transfer, open_pairs, pair_id
from app.serving.placement import DecodeBacklog, PrefillBacklog, place, uncached_tokens
from app.serving.prefix_index import PrefixRouting
from app.serving.replica_router import pick_replica, picked_again
from app.specs import OrchestratorSpec
from app.token_bus import TokenBus, pinned_start, streamed

logger = logging.getLogger(__name__)




class DisaggregatedClient:
    mode: Literal["disaggregated"] = "disaggregated"
    supports_two_step = True

    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, spec: OrchestratorSpec,
                 bus: TokenBus | None = None):
        self.prefill = prefill
        self.prefill_stream = prefill.options(stream=True)  # prefill_first: the first token, then the result
        self.decode = decode.options(stream=True)
        self.spec = spec
        self.bus = bus  # decode's tokens after the first (None: all through its Serve stream)
        self.phase_ratio = PhaseRatio()
        self.backlog = PrefillBacklog()  # prompt tokens dispatched to prefill replicas, not answered yet
        self.on_decode: Counter[str] = Counter()  # requests this ingress has on each decode replica (by pair id)
        self.decode_backlog = DecodeBacklog()  # prompt tokens placed on each decode replica, before their first token
        self.prefixes = PrefixRouting(spec.block_size, spec.prefix_routing_slack)
        self.handoff = Handoff(prefill, decode, spec.notify_timeout_s, self.phase_ratio, self.backlog)
        self._wake_up: asyncio.Future | None = None  # an outstanding call that makes Serve start a prefill replica
        configure_breakers(spec.breaker_failures, spec.breaker_window_s, spec.breaker_open_s)

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        return picked_again(self._generate, request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        xfer_id, prefixes = secrets.token_hex(16), self.prefixes
        decode_route, cached_decode = prefixes.route(prefixes.decode, request, self.on_decode)
        prefill_route, cached_prefill = prefixes.route(prefixes.prefill, request, self.backlog.by_replica)
        d_sel = await pick_replica(self.decode.generate, request, **decode_route)
        decode_id = pair_id(d_sel)
        # 0. placement: on the decode replica, or on a prefill replica with the KV moved over
        cached = cached_decode.get(decode_id, 0)
        placement = place(request, self.spec.placement, self.spec.limits, self.backlog.num_tokens,
                          self.on_decode[decode_id], cached, max(cached_prefill.values(), default=0),
                          self.decode_backlog.by_replica[decode_id])
        record_placement(placement.where, placement.reason)
        with self._on_decode(decode_id):
            prefixes.mark(prefixes.decode, decode_id, request)
            if placement.local:
                stream = self.decode_backlog.until_first_token(decode_id, uncached_tokens(
                    len(request.prompt_token_ids), cached), _cancel_on_exit(self._decode_call(
                        d_sel, request, None, xfer_id, placement.detail, placed_locally=True)))
            else:
                stream = self._remote(request, xfer_id, d_sel, decode_id, prefill_route, placement.detail)
            output_ids: list[int] = []
            async for chunk in stream:
                output_ids.extend(chunk.token_ids)
                yield chunk
            prefixes.mark(prefixes.decode, decode_id, request, output_ids[:-1])  # the reply too (last: no KV)

    @contextlib.contextmanager
    def _on_decode(self, decode_id: str):
        """Count a request on its decode replica for as long as it is there (placement reads the count)."""
        self.on_decode[decode_id] += 1
        try:
            yield
        finally:
            self.on_decode[decode_id] -= 1
            if not self.on_decode[decode_id]:
                del self.on_decode[decode_id]

    async def _remote(self, request: GenerateRequest, xfer_id: str, d_sel, decode_id: str, route: dict,
                      placement_reason: str) -> AsyncIterator[GenerationChunk]:
        # 1. choose the prefill end (replicas whose pair with the decode replica is failing are avoided; one that
        #    probably holds the prompt's prefix is preferred)
        early = self.spec.first_token_from_prefill and can_continue(request)  # app/serving/first_token.py
        prefill_method = self.prefill_stream.prefill_first if early else self.prefill.prefill
        choosing = pick_replica(prefill_method, request, avoid=open_pairs(decode_id), **route)
        p_sel = None
        with self.backlog.waiting(len(request.prompt_token_ids)):  # until sent (Handoff counts it then)
            if self.spec.when_no_prefill == "wait":
                p_sel = await choosing
            else:
                with contextlib.suppress(TimeoutError):
                    p_sel = await asyncio.wait_for(choosing, self.spec.no_prefill_wait_s)
        if p_sel is None:
            self._wake_prefill()
            reason = f"no prefill replica free within {self.spec.no_prefill_wait_s} s (decode_locally)"
            async for chunk in _cancel_on_exit(self._decode_call(d_sel, request, None, xfer_id, reason)):
                yield chunk
            return
        prefill_id = pair_id(p_sel)
        BREAKERS.allow(prefill_id)  # takes the probe slot if its breaker is half-open
        self.prefixes.mark(self.prefixes.prefill, prefill_id, request)
        # 2. send both
        # (the prompt goes ahead to the replica's request inbox; the call attaches to its run: app/request_inbox.py)
        prefill_call = pinned_start(prefill_method, self.bus, p_sel, (decode_id, xfer_id), {},
                                    ahead={"first_token": early})(request)
        stream = self._decode_call(d_sel, request, prefill_id, xfer_id, first_from_prefill=early)
        # 3. stream decode's tokens (after prefill's first one) while watching prefill
        transfer = Transfer(request, prefill_id, decode_id, xfer_id, first_from_prefill=early)
        first = True
        async for chunk in self.handoff.stream(transfer, stream, prefill_call, self.spec.retry_other_prefill):
            if first:
                first = False
                chunk = chunk.with_report(KVReport(placement_reason=placement_reason))
            yield chunk

    def _decode_call(self, d_sel, request: GenerateRequest, *args, **kwargs):
        """Decode's streaming call on the chosen replica, its tokens after the first on the bus (if on)."""
        return streamed(self.bus, request, pinned_start(self.decode.generate, self.bus, d_sel, args, kwargs))

    def _wake_prefill(self) -> None:
        """Leave one call waiting for a prefill replica: Serve counts it as queued and scales prefill up
        from zero (the cold-start path), while requests meanwhile decode locally."""
        if self._wake_up is None or self._wake_up.done():
            self._wake_up = asyncio.ensure_future(self._call_ready())

    async def _call_ready(self) -> None:
        try:
            await self.prefill.record_replica_metadata.remote()
        except Exception:  # noqa: BLE001 - only a nudge
            logger.debug("prefill wake-up call failed", exc_info=True)

    def breaker_states(self) -> dict[str, dict]:
        return BREAKERS.snapshot()

    def placement_state(self) -> dict[str, int]:
        backlog = self.backlog
        return {"prefill_backlog_tokens": backlog.num_tokens, "prefill_backlog_requests": backlog.num_requests,
                "decode_requests": sum(self.on_decode.values()),
                "decode_backlog_tokens": sum(self.decode_backlog.by_replica.values())}

    # -- two-step API -----------------------------------------------------------------------------

    async def prefill_only(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None
                           ) -> ParkResult:
        return await self.prefill.prefill_park.remote(request, tenant, tenant_parked_limit)

    async def claim(self, kv_cache_id: str, tenant: str) -> ParkedPrompt:
        replica_id = replica_of(kv_cache_id)
        if replica_id is None:
            raise KVCacheNotFound()
        return await self.prefill.claim_parked.remote(kv_cache_id, tenant, replica_pin=replica_id)

    async def release(self, kv_cache_id: str) -> None:
        await self.prefill.release_parked.remote(kv_cache_id, replica_pin=replica_of(kv_cache_id))

    async def decode_only(self, request: GenerateRequest, kv_cache_id: str) -> AsyncIterator[GenerationChunk]:
        prefill_id = replica_of(kv_cache_id)
        assert prefill_id is not None, "claim() checked the id"
        xfer_id = secrets.token_hex(16)
        d_sel = await pick_replica(self.decode.generate, request)
        decode_id = pair_id(d_sel)
        with self._on_decode(decode_id):
            prefill_call = self.prefill.send_parked.remote(kv_cache_id, decode_id, xfer_id, replica_pin=prefill_id)
            stream = self._decode_call(d_sel, request, prefill_id, xfer_id)
            transfer = Transfer(request, prefill_id, decode_id, xfer_id)
            async for chunk in self.handoff.stream(transfer, stream, prefill_call, retry=False):
                yield chunk


async def _cancel_on_exit(stream) -> AsyncIterator[GenerationChunk]:
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:
        if not finished:  # the consumer left: stop generating
            stream.cancel()
