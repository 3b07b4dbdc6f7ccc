"""`Ingress`: the OpenAI-compatible HTTP front door, also callable through a DeploymentHandle.

Life cycle of an HTTP request: parse JSON (400 on invalid JSON) -> pydantic request model (400 naming
the parameter) -> `OpenAIService.prepare_*` (404 unknown model, 400 context errors) -> the engine
client for the configured mode (`CollocatedClient`, or the prefill/decode `DisaggregatedClient`) -> a
JSON response or an SSE stream. Every error leaves as an OpenAI-style body; nothing a client sends can
crash the replica.

Handle calls (`create_completion`, `create_chat_completion` and their `*_stream` twins) take the same
request models (or plain dicts) and return the same bodies as HTTP.

Start-up: the constructor ends with `warm_path` (one plain and one streamed request through the engines,
with `warmup.enabled`), so the app is ready only once a request can go all the way through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, validation_error_to_openai
from app.api.render import kv_headers
from app.api.service import OpenAIService
from app.serving.client import CollocatedClient, EngineClient
from app.specs import IngressSpec
from app.tenancy import Tenant, TenantDirectory

logger = logging.getLogger(__name__)

WARM_PATH_TIMEOUT_S = 300.0  # engine replicas on a real model can take minutes to load

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


async def _parse(request: Request, model: type, max_bytes: int) -> Any:
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
    return _validate(model, data)


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


async def warm_path(service: OpenAIService) -> None:
    """Before Serve routes anything here: one streamed and one plain request through the whole path
    (tokenizer, engine client, handles and their routers, the engine replicas and their pair), so the first
    real request after "ready" costs what the tenth does. It waits for the engine replicas (they report
    ready after their own warm-up); past `WARM_PATH_TIMEOUT_S`, or if it fails, the ingress starts anyway."""
    request = CompletionRequest(model=service.served_name, prompt="def warm_up():\n", max_tokens=2, temperature=0)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(WARM_PATH_TIMEOUT_S):
            await service.respond(await service.open(service.prepare_completion(request)))
            streamed = request.model_copy(update={"stream": True})
            async for _ in service.sse(await service.open(service.prepare_completion(streamed))):
                pass
    except Exception as exc:  # noqa: BLE001 - a cold first request is better than no ingress
        logger.warning("warming the request path failed after %.1f s: %s", time.perf_counter() - started, exc)
        return
    logger.info("request path warm after %.1f s", time.perf_counter() - started)


# Defined after every module-level helper it uses: Serve captures the class when it is decorated.
@serve.deployment
@serve.ingress(api)
class Ingress:
    async def __init__(self, spec: IngressSpec, engines: dict[str, DeploymentHandle]):
        from transformers import AutoTokenizer

        self.spec = spec
        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        client: EngineClient
        if spec.mode == "collocated":
            client = CollocatedClient(engines["collocated"])
        else:
            from app.serving.orchestrator import DisaggregatedClient

            client = DisaggregatedClient(engines["prefill"], engines["decode"], spec.orchestrator)
        self.engines = engines
        self.tenants = TenantDirectory.from_config(spec.auth)
        self.service = OpenAIService(spec.served_name, tokenizer, spec.max_model_len, client,
                                     retry_dead_replica=spec.retry_decode)
        if spec.warm_path:
            await warm_path(self.service)

    # -- HTTP -----------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "mode": self.spec.mode}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return self.service.models()

    @api.post("/v1/completions")
    async def http_completions(self, request: Request):
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        body = await _parse(request, CompletionRequest, self.spec.max_request_body_bytes)
        return await self._http(tenant, lambda: self.service.prepare_completion(body, tenant))

    @api.post("/v1/chat/completions")
    async def http_chat_completions(self, request: Request):
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        body = await _parse(request, ChatCompletionRequest, self.spec.max_request_body_bytes)
        return await self._http(tenant, lambda: self.service.prepare_chat(body, tenant))

    async def _http(self, tenant: Tenant, prepare):
        prepared = prepare()
        if not prepared.stream:
            with self.tenants.admit(tenant):
                body, report = await self.service.answer(await self.service.open(prepared))
            return JSONResponse(body, headers=kv_headers(report))
        admission = self.tenants.admit(tenant)
        admission.__enter__()  # held until the stream ends, however it ends
        try:
            opened = await self.service.open(prepared)
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        return StreamingResponse(_released(self.service.sse(opened), admission), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **kv_headers(opened.report)})

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

    def _prepare(self, model: type, request: Any, authorization: str | None):
        tenant = self.tenants.authenticate(authorization)
        body = _validate(model, request)
        prepare = self.service.prepare_chat if model is ChatCompletionRequest else self.service.prepare_completion
        return tenant, prepare(body, tenant)

    async def _respond(self, model: type, request: Any, authorization: str | None) -> dict[str, Any]:
        tenant, prepared = self._prepare(model, request, authorization)
        with self.tenants.admit(tenant):
            return await self.service.respond(await self.service.open(prepared))

    async def _stream(self, model: type, request: Any, authorization: str | None) -> AsyncIterator[dict]:
        tenant, prepared = self._prepare(model, request, authorization)
        with self.tenants.admit(tenant):
            async for event in self.service.stream(await self.service.open(prepared)):
                yield event
