"""Engine clients the ingress uses, one per serving mode.

`CollocatedClient`: Serve picks a `Collocated` replica; its stream is the answer.

`DisaggregatedRouter`, one request:
1. Choose the decode replica, then the prefill replica (Serve's router, `choose_replica`; replicas and
   pairs whose circuit breaker is open are avoided), so both ends of the transfer are known before it
   starts; each replica publishes its pair id through `record_replica_metadata`. With
   `autoscaling.prefill.when_no_replica: decode_locally`, if no prefill replica is free within
   `no_replica_wait_s` (scaled to zero, or all busy), decode runs the prompt itself (reported as a
   fallback) and one wake-up call waits on the prefill deployment so Serve starts a replica.
2. Dispatch both at once: prefill runs the prompt and sends its KV to that decode replica, while the
   decode replica pairs up, waits for the KV in the background and then streams tokens.
3. Stream decode's chunks while watching prefill: a failed prefill is retried once on another prefill
   replica (same transfer id), else decode is told at once and recomputes (or answers 503). A
   consumer that leaves early cancels both calls.

Two-step API: `prefill_only` runs the prompt on a prefill replica that parks its KV and answers with a
`kv_cache_id`; `decode_only` claims that entry on the replica the id names (calls pinned with the
`replica_pin` keyword, which `PinnableRouter` honours), then streams from a decode replica exactly as
step 2-3 above, with the parked KV as the transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.handle import DeploymentHandle

from app.circuit import BREAKERS
from app.circuit import configure as configure_breakers
from app.kv.parking import kv_cache_not_found, replica_of
from app.messages import GenerateRequest, GenerationChunk, PrefillResult
from app.metrics import PhaseRatio
from app.protocol import short_error

logger = logging.getLogger(__name__)


class CollocatedClient:
    mode = "collocated"

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        first = True
        async for chunk in self.handle.generate.remote(request):
            if first:
                first = False
                chunk = chunk.with_metadata(prefix_cache_hit_tokens=chunk.num_cached_tokens)
            yield chunk


PIN_KWARG = "replica_pin"
AVOID_KWARG = "avoid"


class PinnableRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two router, plus: a call with `replica_pin=<replica id>` goes to that replica (or,
    if it is gone, to any replica, which then answers that it has nothing); `avoid=[ids]` (given to
    `choose_replica`) and open circuit breakers take replicas out of the choice unless none is left."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
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


def _accepts(kwargs: dict, replica_id: str, live: set[str]) -> bool:
    pin = kwargs.get(PIN_KWARG)
    if pin is not None:
        return pin == replica_id or pin not in live  # a gone pin: any replica answers "not here"
    avoid = set(kwargs.get(AVOID_KWARG) or ())
    return replica_id not in avoid or live <= avoid


def _pair_id(selection: Any) -> str:
    return selection.replica_metadata.get("pair_id") or selection.replica_id


class DisaggregatedRouter:
    mode = "disaggregated"

    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, config: Any = None):
        self.prefill = prefill
        self.decode = decode.options(stream=True)
        self.decode_calls = decode
        self.phase_ratio = PhaseRatio()
        scaling = getattr(getattr(config, "autoscaling", None), "prefill", None)
        self.when_no_prefill = scaling.when_no_replica if scaling is not None else "wait"
        self.no_prefill_wait_s = scaling.no_replica_wait_s if scaling is not None else 0.2
        self._wake_up: Any = None  # an outstanding call that makes Serve start a prefill replica
        fallback = getattr(config, "fallback", None)
        self.retry_other_prefill = fallback.retry_other_prefill if fallback is not None else True
        if fallback is not None:
            configure_breakers(fallback.breaker_failures, fallback.breaker_window_s, fallback.breaker_open_s)
        self.notify_timeout_s = config.kv_transfer.timeout_s if config is not None else 1.0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        xfer_id = secrets.token_hex(16)
        # 1. choose both ends (decode first: prefill replicas whose pair with it is failing are avoided)
        async with self.decode.generate.choose_replica(request) as d_sel, contextlib.AsyncExitStack() as stack:
            decode_id = _pair_id(d_sel)
            choosing = stack.enter_async_context(
                self.prefill.prefill.choose_replica(request, avoid=self._open_pairs(decode_id)))
            if self.when_no_prefill == "wait":
                p_sel = await choosing
            else:
                try:
                    p_sel = await asyncio.wait_for(choosing, self.no_prefill_wait_s)
                except TimeoutError:
                    # No prefill replica free (scaled to zero, or all busy): decode runs the prompt itself.
                    self._wake_prefill()
                    reason = f"no prefill replica free within {self.no_prefill_wait_s} s (decode_locally)"
                    stream = self.decode.dispatch(d_sel, request, None, xfer_id, reason)
                    finished = False
                    try:
                        async for chunk in stream:
                            yield chunk
                        finished = True
                    finally:
                        if not finished:  # the consumer left: stop generating
                            stream.cancel()
                    return
            prefill_id = _pair_id(p_sel)
            BREAKERS.allow(prefill_id)  # takes the probe slot if its breaker is half-open
            # 2. dispatch both
            prefill_call = self.prefill.dispatch(p_sel, request, decode_id, xfer_id)
            stream = self.decode.dispatch(d_sel, request, prefill_id, xfer_id)
            async for chunk in self._stream(request, stream, prefill_call, prefill_id, decode_id, xfer_id):
                yield chunk

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

    def _open_pairs(self, decode_id: str) -> list[str]:
        return [key.split("->")[0] for key in BREAKERS.snapshot() if key.endswith(f"->{decode_id}")
                and BREAKERS.is_open(key)]

    def breaker_states(self) -> dict[str, dict]:
        return BREAKERS.snapshot()

    async def prefill_only(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None):
        return await self.prefill.prefill_park.remote(request, tenant, tenant_parked_limit)

    async def claim(self, kv_cache_id: str, tenant: str) -> tuple[tuple[int, ...], str | None]:
        """Prompt ids and cache salt of a parked entry (404 OpenAIError if it is not there for this tenant)."""
        replica_id = replica_of(kv_cache_id)
        if replica_id is None:
            raise kv_cache_not_found()
        return await self.prefill.claim_parked.remote(kv_cache_id, tenant, replica_pin=replica_id)

    async def release(self, kv_cache_id: str) -> None:
        await self.prefill.release_parked.remote(kv_cache_id, replica_pin=replica_of(kv_cache_id))

    async def decode_only(self, request: GenerateRequest, kv_cache_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream `request` from a decode replica, its KV sent from the claimed parked entry."""
        prefill_id = replica_of(kv_cache_id)
        xfer_id = secrets.token_hex(16)
        async with self.decode.generate.choose_replica(request) as d_sel:
            decode_id = _pair_id(d_sel)
            prefill_call = self.prefill.send_parked.remote(kv_cache_id, decode_id, xfer_id, replica_pin=prefill_id)
            stream = self.decode.dispatch(d_sel, request, prefill_id, xfer_id)
            async for chunk in self._stream(request, stream, prefill_call, prefill_id, decode_id, xfer_id,
                                            retry=False):
                yield chunk

    async def _stream(self, request: GenerateRequest, stream, prefill_call, prefill_id: str, decode_id: str,
                      xfer_id: str, retry: bool = True) -> AsyncIterator[GenerationChunk]:
        notes: dict[str, Any] = {}
        watch = asyncio.ensure_future(self._watch_prefill(prefill_call, request, prefill_id, decode_id, xfer_id,
                                                          notes, retry and self.retry_other_prefill))
        finished, first, first_at = False, True, 0.0
        try:
            # 3. stream decode's tokens
            async for chunk in stream:
                if first:
                    first, first_at = False, time.perf_counter()
                    if not watch.done():  # a retried prefill reports just after its KV reached decode
                        await asyncio.wait([watch], timeout=self.notify_timeout_s)
                    if notes:
                        chunk = chunk.with_metadata(**notes)
                yield chunk
            finished = True
        finally:
            if not finished:
                stream.cancel()
                prefill_call.cancel()
            result = await asyncio.shield(watch)
        if result is not None and finished:
            self.phase_ratio.add(result.prefill_s + result.send_s, time.perf_counter() - first_at)
        if result is not None:  # prefill's own prefix-cache hits, for usage.prompt_tokens_details
            yield GenerationChunk("", (), None, len(request.prompt_token_ids),
                                  metadata={"prefix_cache_hit_tokens": result.num_cached_tokens})

    async def _watch_prefill(self, call, request: GenerateRequest, prefill_id: str, decode_id: str, xfer_id: str,
                             notes: dict[str, Any], retry: bool) -> PrefillResult | None:
        """Prefill's report. If prefill failed: count it against its breakers, retry once on another
        prefill replica (same transfer id, so decode just keeps waiting), and if that fails too, tell
        decode at once so it falls back without sitting out the transfer deadline."""
        pair = f"{prefill_id}->{decode_id}"
        try:
            result = await call
        except asyncio.CancelledError:
            return None
        except Exception as exc:  # noqa: BLE001 - every prefill failure becomes a fallback with a reason
            BREAKERS.record_failure(prefill_id)
            BREAKERS.record_failure(pair)
            reason = f"prefill {prefill_id} failed: {short_error(exc)}"
            logger.warning("%s (transfer %s)", reason, xfer_id)
            if retry:
                try:
                    other, result = await self._retry_prefill(request, prefill_id, decode_id, xfer_id)
                except Exception as retry_exc:  # noqa: BLE001
                    reason += f"; retry on another prefill replica failed: {short_error(retry_exc)}"
                else:
                    notes.update(fallback="retried_other_prefill", fallback_reason=f"{reason}; retried on {other}")
                    return result
            try:
                await self.decode_calls.transfer_failed.remote(xfer_id, reason, replica_pin=decode_id)
            except Exception:  # noqa: BLE001 - decode gone too: its own deadline or death handles it
                logger.exception("could not tell decode %s about the failed transfer", decode_id)
            return None
        BREAKERS.record_success(prefill_id)
        BREAKERS.record_success(pair)
        return result

    async def _retry_prefill(self, request: GenerateRequest, failed_id: str, decode_id: str, xfer_id: str
                             ) -> tuple[str, PrefillResult]:
        avoid = [failed_id, *self._open_pairs(decode_id)]
        async with self.prefill.prefill.choose_replica(request, avoid=avoid) as p_sel:
            other = _pair_id(p_sel)
            if other == failed_id:
                raise RuntimeError("no other prefill replica is available")
            BREAKERS.allow(other)
            pairing = self.decode_calls.pair_with.remote(other, replica_pin=decode_id)
            call = self.prefill.dispatch(p_sel, request, decode_id, xfer_id)
            try:
                await pairing
                result = await call
            except Exception:
                BREAKERS.record_failure(other)
                raise
        BREAKERS.record_success(other)
        return other, result
