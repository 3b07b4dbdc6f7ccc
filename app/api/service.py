"""pdserve's own OpenAI path, for two-step requests (`disagg_mode`) over HTTP and DeploymentHandle calls;
every other request goes through vLLM's serving classes (`vllm_front.py`).

Life cycle of one request:
1. `prepare_*` (`RequestPreparer`): model name, tokens, context checks -> `Prepared`.
2. `open` starts generation on the `EngineClient` (collocated engine, or the prefill/decode
   orchestrator). A decode_only request claims its parked KV here (and releases it if the request then
   turns out invalid, so nothing is lost); a stream's first chunk is awaited here, so failures before any
   token get their HTTP status and the headers can say where the KV came from.
3. `respond` folds the chunks into one OpenAI body; `stream` / `sse` turn them into OpenAI stream chunks,
   ending with `data: [DONE]` (an error mid-stream is sent as an error event before it).
Latency metrics (TTFT, TPOT, end to end) and fallback counters are recorded here, once per request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from app.api.errors import as_openai_error
from app.api.prepare import Prepared, RequestPreparer
from app.api.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from app.api.render import SSE_DONE, Folded, Renderer, sse_event
from app.messages import GenerationChunk, KVReport
from app.metrics import observe_request, record_report_fallbacks
from app.serving.client import EngineClient
from app.tenancy import Tenant

T = TypeVar("T")


@dataclass(frozen=True)
class Opened:
    """A prepared request whose generation has started (two-step claims done): errors past here are streamed."""

    prepared: Prepared
    chunks: AsyncIterator[GenerationChunk] | None  # None for prefill_only
    report: KVReport | None = None  # a stream's first chunk's report (for headers)


def _aborted() -> OpenAIError:
    return OpenAIError(503, "the request was aborted by the engine; retry it", type="server_error")


class OpenAIService:
    """Validates, runs and formats OpenAI requests for one served model."""

    def __init__(self, served_name: str, tokenizer: Any, max_model_len: int, client: EngineClient):
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.client = client
        self.preparer = RequestPreparer(served_name, tokenizer, max_model_len, client.supports_two_step)
        self.renderer = Renderer(served_name)

    # 1. validation and tokenisation -----------------------------------------------------------

    def prepare_completion(self, req: CompletionRequest, tenant: Tenant | None = None) -> Prepared:
        return self.preparer.completion(req, tenant)

    def prepare_chat(self, req: ChatCompletionRequest, tenant: Tenant | None = None) -> Prepared:
        return self.preparer.chat(req, tenant)

    # 2. start generation (two-step claims happen here, so their errors are HTTP statuses) ----------

    async def open(self, prepared: Prepared) -> Opened:
        try:
            opened = await self._open(prepared)
        except Exception as exc:  # noqa: BLE001 - a claim's domain error leaves as an OpenAI error (these pass as is)
            raise as_openai_error(exc) from None
        if not prepared.stream or opened.chunks is None:
            return opened
        try:
            first = await anext(opened.chunks)
        except StopAsyncIteration:
            return opened
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise as_openai_error(exc) from None
        return Opened(opened.prepared, prepend(first, opened.chunks), first.report)

    async def _open(self, prepared: Prepared) -> Opened:
        if prepared.disagg_mode == "prefill_only":
            return Opened(prepared, None)
        if prepared.disagg_mode != "decode_only":
            return Opened(prepared, self._timed(prepared, self.client.generate(prepared.request)))
        assert prepared.kv_cache_id is not None
        parked = await self.client.claim(prepared.kv_cache_id, prepared.tenant)
        try:
            ready = self.preparer.finish_decode_only(prepared, parked)
        except OpenAIError:
            await self.client.release(prepared.kv_cache_id)  # a refused decode request loses nothing
            raise
        return Opened(ready, self._timed(ready, self.client.decode_only(ready.request, prepared.kv_cache_id)))

    async def _timed(self, prepared: Prepared, chunks: AsyncIterator[GenerationChunk]
                     ) -> AsyncIterator[GenerationChunk]:
        """Pass chunks through; a finished request's TTFT, TPOT and end-to-end latency go to the metrics."""
        first_at, num_tokens = None, 0
        async for chunk in chunks:
            if chunk.token_ids:
                first_at = first_at or time.perf_counter()
                num_tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None and first_at is not None:
                observe_request(self.client.mode, first_at - prepared.arrived_at,
                                time.perf_counter() - prepared.arrived_at, num_tokens)
            yield chunk

    # 3. non-streaming -------------------------------------------------------------------------

    async def respond(self, opened: Opened) -> dict[str, Any]:
        """The OpenAI body of a non-streaming request."""
        body, _ = await self.answer(opened)
        return body

    async def answer(self, opened: Opened) -> tuple[dict[str, Any], KVReport | None]:
        """The body and the report behind its `pdserve` field (for headers)."""
        prepared = opened.prepared
        if prepared.disagg_mode == "prefill_only":
            return await self._prefill_only(prepared), None
        assert opened.chunks is not None
        num_prompt = len(prepared.request.prompt_token_ids)
        folded = Folded(num_prompt)
        try:
            async for chunk in opened.chunks:
                folded.add(chunk)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise as_openai_error(exc) from None
        if folded.finish_reason == "abort":
            raise _aborted()
        if folded.report is not None:
            record_report_fallbacks(folded.report)
        return self.renderer.body(prepared, folded), folded.report

    async def _prefill_only(self, prepared: Prepared) -> dict[str, Any]:
        try:
            parked = await self.client.prefill_only(prepared.request, prepared.tenant, prepared.tenant_parked_limit)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise as_openai_error(exc) from None
        return self.renderer.parked_body(prepared, parked)

    # 3. streaming -----------------------------------------------------------------------------

    async def stream(self, opened: Opened) -> AsyncIterator[dict[str, Any]]:
        """OpenAI stream chunks; a failure mid-stream becomes a final error chunk."""
        prepared = opened.prepared
        assert opened.chunks is not None
        folded = Folded(len(prepared.request.prompt_token_ids))
        if prepared.kind == "chat":
            yield self.renderer.role_chunk(prepared)
        try:
            async for chunk in opened.chunks:
                folded.add(chunk)
                if chunk.finish_reason == "abort":
                    raise _aborted()
                if chunk.text or chunk.finish_reason:
                    yield self.renderer.text_chunk(prepared, chunk.text, chunk.finish_reason)
            if folded.report is not None:
                record_report_fallbacks(folded.report)
            if prepared.include_usage:
                yield self.renderer.usage_chunk(prepared, folded)
        except Exception as exc:  # noqa: BLE001 - a broken stream still ends cleanly
            yield as_openai_error(exc).body()

    async def sse(self, opened: Opened) -> AsyncIterator[str]:
        """`stream` as server-sent events, ending with `data: [DONE]`."""
        async for event in self.stream(opened):
            yield sse_event(event)
        yield SSE_DONE


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first`, then the rest (a stream whose first item was awaited to learn how it starts)."""
    yield first
    async for chunk in rest:
        yield chunk
