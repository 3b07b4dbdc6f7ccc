"""Engine clients the ingress uses, one per serving mode.

`CollocatedClient`: Serve picks a `Collocated` replica; its stream is the answer.

`DisaggregatedRouter`, one request:
1. Choose the prefill replica and the decode replica first (Serve's router, `choose_replica`), so
   both ends of the transfer are known before it starts; each replica publishes its pair id through
   `record_replica_metadata`.
2. Dispatch both at once: prefill runs the prompt and sends its KV to that decode replica, while the
   decode replica pairs up, waits for the KV in the background and then streams tokens.
3. Stream decode's chunks; then collect prefill's report (a prefill failure is already visible in
   decode's metadata as a recompute). A consumer that leaves early cancels both calls.

Two-step API: `prefill_only` runs the prompt on a prefill replica that parks its KV and answers with a
`kv_cache_id`; `decode_only` claims that entry on the replica the id names (calls pinned with the
`replica_pin` keyword, which `PinnableRouter` honours), then streams from a decode replica exactly as
step 2-3 above, with the parked KV as the transfer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.handle import DeploymentHandle

from app.kv.parking import kv_cache_not_found, replica_of
from app.messages import GenerateRequest, GenerationChunk, PrefillResult

logger = logging.getLogger(__name__)


class CollocatedClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        first = True
        async for chunk in self.handle.generate.remote(request):
            if first:
                first = False
                chunk = replace(chunk, metadata={**(chunk.metadata or {}),
                                                 "prefix_cache_hit_tokens": chunk.num_cached_tokens})
            yield chunk


PIN_KWARG = "replica_pin"


class PinnableRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default power-of-two router, except that a call with `replica_pin=<replica id>` goes to
    that replica (or, if it is gone, to any replica, which then answers that it has nothing)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pin = pending_request.kwargs.get(PIN_KWARG) if pending_request is not None else None
        if pin is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        matches = [r for r in candidate_replicas if r.replica_id.unique_id == pin]
        return [matches] if matches else [candidate_replicas]


def _pair_id(selection: Any) -> str:
    return selection.replica_metadata.get("pair_id") or selection.replica_id


class DisaggregatedRouter:
    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, config: Any = None):
        self.prefill = prefill
        self.decode = decode.options(stream=True)
        self.decode_calls = decode
        self.config = config

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        xfer_id = secrets.token_hex(16)
        # 1. choose both ends
        async with self.prefill.prefill.choose_replica(request) as p_sel, \
                self.decode.generate.choose_replica(request) as d_sel:
            prefill_id, decode_id = _pair_id(p_sel), _pair_id(d_sel)
            # 2. dispatch both
            prefill_call = self.prefill.dispatch(p_sel, request, decode_id, xfer_id)
            stream = self.decode.dispatch(d_sel, request, prefill_id, xfer_id)
            async for chunk in self._stream(request, stream, prefill_call, decode_id, xfer_id):
                yield chunk

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
            async for chunk in self._stream(request, stream, prefill_call, decode_id, xfer_id):
                yield chunk

    async def _stream(self, request: GenerateRequest, stream, prefill_call, decode_id: str, xfer_id: str
                      ) -> AsyncIterator[GenerationChunk]:
        watch = asyncio.ensure_future(self._watch_prefill(prefill_call, decode_id, xfer_id))
        finished = False
        try:
            # 3. stream decode's tokens
            async for chunk in stream:
                yield chunk
            finished = True
        finally:
            if not finished:
                stream.cancel()
                prefill_call.cancel()
            result = await asyncio.shield(watch)
        if result is not None:  # prefill's own prefix-cache hits, for usage.prompt_tokens_details
            yield GenerationChunk("", (), None, len(request.prompt_token_ids),
                                  metadata={"prefix_cache_hit_tokens": result.num_cached_tokens})

    async def _watch_prefill(self, call, decode_id: str, xfer_id: str) -> PrefillResult | None:
        """Prefill's report; if prefill failed, tell decode at once so it falls back without waiting
        for the transfer deadline."""
        try:
            return await call
        except asyncio.CancelledError:
            return None
        except Exception as exc:  # noqa: BLE001 - every prefill failure becomes decode's fallback reason
            reason = f"prefill failed: {_short(exc)}"
            logger.warning("%s (transfer %s)", reason, xfer_id)
            try:
                await self.decode_calls.transfer_failed.remote(xfer_id, reason, replica_pin=decode_id)
            except Exception:  # noqa: BLE001 - decode gone too: its own deadline or death handles it
                logger.exception("could not tell decode %s about the failed transfer", decode_id)
            return None


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]
