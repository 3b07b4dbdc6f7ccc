"""`Ingress`: the OpenAI-compatible HTTP front door, also callable through a DeploymentHandle.

Life cycle of an HTTP request: authenticate the tenant (401) and admit it (429 over its concurrency) ->
parse JSON (413 over the size limit, 400 on invalid JSON) -> one of two paths:
- plain requests (everything vLLM's own server takes) go to `VLLMFront`: vLLM's request models and
  serving classes over `PDServeEngine`, which runs the prompt on the engine client for the configured
  mode (`CollocatedClient`, or the prefill/decode `DisaggregatedClient`);
- two-step requests (`disagg_mode` / `kv_cache_id`, pdserve's own API) go to `OpenAIService` with
  pdserve's request models, which take the basic sampling parameters and refuse the rest by name.
-> a JSON response (with the `pdserve` field) or an SSE stream (with `x-pdserve-*` headers). Every error
leaves as an OpenAI-style body; nothing a client sends can crash the replica.

Handle calls (`create_completion`, `create_chat_completion` and their `*_stream` twins) take the same
request bodies (dicts, or pdserve's request models) and return the same bodies as HTTP.

Start-up: the constructor ends with `warm_path` (app/warmup.py: three requests through the engines, one placed as
real ones are, with `warmup.enabled`), so the app is ready only once a request can go all the way through.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import serve_env
from app.api.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, validation_error_to_openai
from app.api.render import kv_headers
from app.api.service import OpenAIService
from app.api.vllm_engine import RequestScope
from app.api.vllm_front import Answer, Kind, VLLMFront, sse_to_dicts
from app.engine_setup import freeze_gc_heap
from app.serving.client import CollocatedClient, EngineClient
from app.specs import IngressSpec
from app.tenancy import Tenant, TenantDirectory
from app.token_bus import TokenBus
from app.warmup import warm_path

logger = logging.getLogger(__name__)

api = FastAPI(title="pdserve", description="Disaggregated LLM serving on Ray Serve (OpenAI-compatible).")


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error_to_openai(list(exc.errors())))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return _error_response(OpenAIError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return _error_response(OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


async def _read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(413, f"request body of {declared} bytes is over the {max_bytes}-byte limit",
                          code="request_too_large")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise OpenAIError(413, f"request body is over the {max_bytes}-byte limit", code="request_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    return data


_TWO_STEP_FIELDS = ("disagg_mode", "kv_cache_id")


def _as_body(request: Any) -> Any:
    """A handle call's request as the JSON body HTTP would carry (pdserve's request models: the fields set)."""
    if isinstance(request, CompletionRequest | ChatCompletionRequest):
        return request.model_dump(exclude_unset=True)
    return request


def _is_two_step(body: Any) -> bool:
    """pdserve's own two-step API, as opposed to a request vLLM's server would take."""
    return isinstance(body, dict) and any(body.get(name) is not None for name in _TWO_STEP_FIELDS)


def _validate(model: type, data: Any) -> Any:
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_openai(list(exc.errors())) from None


async def _released(events: AsyncIterator[str], admission) -> AsyncIterator[str]:
    """Release the tenant's concurrency slot when the stream ends, however it ends."""
    try:
        async for event in events:
            yield event
    finally:
        admission.__exit__(None, None, None)


# Defined after every module-level helper it uses: Serve captures the class when it is decorated.
@serve.deployment
@serve.ingress(api)
class Ingress:
    async def __init__(self, spec: IngressSpec, engines: dict[str, DeploymentHandle]):
        self.spec = spec
        client: EngineClient
        self.bus = TokenBus(spec.token_bus.host) if spec.token_bus.enabled else None
        if spec.mode == "collocated":
            client = CollocatedClient(engines["collocated"], self.bus)
        else:
            from app.serving.orchestrator import DisaggregatedClient

            client = DisaggregatedClient(engines["prefill"], engines["decode"], spec.orchestrator, self.bus)
        self.engines = engines
        self.tenants = TenantDirectory.from_config(spec.auth)
        self.front = VLLMFront.build(spec.served_name, spec.model_path, spec.dtype, spec.max_model_len, client,
                                     retry_dead_replica=spec.retry_decode)
        self.service = OpenAIService(spec.served_name, self.front.tokenizer, spec.max_model_len, client)
        serve_env.log_missing()
        if spec.warm_path:
            await warm_path(self.front, spec.served_name)
        freeze_gc_heap()  # vLLM's modules and config are loaded here too: keep collections off that heap

    # -- HTTP -----------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "mode": self.spec.mode}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return await self.front.models_list()

    @api.post("/v1/completions")
    async def http_completions(self, request: Request):
        return await self._http_request("completion", request)

    @api.post("/v1/chat/completions")
    async def http_chat_completions(self, request: Request):
        return await self._http_request("chat", request)

    async def _http_request(self, kind: Kind, request: Request):
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        body = await _read_json(request, self.spec.max_request_body_bytes)
        if _is_two_step(body):
            model = ChatCompletionRequest if kind == "chat" else CompletionRequest
            prepare = self.service.prepare_chat if kind == "chat" else self.service.prepare_completion
            return await self._http(tenant, lambda: self._two_step(prepare(_validate(model, body), tenant)))
        return await self._http(tenant, lambda: self.front.run(kind, body, RequestScope(cache_salt=tenant.cache_salt),
                                                               request))

    async def _http(self, tenant: Tenant, run: Callable[[], Awaitable[Answer]]):
        """`run`'s answer as JSON or an SSE stream; the tenant's concurrency slot is held until it ends."""
        admission = self.tenants.admit(tenant)
        admission.__enter__()  # held until the answer (or its stream) ends, however it ends
        try:
            answer = await run()
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        if answer.events is None:
            admission.__exit__(None, None, None)
            return JSONResponse(answer.body, headers=kv_headers(answer.report))
        return StreamingResponse(_released(answer.events, admission), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **kv_headers(answer.report)})

    async def _two_step(self, prepared) -> Answer:
        opened = await self.service.open(prepared)
        if not prepared.stream:
            body, report = await self.service.answer(opened)
            return Answer(report, body=body)
        return Answer(opened.report, events=self.service.sse(opened))

    # -- DeploymentHandle -------------------------------------------------------------------------

    async def tenant_stats(self) -> dict[str, Any]:
        return {"in_flight": self.tenants.in_flight()}

    async def reset_breakers(self) -> None:
        """Close every circuit breaker in this ingress replica (after the cause was fixed)."""
        from app.circuit import BREAKERS

        BREAKERS.reset()

    async def breaker_stats(self) -> dict[str, dict]:
        """Circuit-breaker state per prefill replica and per (prefill->decode) pair, as this ingress sees it."""
        return self.service.client.breaker_states()

    async def placement_stats(self) -> dict[str, int]:
        """The prefill backlog this ingress places by (disaggregated mode)."""
        return self.service.client.placement_state()

    async def token_bus_stats(self) -> dict[str, int]:  # messages in, dropped, streams open (empty: bus off)
        return self.bus.stats() if self.bus is not None else {}
    # `authorization` is what HTTP clients send in the Authorization header ("Bearer <key>").

    async def create_completion(self, request: CompletionRequest | dict[str, Any],
                                authorization: str | None = None) -> dict[str, Any]:
        """Non-streaming completion; raises `OpenAIError` where HTTP would answer 4xx/5xx."""
        return await self._respond(CompletionRequest, request, authorization)

    async def create_chat_completion(self, request: ChatCompletionRequest | dict[str, Any],
                                     authorization: str | None = None) -> dict[str, Any]:
        return await self._respond(ChatCompletionRequest, request, authorization)

    async def create_completion_stream(self, request: CompletionRequest | dict[str, Any],
                                       authorization: str | None = None) -> AsyncIterator[dict]:
        """Streaming completion: yields OpenAI chunk dicts (call with `handle.options(stream=True)`)."""
        async for event in self._stream(CompletionRequest, request, authorization):
            yield event

    async def create_chat_completion_stream(self, request: ChatCompletionRequest | dict[str, Any],
                                            authorization: str | None = None) -> AsyncIterator[dict]:
        async for event in self._stream(ChatCompletionRequest, request, authorization):
            yield event

    def _prepare(self, model: type, request: Any, tenant: Tenant):
        body = _validate(model, request)
        prepare = self.service.prepare_chat if model is ChatCompletionRequest else self.service.prepare_completion
        return prepare(body, tenant)

    async def _answer(self, model: type, request: Any, tenant: Tenant, stream: bool) -> Answer:
        if not isinstance(request, dict):
            raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
        kind: Kind = "chat" if model is ChatCompletionRequest else "completion"
        return await self.front.run(kind, {**request, "stream": stream}, RequestScope(cache_salt=tenant.cache_salt))

    async def _respond(self, model: type, request: Any, authorization: str | None) -> dict[str, Any]:
        tenant, request = self.tenants.authenticate(authorization), _as_body(request)
        with self.tenants.admit(tenant):
            if _is_two_step(request):
                return await self.service.respond(await self.service.open(self._prepare(model, request, tenant)))
            answer = await self._answer(model, request, tenant, stream=False)
            assert answer.body is not None
            return answer.body

    async def _stream(self, model: type, request: Any, authorization: str | None) -> AsyncIterator[dict]:
        tenant, request = self.tenants.authenticate(authorization), _as_body(request)
        with self.tenants.admit(tenant):
            if _is_two_step(request):
                prepared = self._prepare(model, request, tenant)
                async for event in self.service.stream(await self.service.open(prepared)):
                    yield event
                return
            answer = await self._answer(model, request, tenant, stream=True)
            assert answer.events is not None
            async for event in sse_to_dicts(answer.events):
                yield event
