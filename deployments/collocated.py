"""`Collocated`: one vLLM engine runs both phases (the baseline, and the last fallback).

Life cycle: the replica builds its in-process engine and binds its request inbox at start (a few seconds on the
tiny model), then serves `generate` as a stream of `GenerationChunk`s: a call pinned to it (`replica_pin`) whose
request came ahead through the inbox (`inbox_key`, app/request_inbox.py) attaches to the run that started then; a
cancelled call (client gone) aborts the request in the engine. `stats` reports KV block counts for leak checks
and metrics. Warm-up and load reporting come from `EngineReplica`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from app.engine import EngineDriver
from app.messages import GenerateRequest, GenerationChunk
from app.request_inbox import RequestInbox
from app.specs import CollocatedSpec
from deployments.engine_replica import EngineReplica


@serve.deployment
class Collocated(EngineReplica):
    role = "collocated"

    async def __init__(self, spec: CollocatedSpec):
        self._init_replica(spec.engine, spec.warmup)
        self.driver = EngineDriver.from_spec(spec.engine)
        self.inbox = RequestInbox(self._generate).bind()  # requests start here before their Serve call arrives
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return self.inbox_metadata()

    async def generate(self, request: GenerateRequest, *args: Any, inbox_key: str | None = None, **kwargs: Any
                       ) -> AsyncIterator[GenerationChunk]:
        """`_generate`'s stream; with `inbox_key`, of the run its inbox message started (app/request_inbox.py)."""
        async for chunk in self._started(inbox_key, self._generate, (request, *args), kwargs):
            yield chunk

    async def _generate(self, request: GenerateRequest, replica_pin: str | None = None
                        ) -> AsyncIterator[GenerationChunk]:
        self._check_pin("generate", replica_pin)
        async for chunk in self.engine.generate(
            request.request_id, list(request.prompt_token_ids), request.sampling, cache_salt=request.cache_salt,
            reply_to=request.reply_to,
        ):
            yield chunk
