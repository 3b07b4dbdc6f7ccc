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
With the first token from prefill (`Transfer.first_from_prefill`, app/serving/first_token.py) the prefill call is a
stream: its first token's chunk goes out first (the KV's header names that token to decode); a prefill that fails
before it is retried as in 2 (decode then samples the first token), one that fails after it is not (another
replica could sample another token): decode, told of the failure, cannot tell which token the client got and
answers `FirstTokenUnknown`, and the ingress continues the request after what it sent (app/api/vllm_engine.py).
Decode's first chunk names the token it continued after; one that is not the token the client got (prefill's stream
broke between its KV leaving and its token reaching the ingress) ends the stream with `FirstTokenUnknown` too.
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

from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from app.circuit import BREAKERS
from app.errors import FirstTokenUnknown, short_error
from app.messages import GenerateRequest, GenerationChunk, KVReport, PrefillResult
from app.metrics import PhaseRatio
from app.serving.placement import PrefillBacklog
from app.serving.replica_router import pick_replica

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
    first_from_prefill: bool = False  # prefill's streaming call gives the first token (app/serving/first_token.py)


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

    async def stream(self, transfer: Transfer, stream: DeploymentResponseGenerator,
                     prefill_call: DeploymentResponse | DeploymentResponseGenerator, retry: bool
                     ) -> AsyncIterator[GenerationChunk]:
        """Decode's chunks, while prefill is watched. With `transfer.first_from_prefill`, `prefill_call` is prefill's
        stream (`prefill_first`): its first token goes out before decode's (decode learns it from the KV's header and
        continues after it; app/serving/first_token.py)."""
        first = asyncio.get_running_loop().create_future() if transfer.first_from_prefill else None
        watch = asyncio.ensure_future(self._watch(transfer, prefill_call, retry, first))
        finished, reported, first_at, sent_token = False, False, None, None
        try:
            if first is not None and (early := await self._first_token(transfer, first)) is not None:
                first_at, sent_token = time.perf_counter(), early.token_ids[0]
                yield early
                if early.finish_reason is not None:  # the whole reply (a stop token, or one token asked for)
                    stream.cancel()
                    finished = True
                    return
            checked = first is None
            async for chunk in stream:
                if not checked:
                    checked = True
                    _check_continuation(transfer, sent_token, chunk)
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

    @staticmethod
    async def _first_token(transfer: Transfer, first: asyncio.Future) -> GenerationChunk | None:
        """Prefill's first-token chunk (None: prefill gave none, decode samples it). A stream's headers leave with
        it: they say where its KV is going (a later fallback is counted, and reported in a non-streaming body)."""
        chunk: GenerationChunk | None = await first
        return None if chunk is None else chunk.with_report(KVReport(
            mode="disaggregated", prefill_replica=transfer.prefill_id, decode_replica=transfer.decode_id,
            kv_source="transfer"))

    async def _watch(self, transfer: Transfer, call: DeploymentResponse | DeploymentResponseGenerator, retry: bool,
                     first: asyncio.Future | None) -> PrefillOutcome:
        num_tokens = len(transfer.request.prompt_token_ids)
        self.backlog.add(num_tokens, transfer.prefill_id)
        try:
            return await self._outcome(transfer, call, retry, first)
        finally:
            self.backlog.remove(num_tokens, transfer.prefill_id)
            if first is not None and not first.done():
                first.set_result(None)  # no first token from prefill: decode samples it

    async def _outcome(self, transfer: Transfer, call: DeploymentResponse | DeploymentResponseGenerator, retry: bool,
                       first: asyncio.Future | None) -> PrefillOutcome:
        prefill_id, decode_id = transfer.prefill_id, transfer.decode_id
        try:
            result = await _result(call, first)
        except (asyncio.CancelledError, RequestCancelledError):  # we cancelled it (Ray raises the latter then)
            return PrefillOutcome(None, None)  # not a failure: no breaker, no retry
        except Exception as exc:  # noqa: BLE001 - every prefill failure becomes a fallback with a reason
            if first is not None and not first.done():
                first.set_result(None)  # before any retry: a retried prefill leaves the first token to decode
            committed = first is not None and first.result() is not None
            return await self._after_failure(transfer, exc, retry and not committed, committed)
        BREAKERS.record_success(prefill_id)
        BREAKERS.record_success(pair_key(prefill_id, decode_id))
        return PrefillOutcome(result, KVReport(prefix_cache_hit_tokens=result.num_cached_tokens))

    async def _after_failure(self, transfer: Transfer, exc: Exception, retry: bool, token_sent: bool = False
                             ) -> PrefillOutcome:
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
            await self.decode_calls.transfer_failed.remote(transfer.xfer_id, reason, replica_pin=decode_id,
                                                           first_token_sent=token_sent)
        except Exception:  # noqa: BLE001 - decode gone too: its own deadline or death handles it
            logger.exception("could not tell decode %s about the failed transfer", decode_id)
        return PrefillOutcome(None, None)

    async def _retry(self, transfer: Transfer) -> tuple[str, PrefillResult]:
        """The prompt again on another prefill replica, paired with the same decode replica first."""
        avoid = [transfer.prefill_id, *open_pairs(transfer.decode_id)]
        p_sel = await pick_replica(self.prefill.prefill, transfer.request, avoid=avoid)
        other = pair_id(p_sel)
        if other == transfer.prefill_id:
            raise RuntimeError("no other prefill replica is available")
        BREAKERS.allow(other)
        pairing = self.decode_calls.pair_with.remote(other, replica_pin=transfer.decode_id)
        call = self.prefill.prefill.remote(transfer.request, transfer.decode_id, transfer.xfer_id,
                                           replica_pin=p_sel.replica_id)
        try:
            await pairing
            result = await call
        except Exception:
            BREAKERS.record_failure(other)
            raise
        BREAKERS.record_success(other)
        return other, result


def _check_continuation(transfer: Transfer, sent_token: int | None, chunk: GenerationChunk) -> None:
    """Decode's first chunk says which prefill token its run continued after (the KV's header names it); it must be
    the one the client got. They part when prefill's stream broke after its KV left with the token but before the
    token reached the ingress (its replica killed then: decode continues after a token the client never got), or the
    other way round. Either way the reply would be wrong: `FirstTokenUnknown` makes the ingress continue the request
    after what the client really got (app/api/vllm_engine.py)."""
    if chunk.continues_after != sent_token:
        logger.warning("transfer %s: decode continued after token %s, the client got %s", transfer.xfer_id,
                       chunk.continues_after, sent_token)
        raise FirstTokenUnknown(f"decode continued after token {chunk.continues_after}, the client got {sent_token}")


async def _result(call: DeploymentResponse | DeploymentResponseGenerator, first: asyncio.Future | None
                  ) -> PrefillResult:
    """Prefill's result; from a streaming call (`first` set), its first-token chunk goes to `first` as it comes."""
    if first is None:
        return await call
    async for item in call:
        if isinstance(item, PrefillResult):
            return item
        if not first.done():
            first.set_result(item)
    raise RuntimeError("prefill's stream ended without its result")
