"""`PDServeEngine`: vLLM's `EngineClient` over pdserve's own engine client, so vLLM's OpenAI serving
classes (request models, chat templates, `n`, logprobs, echo, tools, structured output, response shapes)
run unchanged in the ingress while the prompt runs on pdserve's replicas (collocated, or prefill ->
KV transfer -> decode).

Life cycle of one `generate` call (vLLM's serving class calls it once per prompt):
1. The caller's `RequestScope` (tenant salt, arrival time, where the `KVReport` goes) is read from a
   context variable when `generate` is called, before the generator runs.
2. `n` is fanned out here: `n` pdserve requests with `n == 1`, seeded `seed + index` as vLLM's own
   parallel sampling does, streamed together (vLLM's `merge_async_iterators`: one failing choice stops the
   others); each output carries its choice `index`. A client's `kv_transfer_params` never go through: only
   pdserve sets them, for its own transfers.
3. pdserve's chunks become vLLM `RequestOutput`s: deltas as they come (streaming), or one final output
   (non-streaming, `FINAL_ONLY`). A request whose engine replica died before anything of it reached the client
   (non-streaming: before it finished; streaming: before its first chunk) is run once more, reported as
   `retried_after`.
4. The first chunk's `KVReport` (and any later fields) lands in the scope for the `pdserve` field and
   headers; latency metrics are recorded once per prompt, fallback counters once per choice (each choice
   is a request of its own on the replicas, with its own transfer).
Only `generate` is served; the engine-management calls of vLLM's protocol are refused (pdserve's
replicas are managed by Serve).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

from vllm.engine.protocol import EngineClient as VLLMEngineClient
from vllm.exceptions import GenerationError, RetryableRequestError, VLLMValidationError
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.utils.async_utils import merge_async_iterators

from app.api.errors import as_openai_error, first_token_unknown, replica_died
from app.api.vllm_outputs import Choice, child_params, request_output
from app.errors import short_error
from app.messages import GenerateRequest, GenerationChunk, KVReport
from app.metrics import observe_request, record_fallback, record_report_fallbacks
from app.serving.client import EngineClient
from app.serving.first_token import can_continue, continued


@dataclass
class RequestScope:
    """One HTTP or handle request, as the engine adapter sees it."""

    cache_salt: str | None = None  # the tenant's: prefix-cache reuse stays inside one tenant
    remote_prefill: bool = False  # disaggregated: on a prefill replica whatever the placement (the warm path)
    arrived_at: float = field(default_factory=time.perf_counter)
    report: KVReport | None = None  # choice 0's, merged over its chunks
    retried_after: str | None = None
    first_token_at: float | None = None  # perf_counter time the first output token reached the ingress
    num_outputs: int = 0  # RequestOutputs handed to the serving class so far
    failure: BaseException | None = None  # why generation failed, if it did

    def final_report(self) -> KVReport | None:
        if self.retried_after is None:
            return self.report
        return replace(self.report or KVReport(), retried_after=self.retried_after)


SCOPE: ContextVar[RequestScope | None] = ContextVar("pdserve_request_scope", default=None)


def salted(tenant_salt: str | None, request_salt: str | None) -> str | None:
    """A request's own `cache_salt` (vLLM's field) narrows reuse further inside its tenant, never across."""
    if tenant_salt is None or request_salt is None:
        return tenant_salt or request_salt
    return f"{tenant_salt}:{request_salt}"


async def _watched(scope: RequestScope, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Counts outputs and keeps the failure: vLLM's stream generators turn exceptions into error events,
    and the front needs to know whether one came before any output (then it is an HTTP status)."""
    try:
        async for output in outputs:
            scope.num_outputs += 1
            yield output
    except Exception as exc:
        scope.failure = exc
        if scope.num_outputs:  # mid-stream: vLLM's serving class sends this as an error event, in our words
            raise _generation_error(exc) from exc
        raise


class PDServeEngine(VLLMEngineClient):
    """The engine vLLM's serving classes see; `client` is pdserve's (collocated or disaggregated)."""

    def __init__(self, client: EngineClient, vllm_config: Any, renderer: Any, retry_dead_replica: bool = True):
        self.client = client
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = None  # inputs are processed by the engine replica that runs them
        self.retry_dead_replica = retry_dead_replica

    # -- what the serving classes call ------------------------------------------------------------

    def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str, **_: Any
                 ) -> AsyncIterator[RequestOutput]:
        """vLLM's `generate`; LoRA, priority, tracing and data-parallel hints do not apply to pdserve."""
        scope = SCOPE.get()  # read now: the generator may run in another task's context
        if scope is None:  # it carries the tenant's cache salt: never run without it
            raise RuntimeError("PDServeEngine.generate called outside a request scope (set app.api.vllm_engine.SCOPE)")
        if not isinstance(prompt, dict) or prompt.get("type", "token") != "token":
            raise VLLMValidationError("pdserve serves text and token-id prompts only", parameter="prompt")
        prompt_ids = tuple(prompt["prompt_token_ids"])
        salt = salted(scope.cache_salt, prompt.get("cache_salt"))
        return _watched(scope, self._generate(scope, request_id, prompt_ids, salt, sampling_params))

    async def _generate(self, scope: RequestScope, request_id: str, prompt_ids: tuple[int, ...],
                        salt: str | None, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
        prompt_list = list(prompt_ids)  # RequestOutput wants a list; built once, not per delta
        children = [GenerateRequest(f"{request_id}-{index}-{uuid.uuid4().hex[:8]}", prompt_ids,
                                    child_params(params, index), salt, scope.remote_prefill)
                    for index in range(params.n)]
        outputs: list[Choice] = [Choice(index, keep=final_only) for index in range(params.n)]
        async for index, chunk in merge_async_iterators(*(self._run(scope, child, i, final_only)
                                                          for i, child in enumerate(children))):
            choice = outputs[index]
            choice.add(chunk)
            finished = all(c.finish_reason is not None for c in outputs)
            if finished and scope.first_token_at is not None:  # TPOT per sequence: the longest choice's tokens
                observe_request(self.client.mode, scope.first_token_at - scope.arrived_at,
                                time.perf_counter() - scope.arrived_at, max(c.num_tokens for c in outputs))
            # usage's cached tokens: what the tenant's prefix cache served, not the KV decode loaded
            num_cached = (scope.report.prefix_cache_hit_tokens if scope.report else None) or 0
            if not final_only:
                yield request_output(request_id, prompt_list, [choice.delta(chunk)], num_cached, finished,
                                     chunk.prompt_logprobs)
            elif finished:
                yield request_output(request_id, prompt_list, [c.whole() for c in outputs], num_cached, True,
                                     outputs[0].prompt_logprobs)

    async def _run(self, scope: RequestScope, request: GenerateRequest, index: int, final_only: bool
                   ) -> AsyncIterator[GenerationChunk]:
        """One choice's chunks. If its engine replica dies before any of them reached the client (a stream before
        its first chunk; non-streaming, whose chunks are held until it finishes, any time), it runs once more from
        the start; a stream that got tokens already continues after them (if `can_continue`: its first token may
        have come from prefill before its decode replica died). So does a request whose decode replica could not
        tell which first token the client got (`FirstTokenUnknown`: prefill's KV never came). Reported as
        `retried_after`."""
        sent: list[int] = []  # token ids the client got
        attempt = request
        while True:
            held: list[GenerationChunk] = []
            try:
                async for chunk in self._reported(scope, attempt, index):
                    if final_only:
                        held.append(chunk)
                        continue
                    sent.extend(chunk.token_ids)
                    yield chunk
            except Exception as exc:
                lost_kv = first_token_unknown(exc)  # prefill streamed a token whose KV never reached decode
                if (attempt is not request or not (lost_kv or self.retry_dead_replica and replica_died(exc))
                        or (sent and not can_continue(request))):
                    raise
                scope.retried_after = short_error(exc) if lost_kv else f"replica died: {short_error(exc)}"
                record_fallback("continued_after_lost_kv" if lost_kv else "retried_dead_replica")
                retry_id = f"{request.request_id}-retry"
                attempt = continued(request, sent, retry_id) if sent else replace(request, request_id=retry_id)
                if lost_kv:  # the transfer path just failed: this time the prompt runs on a decode replica
                    attempt = replace(attempt, rerun_after_lost_kv=True)
                continue
            for chunk in held:
                yield chunk
            return

    async def _reported(self, scope: RequestScope, request: GenerateRequest, index: int
                        ) -> AsyncIterator[GenerationChunk]:
        """Pass chunks through; the first token's time and choice 0's report go to the scope, fallbacks to
        the counters once the choice finished."""
        report: KVReport | None = None
        async for chunk in self.client.generate(request):
            if chunk.token_ids and scope.first_token_at is None:
                scope.first_token_at = time.perf_counter()
            if chunk.report is not None:
                report = (report or KVReport()).merged(chunk.report)
                if index == 0 or scope.report is None:  # choice 0's, or whichever answered first until it does
                    scope.report = report
            yield chunk
        if report is not None:
            record_report_fallbacks(report)

    async def abort(self, request_id: str | Any) -> None:
        """Closing a `generate` stream aborts its requests on their replicas; nothing else to do."""

    # -- the rest of vLLM's engine protocol ---------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return True

    @property
    def is_stopped(self) -> bool:
        return False

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("pdserve's engines are replicas managed by Serve")

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    def encode(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("pdserve serves generation, not pooling or embeddings")

    async def add_lora(self, *args: Any, **kwargs: Any) -> bool:
        raise NotImplementedError("pdserve does not serve LoRA adapters")

    def shutdown(self, timeout: float | None = None) -> None:
        return None

    async def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("engine management goes through pdserve's replicas, not the ingress")

    start_profile = stop_profile = reset_mm_cache = reset_encoder_cache = reset_prefix_cache = _unsupported
    sleep = release_kv_cache_memory = wake_up = is_sleeping = _unsupported
    pause_generation = resume_generation = is_paused = _unsupported


def _generation_error(exc: BaseException) -> GenerationError:
    """A failure after the first output, as the error vLLM's stream generators report with its status."""
    error = as_openai_error(exc)
    failure = RetryableRequestError(error.message) if error.status == 503 else GenerationError(error.message)
    failure.status_code = HTTPStatus(error.status)
    return failure
