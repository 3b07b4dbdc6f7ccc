"""The OpenAI API logic, shared by the HTTP routes and the DeploymentHandle methods.

Life cycle of one request:
1. `prepare_*` checks the model name (404), tokenises (chat template for chat), checks the prompt and
   `max_tokens` against the context length (400 with both numbers) and builds a `GenerateRequest`.
2. The `EngineClient` (collocated engine, or the prefill/decode router) streams `GenerationChunk`s.
3. `*_response` folds them into one OpenAI response; `*_stream` turns them into OpenAI's
   server-sent-event chunks, ending with `data: [DONE]` (an error mid-stream is sent as an error
   event before it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from app.engine import EngineInputError
from app.messages import GenerateRequest, GenerationChunk, SamplingSpec
from app.metrics import observe_request, record_fallback
from app.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, short_error
from app.tenancy import DEFAULT_TENANT, Tenant

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class EngineClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]: ...


@dataclass(frozen=True)
class Prepared:
    """A validated request ready for an engine, and how to present its answer."""

    request: GenerateRequest  # for decode_only: no prompt yet (it is claimed in `open`)
    kind: str  # "completion" | "chat"
    created: int
    include_usage: bool
    stream: bool
    disagg_mode: str | None = None
    kv_cache_id: str | None = None
    tenant: str = DEFAULT_TENANT
    tenant_parked_limit: int | None = None
    source: Any = None  # the request model, kept to finish validation once a decode_only prompt is known
    arrived_at: float = field(default_factory=time.perf_counter)  # for TTFT and end-to-end latency


@dataclass(frozen=True)
class Opened:
    """A prepared request whose generation has started (two-step claims done): errors past here are streamed."""

    prepared: Prepared
    chunks: AsyncIterator[GenerationChunk] | None  # None for prefill_only
    metadata: dict[str, Any] | None = None  # a stream's first chunk's `pdserve` facts (for headers)


@dataclass
class _Folded:
    text: str = ""
    num_completion_tokens: int = 0
    num_prompt_tokens: int = 0
    finish_reason: str | None = None
    metadata: dict[str, Any] | None = None


class OpenAIService:
    """Validates, runs and formats OpenAI requests for one served model."""

    def __init__(self, served_name: str, tokenizer: Any, max_model_len: int, client: EngineClient,
                 retry_dead_replica: bool = True):
        self.served_name = served_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.client = client
        self.mode = getattr(client, "mode", "collocated")  # the `mode` tag of the latency metrics
        self.retry_dead_replica = retry_dead_replica

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": 0, "owned_by": "pdserve",
                "max_model_len": self.max_model_len}

    # 1. validation and tokenisation -----------------------------------------------------------

    def prepare_completion(self, req: CompletionRequest, tenant: Tenant | None = None) -> Prepared:
        self._check_model(req.model)
        if req.disagg_mode == "decode_only":
            return self._pending_decode_only("completion", req, tenant)
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise OpenAIError(400, "prompt must not be empty", param="prompt")
            prompt_ids = self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = list(req.prompt)
            bad = [t for t in prompt_ids if t >= self.vocab_size]
            if bad:
                raise OpenAIError(400, f"token id {bad[0]} is out of range: the vocabulary has {self.vocab_size} "
                                  "tokens", param="prompt")
        return self._prepared("completion", req, prompt_ids, tenant)

    def prepare_chat(self, req: ChatCompletionRequest, tenant: Tenant | None = None) -> Prepared:
        self._check_model(req.model)
        if req.disagg_mode == "decode_only":
            return self._pending_decode_only("chat", req, tenant)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prepared("chat", req, list(prompt_ids), tenant)

    def _check_model(self, model: str) -> None:
        if model != self.served_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.served_name}`",
                              param="model", code="model_not_found")

    def _pending_decode_only(self, kind: str, req: Any, tenant: Tenant | None) -> Prepared:
        self._check_two_step()
        tenant = tenant or Tenant(DEFAULT_TENANT)
        placeholder = GenerateRequest(request_id="", prompt_token_ids=(), sampling=SamplingSpec(max_tokens=1))
        return Prepared(placeholder, kind, int(time.time()), bool(req.stream_options and
                        req.stream_options.include_usage), req.stream, "decode_only", req.kv_cache_id, tenant.name,
                        source=req)

    def _check_two_step(self) -> None:
        if not hasattr(self.client, "prefill_only"):
            raise OpenAIError(400, "disagg_mode needs the disaggregated serving mode (this app runs collocated)",
                              param="disagg_mode", code="unsupported_parameter")

    def _prepared(self, kind: str, req: Any, prompt_ids: list[int], tenant: Tenant | None,
                  cache_salt: str | None = None) -> Prepared:
        tenant = tenant or Tenant(DEFAULT_TENANT)
        if req.disagg_mode == "prefill_only":
            self._check_two_step()
        default_max = DEFAULT_COMPLETION_MAX_TOKENS if kind == "completion" else None
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise OpenAIError(400, "the prompt has no tokens", param="prompt")
        if num_prompt >= self.max_model_len:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                              f"prompt has {num_prompt} tokens, which leaves no room for a completion. "
                              "Shorten the prompt.", param="messages" if kind == "chat" else "prompt",
                              code="context_length_exceeded")
        room = self.max_model_len - num_prompt
        max_tokens = req.max_tokens if req.max_tokens is not None else (default_max or room)
        if max_tokens > room:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                              f"{max_tokens} for the completion). Reduce max_tokens to at most {room}.",
                              param="max_tokens", code="context_length_exceeded")
        sampling = SamplingSpec(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            stop=req.stop_list(), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos,
        )
        request = GenerateRequest(request_id=f"{prefix}-{uuid.uuid4().hex}", prompt_token_ids=tuple(prompt_ids),
                                  sampling=sampling, cache_salt=cache_salt or tenant.cache_salt)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(request=request, kind=kind, created=int(time.time()), include_usage=include_usage,
                        stream=req.stream, disagg_mode=req.disagg_mode, kv_cache_id=req.kv_cache_id,
                        tenant=tenant.name, tenant_parked_limit=tenant.max_parked_kv, source=req)

    # 2. start generation (two-step claims happen here, so their errors are HTTP statuses) ----------

    async def open(self, prepared: Prepared) -> Opened:
        opened = await self._open(prepared)
        if not prepared.stream or opened.chunks is None:
            return opened
        # A stream's first chunk is awaited here, so that failures before any token (a 503 with
        # recompute off, an engine refusal) get their HTTP status, and headers can say where the KV came from.
        try:
            first = await anext(opened.chunks)
        except StopAsyncIteration:
            return opened
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise as_openai_error(exc) from None
        return Opened(opened.prepared, _prepend(first, opened.chunks), first.metadata)

    async def _open(self, prepared: Prepared) -> Opened:
        if prepared.disagg_mode == "prefill_only":
            return Opened(prepared, None)
        if prepared.disagg_mode != "decode_only":
            return Opened(prepared, self._timed(prepared, self.client.generate(prepared.request)))
        assert prepared.kv_cache_id is not None
        prompt_ids, cache_salt = await self.client.claim(prepared.kv_cache_id, prepared.tenant)
        try:
            ready = self._prepared(prepared.kind, prepared.source, list(prompt_ids), Tenant(prepared.tenant),
                                   cache_salt=cache_salt)
        except OpenAIError:
            await self.client.release(prepared.kv_cache_id)  # a refused decode request loses nothing
            raise
        ready = replace(ready, arrived_at=prepared.arrived_at)
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
                observe_request(self.mode, first_at - prepared.arrived_at, time.perf_counter() - prepared.arrived_at,
                                num_tokens)
            yield chunk

    # 2./3. non-streaming ----------------------------------------------------------------------

    async def respond(self, opened: Opened) -> dict[str, Any]:
        prepared = opened.prepared
        if prepared.disagg_mode == "prefill_only":
            return await self._prefill_only(prepared)
        folded = _Folded(num_prompt_tokens=len(prepared.request.prompt_token_ids))
        try:
            async for chunk in opened.chunks:
                _fold(folded, chunk)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            if not (self.retry_dead_replica and prepared.disagg_mode is None and replica_died(exc)):
                raise as_openai_error(exc) from None
            # Its engine replica died mid-request: nothing reached the client yet, so run it again once.
            folded = _Folded(num_prompt_tokens=len(prepared.request.prompt_token_ids),
                             metadata={"retried_after": f"replica died: {short_error(exc)}"})
            try:
                async for chunk in self.client.generate(prepared.request):
                    _fold(folded, chunk)
            except Exception as retry_exc:  # noqa: BLE001
                raise as_openai_error(retry_exc) from None
        if folded.finish_reason == "abort":
            raise OpenAIError(503, "the request was aborted by the engine; retry it", type="server_error")
        _record_fallbacks(folded.metadata)
        return self._body(prepared, folded)

    def _body(self, prepared: Prepared, folded: _Folded) -> dict[str, Any]:
        if prepared.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": folded.text},
                      "logprobs": None, "finish_reason": folded.finish_reason}
        else:
            choice = {"index": 0, "text": folded.text, "logprobs": None, "finish_reason": folded.finish_reason}
        body = self._envelope(prepared, "chat.completion" if prepared.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        body["usage"] = _usage(folded)
        if folded.metadata:
            body["pdserve"] = folded.metadata
        return body

    # 3. streaming -----------------------------------------------------------------------------

    async def _prefill_only(self, prepared: Prepared) -> dict[str, Any]:
        try:
            parked = await self.client.prefill_only(prepared.request, prepared.tenant, prepared.tenant_parked_limit)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise as_openai_error(exc) from None
        folded = _Folded(parked.text, len(parked.token_ids), parked.num_prompt_tokens, parked.finish_reason,
                         {"prefix_cache_hit_tokens": parked.num_cached_tokens})
        body = self._body(prepared, folded)
        body["kv_cache_id"] = parked.kv_cache_id
        body["kv_cache_expires_at"] = int(parked.expires_at)
        return body

    async def stream(self, opened: Opened) -> AsyncIterator[dict[str, Any]]:
        """OpenAI stream chunks; a failure mid-stream becomes a final error chunk."""
        prepared = opened.prepared
        is_chat = prepared.kind == "chat"
        obj = "chat.completion.chunk" if is_chat else "text_completion"
        folded = _Folded(num_prompt_tokens=len(prepared.request.prompt_token_ids))
        if is_chat:
            yield self._chunk(prepared, obj, {"role": "assistant", "content": ""}, None)
        try:
            async for chunk in opened.chunks:
                _fold(folded, chunk)
                if chunk.finish_reason == "abort":
                    raise OpenAIError(503, "the request was aborted by the engine; retry it", type="server_error")
                if chunk.text or chunk.finish_reason:
                    delta = {"content": chunk.text} if chunk.text else {}
                    yield self._chunk(prepared, obj, delta if is_chat else chunk.text, chunk.finish_reason)
            _record_fallbacks(folded.metadata)
            if prepared.include_usage:
                final = self._envelope(prepared, obj)
                final["choices"] = []
                final["usage"] = _usage(folded)
                yield final
        except Exception as exc:  # noqa: BLE001 - a broken stream still ends cleanly
            yield as_openai_error(exc).body()

    async def sse(self, opened: Opened) -> AsyncIterator[str]:
        """`stream` as server-sent events, ending with `data: [DONE]`."""
        async for event in self.stream(opened):
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    def _chunk(self, prepared: Prepared, obj: str, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        body = self._envelope(prepared, obj)
        if prepared.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if prepared.include_usage:
            body["usage"] = None
        return body

    def _envelope(self, prepared: Prepared, obj: str) -> dict[str, Any]:
        return {"id": prepared.request.request_id, "object": obj, "created": prepared.created,
                "model": self.served_name}


def _record_fallbacks(metadata: dict[str, Any] | None) -> None:
    if not metadata:
        return
    if metadata.get("fallback"):
        record_fallback(metadata["fallback"])
    if metadata.get("kv_source") == "recomputed":
        record_fallback("recomputed")
    if metadata.get("retried_after"):
        record_fallback("retried_dead_replica")


def _fold(folded: _Folded, chunk: GenerationChunk) -> None:
    folded.text += chunk.text
    folded.num_completion_tokens += len(chunk.token_ids)
    if chunk.finish_reason is not None:
        folded.finish_reason = chunk.finish_reason
    if chunk.metadata:
        folded.metadata = {**(folded.metadata or {}), **chunk.metadata}


def _usage(folded: _Folded) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": folded.num_prompt_tokens,
                             "completion_tokens": folded.num_completion_tokens,
                             "total_tokens": folded.num_prompt_tokens + folded.num_completion_tokens}
    hits = (folded.metadata or {}).get("prefix_cache_hit_tokens")
    if hits is not None:  # prompt tokens served from this tenant's prefix cache
        usage["prompt_tokens_details"] = {"cached_tokens": hits}
    return usage


async def _prepend(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    yield first
    async for chunk in rest:
        yield chunk


def replica_died(exc: BaseException) -> bool:
    """Did `exc` come from an engine replica dying (not from the request itself)?"""
    from ray.exceptions import ActorUnavailableError, RayActorError

    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, RayActorError | ActorUnavailableError) or type(seen).__name__ in (
                "ReplicaUnavailableError", "ActorDiedError"):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


def as_openai_error(exc: BaseException) -> OpenAIError:
    """The `OpenAIError` behind `exc` (also through Ray's task-error wrapping), else a 500."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, OpenAIError) and hasattr(seen, "status"):
            return seen
        if isinstance(seen, EngineInputError) or type(seen).__name__.endswith("(EngineInputError)"):
            return OpenAIError(400, short_error(seen), code="invalid_request")
        if type(seen).__name__ == "BackPressureError":  # a phase's queue is full (max_queued_requests)
            return OpenAIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                               code="server_busy", headers={"Retry-After": "1"})
        seen = getattr(seen, "cause", None) or seen.__cause__
    return OpenAIError(500, f"generation failed: {short_error(exc)}", type="server_error")
