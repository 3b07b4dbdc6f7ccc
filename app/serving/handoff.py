"""One request's prefill -> decode handoff, once both replicas were chosen and both calls dispatched.

`Handoff.stream` yields decode's chunks while it watches the prefill call:
1. Prefill succeeded: its breakers record a success; its report (prompt tokens prefill found in the
   tenant's prefix cache) joins the response's `KVReport`.
2. Prefill failed: the failure counts against the prefill replica's and the pair's circuit breakers;
   the prompt is retried once on another prefill replica (same transfer id: decode pairs with the new
   sender and keeps waiting), reported as `fallback: retried_other_prefill`. If that fails too, decode
   is told at once (`transfer_failed`), so it recomputes (or answers 503) without sitting out the
   transfer deadline.
3. The consumer left early: both calls are cancelled.
The report goes on the first chunk if prefill has answered by then (it is waited for up to the transfer
deadline), else on the last chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from app.circuit import BREAKERS
from app.errors import short_error
from app.messages import GenerateRequest, GenerationChunk, KVReport, PrefillResult
from app.metrics import PhaseRatio
from app.serving.placement import PrefillBacklog

logger = logging.getLogger(__name__)


def pair_id(selection: Any) -> str:
    """The id a chosen replica pairs under (published with `record_replica_metadata`)."""
    return selection.replica_metadata.get("pair_id") or selection.replica_id


def pair_key(prefill_id: str, decode_id: str) -> str:
    """The circuit-breaker key of a (prefill, decode) pair."""
    return f"{prefill_id}->{decode_id}"


def open_pairs(decode_id: str) -> list[str]:
    """Prefill replicas whose pair with `decode_id` has an open breaker."""
    suffix = pair_key("", decode_id)
    return [key.removesuffix(suffix) for key in BREAKERS.snapshot()
            if key.endswith(suffix) and BREAKERS.is_open(key)]


@dataclass(frozen=True)
class Transfer:
    """Who sends which KV to whom."""

    request: GenerateRequest
    prefill_id: str
    decode_id: str
    xfer_id: str


@dataclass(frozen=True)
class PrefillOutcome:
    result: PrefillResult | None  # None: prefill failed (decode was told) or was cancelled
    report: KVReport | None  # what the response says about it


class Handoff:
    def __init__(self, prefill: DeploymentHandle, decode_calls: DeploymentHandle, notify_timeout_s: float,
                 phase_ratio: PhaseRatio, backlog: PrefillBacklog):
        self.prefill = prefill
        self.decode_calls = decode_calls
        self.notify_timeout_s = notify_timeout_s
        self.phase_ratio = phase_ratio
        self.backlog = backlog

    async def stream(self, transfer: Transfer, stream: DeploymentResponseGenerator, prefill_call: DeploymentResponse,
                     retry: bool) -> AsyncIterator[GenerationChunk]:
        watch = asyncio.ensure_future(self._watch(transfer, prefill_call, retry))
        finished, reported, first_at = False, False, None
        try:
            async for chunk in stream:
                if first_at is None:
                    first_at = time.perf_counter()
                    if not watch.done():  # a retried prefill reports just after its KV reached decode
                        await asyncio.wait([watch], timeout=self.notify_timeout_s)
                if not reported and (watch.done() or chunk.finish_reason is not None):
                    chunk, reported = chunk.with_report((await asyncio.shield(watch)).report), True
                yield chunk
            finished = True
        finally:
            if not finished:
                stream.cancel()
                prefill_call.cancel()
            outcome = await asyncio.shield(watch)
        if outcome.result is not None and finished and first_at is not None:
            self.phase_ratio.add(outcome.result.prefill_s + outcome.result.send_s, time.perf_counter() - first_at)

    async def _watch(self, transfer: Transfer, call: DeploymentResponse, retry: bool) -> PrefillOutcome:
        num_tokens = len(transfer.request.prompt_token_ids)
        self.backlog.add(num_tokens, transfer.prefill_id)
        try:
            return await self._outcome(transfer, call, retry)
        finally:
            self.backlog.remove(num_tokens, transfer.prefill_id)

    async def _outcome(self, transfer: Transfer, call: DeploymentResponse, retry: bool) -> PrefillOutcome:
        prefill_id, decode_id = transfer.prefill_id, transfer.decode_id
        try:
            result = await call
        except asyncio.CancelledError:
            return PrefillOutcome(None, None)
        except Exception as exc:  # noqa: BLE001 - every prefill failure becomes a fallback with a reason
            return await self._after_failure(transfer, exc, retry)
        BREAKERS.record_success(prefill_id)
        BREAKERS.record_success(pair_key(prefill_id, decode_id))
        return PrefillOutcome(result, KVReport(prefix_cache_hit_tokens=result.num_cached_tokens))

    async def _after_failure(self, transfer: Transfer, exc: Exception, retry: bool) -> PrefillOutcome:
        prefill_id, decode_id = transfer.prefill_id, transfer.decode_id
        BREAKERS.record_failure(prefill_id)
        BREAKERS.record_failure(pair_key(prefill_id, decode_id))
        reason = f"prefill {prefill_id} failed: {short_error(exc)}"
        logger.warning("%s (transfer %s)", reason, transfer.xfer_id)
        if retry:
            try:
                other, result = await self._retry(transfer)
            except Exception as retry_exc:  # noqa: BLE001
                reason += f"; retry on another prefill replica failed: {short_error(retry_exc)}"
            else:
                return PrefillOutcome(result, KVReport(fallback="retried_other_prefill",
                                                       fallback_reason=f"{reason}; retried on {other}",
                                                       prefix_cache_hit_tokens=result.num_cached_tokens))
        try:
            await self.decode_calls.transfer_failed.remote(transfer.xfer_id, reason, replica_pin=decode_id)
        except Exception:  # noqa: BLE001 - decode gone too: its own deadline or death handles it
            logger.exception("could not tell decode %s about the failed transfer", decode_id)
        return PrefillOutcome(None, None)

    async def _retry(self, transfer: Transfer) -> tuple[str, PrefillResult]:
        """The prompt again on another prefill replica, paired with the same decode replica first."""
        avoid = [transfer.prefill_id, *open_pairs(transfer.decode_id)]
        async with self.prefill.prefill.choose_replica(transfer.request, avoid=avoid) as p_sel:
            other = pair_id(p_sel)
            if other == transfer.prefill_id:
                raise RuntimeError("no other prefill replica is available")
            BREAKERS.allow(other)
            pairing = self.decode_calls.pair_with.remote(other, replica_pin=transfer.decode_id)
            call = self.prefill.dispatch(p_sel, transfer.request, transfer.decode_id, transfer.xfer_id)
            try:
                await pairing
                result = await call
            except Exception:
                BREAKERS.record_failure(other)
                raise
        BREAKERS.record_success(other)
        return other, result
