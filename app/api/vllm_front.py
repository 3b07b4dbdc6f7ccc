"""`VLLMFront`: the OpenAI request surface of vLLM's own server, served by vLLM's own serving classes.

vLLM's request models accept (and refuse) exactly what its server does and build its `SamplingParams`;
`OpenAIServingCompletion` / `OpenAIServingChat` render prompts (chat templates, tools), and shape the
answers (logprobs, `n`, echo, usage, token ids). Where pdserve reuses them rather than writing them again,
nothing can drift from vLLM but the engine underneath: `PDServeEngine` (`vllm_engine.py`) runs each prompt
on pdserve's replicas.

Life cycle of one request (`run`):
1. vLLM's request model validates the body (a 400 in vLLM's words names the parameter).
2. The serving class renders the prompt and calls the engine with the request's `RequestScope` set.
3. A body gets the `pdserve` field from the scope's `KVReport`. A stream's first event is awaited here,
   so a failure before any token is an HTTP status (not a 200 with an error event) and the headers can
   say where the KV came from; later failures are error events, as in vLLM. A stream that ran again after
   its first event (its replica died, or its KV was lost on the way) says so in one more event before
   `[DONE]`: no choices, and the `pdserve` field with `retried_after` (the headers went out before it).
Errors leave as `OpenAIError`: vLLM's own error bodies keep vLLM's fields; pdserve's domain errors
(`app/api/errors.py`) keep theirs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from app.api.errors import as_openai_error, causes, domain_error
from app.api.protocol import OpenAIError
from app.api.service import prepend
from app.api.vllm_engine import SCOPE, PDServeEngine, RequestScope
from app.errors import EngineInputError, short_error
from app.messages import KVReport
from app.serving.client import EngineClient

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Answer:
    """A request's answer: a body, or a stream of server-sent events whose first event has arrived."""

    report: KVReport | None
    body: dict[str, Any] | None = None
    events: AsyncIterator[str] | None = None


class VLLMFront:
    def __init__(self, served_name: str, model_path: str, vllm_config: Any, client: EngineClient,
                 retry_dead_replica: bool = True):
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers import renderer_from_config
        from vllm.renderers.online_renderer import OnlineRenderer

        renderer = renderer_from_config(vllm_config)
        self.tokenizer = renderer.tokenizer  # the two-step path tokenises with the same tokenizer
        self.engine = PDServeEngine(client, vllm_config, renderer, retry_dead_replica)
        self.models = OpenAIServingModels(self.engine, [BaseModelPath(name=served_name, model_path=model_path)])
        # vLLM's server defaults: the model's own chat template, no tool parser (tool_choice "auto" refused
        # as vLLM refuses it without --enable-auto-tool-choice), no request-supplied templates.
        online = OnlineRenderer(vllm_config.model_config, renderer, request_logger=None, chat_template=None,
                                chat_template_content_format="auto")
        online.warmup()
        # prompt_tokens_details: pdserve has always said how much of a prompt its tenant's prefix cache served
        self.completion = OpenAIServingCompletion(self.engine, self.models, online_renderer=online,
                                                  request_logger=None, enable_prompt_tokens_details=True)
        self.chat = OpenAIServingChat(self.engine, self.models, "assistant", online_renderer=online,
                                      request_logger=None, chat_template=None, chat_template_content_format="auto",
                                      enable_prompt_tokens_details=True)

    @classmethod
    def build(cls, served_name: str, model_path: str, dtype: str, max_model_len: int, client: EngineClient,
              retry_dead_replica: bool = True) -> VLLMFront:
        """The front for a model: vLLM's config of it (tokenizer, context length, generation defaults), no engine."""
        from vllm.engine.arg_utils import EngineArgs

        args = EngineArgs(model=model_path, tokenizer=model_path, served_model_name=served_name, dtype=dtype,
                          max_model_len=max_model_len, enforce_eager=True)
        return cls(served_name, model_path, args.create_engine_config(), client, retry_dead_replica)

    async def models_list(self) -> dict[str, Any]:
        return (await self.models.show_available_models()).model_dump()

    async def run(self, kind: Kind, data: dict[str, Any], scope: RequestScope, raw_request: Any = None) -> Answer:
        """Answer one request (see the module docstring); raises `OpenAIError`."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        # 1. validate
        model = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            request = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - vLLM's validators also raise directly; the body is all there is
            # A validator that trips over the body (vLLM's `structured_outputs: []` raises AttributeError, a 500 on
            # its own server) is still the body's fault: a 400, never a 5xx.
            mapped = error_of(exc)
            if mapped.status >= 500:
                mapped = OpenAIError(400, f"invalid request: {short_error(exc)}", type="BadRequestError", code=400)
            raise mapped from None
        if request.use_beam_search and not request.stream:  # (streamed, vLLM refuses it itself)
            # vLLM's beam search drives the engine step by step through an input processor the ingress has not
            raise OpenAIError(400, "use_beam_search is not supported by pdserve; sample with n and best-of on "
                              "the client, or send the request to vLLM's server", type="BadRequestError",
                              param="use_beam_search", code=400)
        # 2. render and run
        token = SCOPE.set(scope)
        try:
            if kind == "chat":
                result = await self.chat.create_chat_completion(request, raw_request)
            else:
                result = await self.completion.create_completion(request, raw_request)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise error_of(exc) from None
        finally:
            SCOPE.reset(token)
        if isinstance(result, ErrorResponse):
            raise _from_vllm(result)
        # 3. answer
        if not isinstance(result, AsyncIterator):
            body = result.model_dump()
            report = scope.final_report()
            if report is not None:
                body["pdserve"] = report.to_json()
            return Answer(report, body=body)
        try:
            first = await anext(result)
        except Exception as exc:  # noqa: BLE001
            raise error_of(exc) from None
        if scope.failure is not None and not scope.num_outputs:  # failed before any token: an HTTP status
            await result.aclose()
            raise error_of(scope.failure)
        return Answer(scope.report, events=_with_late_report(prepend(first, result), scope))


async def _with_late_report(events: AsyncIterator[str], scope: RequestScope) -> AsyncIterator[str]:
    """`events`, and before `[DONE]` an event with the `pdserve` field if the request ran again after the
    headers were sent (its envelope, id and model, copied from the stream's first event)."""
    first: str | None = None  # parsed only if it is needed: every stream passes here
    async for event in events:
        if first is None and event.startswith("data: {"):
            first = event
        elif event.startswith("data: [DONE]") and scope.retried_after is not None:
            opened = json.loads(first[len("data: "):]) if first else {}
            late = {key: opened[key] for key in ("id", "object", "created", "model") if key in opened}
            late |= {"choices": [], "pdserve": scope.final_report().to_json()}
            yield f"data: {json.dumps(late)}\n\n"
        yield event


def sse_to_dicts(events: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """A stream of server-sent events as the dicts they carry (for DeploymentHandle callers)."""
    async def parsed() -> AsyncIterator[dict[str, Any]]:
        async for event in events:
            for line in event.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line.removeprefix("data: "))
    return parsed()


def error_of(exc: BaseException) -> OpenAIError:
    """An engine's refusal of the input and everything vLLM checks in the ingress as vLLM's server answers
    them; pdserve's own domain errors (parked KV, transfers, capacity) and any other failure of a replica as
    pdserve answers them (a replica's ValueError is not the client's fault)."""
    from ray.exceptions import RayError
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    refused = next((seen for seen in causes(exc) if isinstance(seen, EngineInputError)), None)
    if refused is not None:  # vLLM's input checks, run on the replica: the body vLLM's server gives them
        return OpenAIError(400, refused.message, type="BadRequestError", param=refused.parameter, code=400)
    if isinstance(exc, RayError) or domain_error(exc) is not None:
        return as_openai_error(exc)

    return _from_vllm(create_error_response(exc if isinstance(exc, Exception) else RuntimeError(str(exc))))


def _from_vllm(response: Any) -> OpenAIError:
    error = response.error
    return OpenAIError(int(error.code), error.message, type=error.type, param=error.param, code=error.code)


def _validation_error(exc: ValidationError) -> OpenAIError:
    """A request model's refusal in the words of vLLM's server (`N validation error(s):` and the errors)."""
    from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
    from vllm.exceptions import VLLMValidationError

    errors = exc.errors(include_url=False)
    param = None
    for err in errors:
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, VLLMValidationError) and ctx_error.parameter:
            param = ctx_error.parameter
            break
    # vLLM's server validates the body through FastAPI, whose error locations start with "body"
    if param is None and errors:
        param = clean_loc_for_param(("body", *errors[0].get("loc", ())))
    label = "error" if len(errors) == 1 else "errors"
    lines = [f"  {{'type': {e['type']!r}, 'loc': {clean_loc_for_param(('body', *e['loc']))!r}, 'msg': {e['msg']!r}}}"
             for e in errors[:_MAX_REPORTED]]
    if len(errors) > _MAX_REPORTED:
        lines.append(f"  ...and {len(errors) - _MAX_REPORTED} more {label}")
    message = sanitize_message("\n".join([f"{len(errors)} validation {label}:", *lines]))
    return OpenAIError(400, message, type="Bad Request", param=param, code=400)


_MAX_REPORTED = 10  # as vLLM's handler
