"""pdserve's own request models, for its two-step API (`disagg_mode`, `kv_cache_id`), and the OpenAI error type.

Every other request is validated by vLLM's own request models (`app/api/vllm_front.py`). A two-step request
takes the basic sampling parameters below; anything else is refused by name (`extra="forbid"`, and the
OpenAI parameters listed in `_UNSUPPORTED_DEFAULTS`), with a message that says how to send it instead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI parameters pdserve refuses, with the value that means "not used".
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "n": (None, 1),
    "parallel_tool_calls": (None,),
}


class OpenAIError(Exception):
    """An error the client sees as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __reduce__(self):  # keyword-only fields survive pickling across Ray processes
        return (_rebuild_error, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild_error(status, message, type, param, code, headers) -> OpenAIError:
    return OpenAIError(status, message, type=type, param=param, code=code, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, description="Completion tokens at most (>= 1).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, description="End-user id; recorded, not used for generation.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence.")
    disagg_mode: Literal["prefill_only", "decode_only"] | None = Field(
        None, description="Two-step API: prefill_only parks the prompt's KV and returns a kv_cache_id; "
        "decode_only continues from it.")
    kv_cache_id: str | None = Field(None, description="With disagg_mode=decode_only: the id prefill_only returned.")

    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    n: Any = None
    parallel_tool_calls: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > 4:
                raise ValueError(f"at most 4 stop sequences are allowed, got {len(value)}")
            if any(not s for s in value):
                raise ValueError("stop sequences must be non-empty strings")
        elif value == "":
            raise ValueError("stop must be a non-empty string")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        given = self.model_dump(include=set(_UNSUPPORTED_DEFAULTS))
        for name, unused in _UNSUPPORTED_DEFAULTS.items():
            if given[name] not in unused:
                raise UnsupportedParameter(name)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.disagg_mode == "decode_only" and not self.kv_cache_id:
            raise ValueError("disagg_mode=decode_only needs the kv_cache_id that prefill_only returned")
        if self.kv_cache_id is not None and self.disagg_mode != "decode_only":
            raise ValueError("kv_cache_id is only used with disagg_mode=decode_only")
        if self.disagg_mode == "prefill_only" and self.stream:
            raise ValueError("disagg_mode=prefill_only returns one token and a kv_cache_id; it cannot stream")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


_TWO_STEP_HINT = ("pdserve's two-step API (disagg_mode) takes max_tokens, temperature, top_p, seed, stop, "
                  "presence_penalty, frequency_penalty, ignore_eos and stream; remove it, or send the request "
                  "without disagg_mode")


class UnsupportedParameter(ValueError):
    def __init__(self, name: str):
        super().__init__(f"`{name}` is not supported with disagg_mode: {_TWO_STEP_HINT}")
        self.name = name


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | None = None

    @model_validator(mode="after")
    def _prompt_unless_decode_only(self):
        _prompt_unless_decode_only(self, "prompt", self.prompt is not None)
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str] | None) -> str | list[int] | None:
        if value is None:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if len(value) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(v < 0 for v in value):
            raise ValueError("token ids must be non-negative")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens (newer clients).")

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None and not value:
            raise ValueError("messages must contain at least one message")
        return value

    @model_validator(mode="after")
    def _messages_unless_decode_only(self):
        _prompt_unless_decode_only(self, "messages", self.messages is not None)
        return self

    @model_validator(mode="after")
    def _max_completion_alias(self):
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise ValueError(f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}")
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
            object.__setattr__(self, "max_tokens", self.max_completion_tokens)
        return self


def _prompt_unless_decode_only(req: _SamplingFields, name: str, given: bool) -> None:
    if req.disagg_mode == "decode_only" and given:
        raise ValueError(f"omit `{name}` with disagg_mode=decode_only: it continues the prompt parked under "
                         "kv_cache_id")
    if req.disagg_mode != "decode_only" and not given:
        raise MissingField(name)


class MissingField(ValueError):
    def __init__(self, name: str):
        super().__init__(f"missing required parameter `{name}`")
        self.name = name


def validation_error_to_openai(errors: list[dict[str, Any]]) -> OpenAIError:
    """First pydantic error as an OpenAI 400 naming the parameter."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, UnsupportedParameter):
        return OpenAIError(400, str(ctx_error), param=ctx_error.name, code="unsupported_parameter")
    if isinstance(ctx_error, MissingField):
        return OpenAIError(400, str(ctx_error), param=ctx_error.name)
    message = err.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = f"unknown parameter `{param}` with disagg_mode: {_TWO_STEP_HINT}"
        return OpenAIError(400, message, param=param, code="unknown_parameter")
    if err.get("type") == "missing":
        message = f"missing required parameter `{param}`"
    elif param:
        message = f"{param}: {message}"
    return OpenAIError(400, message, param=param)
