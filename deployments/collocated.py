"""`Collocated`: one vLLM engine runs both phases (the baseline, and the last fallback).

Life cycle: the replica builds its in-process engine at start (a few seconds on the tiny model), then
serves `generate` as a stream of `GenerationChunk`s; a cancelled call (client gone) aborts the request
in the engine. `stats` reports KV block counts for leak checks and metrics. Warm-up and load
reporting come from `EngineReplica`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from app.engine import EngineDriver
from app.messages import GenerateRequest, GenerationChunk
from app.specs import CollocatedSpec
from deployments.engine_replica import EngineReplica


@serve.deployment
class Collocated(EngineReplica):
    role = "collocated"

    async def __init__(self, spec: CollocatedSpec):
        self._init_replica(spec.engine, spec.warmup)
        self.driver = EngineDriver.from_spec(spec.engine)
        await self._start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.engine.generate(
            request.request_id, list(request.prompt_token_ids), request.sampling, cache_salt=request.cache_salt,
            reply_to=request.reply_to,
        ):
            yield chunk
