"""Request preparation: an OpenAI request model -> a `Prepared` request an engine client can run.

`RequestPreparer` checks the model name (404), tokenises (chat template for chat), checks the prompt
and `max_tokens` against the context length (400 with both numbers) and builds the engine-neutral
`GenerateRequest` with the tenant's cache salt. A `decode_only` request has no prompt until its
kv_cache_id is claimed: it is prepared in two halves (`pending_decode_only`, then `finish_decode_only`
with the claimed prompt).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from app.api.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from app.messages import GenerateRequest, ParkedPrompt, SamplingSpec
from app.tenancy import DEFAULT_TENANT, Tenant

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Prepared:
    """A validated request ready for an engine, and how to present its answer."""

    request: GenerateRequest  # for decode_only: no prompt yet (it is claimed when the request opens)
    kind: Kind
    created: int
    include_usage: bool
    stream: bool
    disagg_mode: str | None = None
    kv_cache_id: str | None = None
    tenant: str = DEFAULT_TENANT
    tenant_parked_limit: int | None = None
    source: CompletionRequest | ChatCompletionRequest | None = None  # kept to finish a decode_only request
    arrived_at: float = field(default_factory=time.perf_counter)  # for TTFT and end-to-end latency


class RequestPreparer:
    def __init__(self, served_name: str, tokenizer: Any, max_model_len: int, two_step: bool):
        self.served_name = served_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.two_step = two_step  # whether the engine client offers the two-step API

    def completion(self, req: CompletionRequest, tenant: Tenant | None = None) -> Prepared:
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

    def chat(self, req: ChatCompletionRequest, tenant: Tenant | None = None) -> Prepared:
        self._check_model(req.model)
        if req.disagg_mode == "decode_only":
            return self._pending_decode_only("chat", req, tenant)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prepared("chat", req, list(prompt_ids), tenant)

    def finish_decode_only(self, pending: Prepared, parked: ParkedPrompt) -> Prepared:
        """The second half of a decode_only request, once its parked prompt is known."""
        assert pending.source is not None
        ready = self._prepared(pending.kind, pending.source, list(parked.prompt_token_ids), Tenant(pending.tenant),
                               cache_salt=parked.cache_salt)
        return replace(ready, arrived_at=pending.arrived_at)

    def _check_model(self, model: str) -> None:
        if model != self.served_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.served_name}`",
                              param="model", code="model_not_found")

    def _pending_decode_only(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest,
                             tenant: Tenant | None) -> Prepared:
        self._check_two_step()
        tenant = tenant or Tenant(DEFAULT_TENANT)
        placeholder = GenerateRequest(request_id="", prompt_token_ids=(), sampling=SamplingSpec(max_tokens=1))
        return Prepared(placeholder, kind, int(time.time()), bool(req.stream_options and
                        req.stream_options.include_usage), req.stream, "decode_only", req.kv_cache_id, tenant.name,
                        source=req)

    def _check_two_step(self) -> None:
        if not self.two_step:
            raise OpenAIError(400, "disagg_mode needs the disaggregated serving mode (this app runs collocated)",
                              param="disagg_mode", code="unsupported_parameter")

    def _prepared(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                  tenant: Tenant | None, cache_salt: str | None = None) -> Prepared:
        tenant = tenant or Tenant(DEFAULT_TENANT)
        if req.disagg_mode == "prefill_only":
            self._check_two_step()
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise OpenAIError(400, "the prompt has no tokens", param="prompt")
        max_tokens = self._max_tokens(kind, req.max_tokens, num_prompt)
        sampling = SamplingSpec(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            stop=req.stop_list(), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos,
        )
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        request = GenerateRequest(request_id=f"{prefix}-{uuid.uuid4().hex}", prompt_token_ids=tuple(prompt_ids),
                                  sampling=sampling, cache_salt=cache_salt or tenant.cache_salt)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(request=request, kind=kind, created=int(time.time()), include_usage=include_usage,
                        stream=req.stream, disagg_mode=req.disagg_mode, kv_cache_id=req.kv_cache_id,
                        tenant=tenant.name, tenant_parked_limit=tenant.max_parked_kv, source=req)

    def _max_tokens(self, kind: Kind, requested: int | None, num_prompt: int) -> int:
        """`max_tokens`, defaulted and checked against the room the context leaves."""
        if num_prompt >= self.max_model_len:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                              f"prompt has {num_prompt} tokens, which leaves no room for a completion. "
                              "Shorten the prompt.", param="messages" if kind == "chat" else "prompt",
                              code="context_length_exceeded")
        room = self.max_model_len - num_prompt
        default = DEFAULT_COMPLETION_MAX_TOKENS if kind == "completion" else room
        max_tokens = requested if requested is not None else default
        if max_tokens > room:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                              f"{max_tokens} for the completion). Reduce max_tokens to at most {room}.",
                              param="max_tokens", code="context_length_exceeded")
        return max_tokens
