"""The seam between the OpenAI layer and the engines: `EngineClient`, and its collocated implementation.

The OpenAI layer (`app/api/`) holds one `EngineClient` and uses nothing else of the serving side: a
request goes in as a `GenerateRequest`, `GenerationChunk`s come out, and domain errors
(`app/errors.py`) say what failed. What a client can do is declared, not probed: `supports_two_step`
says whether the two-step methods work (a client without it raises `TwoStepUnsupported`).

Implementations: `CollocatedClient` (below: Serve's router picks a `Collocated` replica, the request goes ahead
to its inbox and the call pinned to it, its stream is the answer) and `DisaggregatedClient`
(`app/serving/orchestrator.py`: prefill and decode replicas, KV moved between them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

from ray.serve.handle import DeploymentHandle

from app.errors import TwoStepUnsupported
from app.messages import GenerateRequest, GenerationChunk, KVReport, ParkedPrompt, ParkResult
from app.serving.replica_router import pick_replica, picked_again
from app.token_bus import TokenBus, pinned_start, streamed


class EngineClient(Protocol):
    mode: Literal["collocated", "disaggregated"]  # the `mode` tag of the latency metrics
    supports_two_step: bool  # prefill_only / claim / release / decode_only work

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """Run one request; the first chunk carries its `KVReport`."""
        ...

    async def prefill_only(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None
                           ) -> ParkResult:
        """Run the prompt and park its KV (`ParkingFull` when there is no room)."""
        ...

    async def claim(self, kv_cache_id: str, tenant: str) -> ParkedPrompt:
        """Take a parked entry for a decode_only request (`KVCacheNotFound` unless it is there for `tenant`)."""
        ...

    async def release(self, kv_cache_id: str) -> None:
        """Give a claimed entry back (its decode_only request was refused)."""
        ...

    def decode_only(self, request: GenerateRequest, kv_cache_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream `request`, its KV sent from the claimed parked entry."""
        ...

    def breaker_states(self) -> dict[str, dict]:
        """Circuit-breaker state per target (empty where there are none)."""
        ...

    def placement_state(self) -> dict[str, int]:
        """What placement decides from (empty where nothing is placed)."""
        ...


class CollocatedClient:
    mode: Literal["collocated"] = "collocated"
    supports_two_step = False

    def __init__(self, handle: DeploymentHandle, bus: TokenBus | None = None):
        self.handle = handle.options(stream=True)
        self.bus = bus

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        return picked_again(self._generate, request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        # picked without a slot reservation and pinned, so that the request can go ahead to that replica's inbox
        selection = await pick_replica(self.handle.generate, request)
        first = True
        async for chunk in streamed(self.bus, request, pinned_start(self.handle.generate, self.bus, selection, (), {})):
            if first:
                first = False
                chunk = chunk.with_report(KVReport(prefix_cache_hit_tokens=chunk.num_cached_tokens))
            yield chunk

    async def prefill_only(self, request: GenerateRequest, tenant: str, tenant_parked_limit: int | None
                           ) -> ParkResult:
        raise TwoStepUnsupported()

    async def claim(self, kv_cache_id: str, tenant: str) -> ParkedPrompt:
        raise TwoStepUnsupported()

    async def release(self, kv_cache_id: str) -> None:
        raise TwoStepUnsupported()

    async def decode_only(self, request: GenerateRequest, kv_cache_id: str) -> AsyncIterator[GenerationChunk]:
        raise TwoStepUnsupported()
        yield  # an async generator, like the protocol's

    def breaker_states(self) -> dict[str, dict]:
        return {}

    def placement_state(self) -> dict[str, int]:
        return {}
