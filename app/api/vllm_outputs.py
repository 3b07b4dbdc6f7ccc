"""vLLM's output types built from pdserve's chunks: one `Choice` per sampled sequence (deltas, or the whole
output for `FINAL_ONLY`), the `SamplingParams` of choice `index` of `n`, and the `RequestOutput` vLLM's
serving classes read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

from app.messages import GenerationChunk


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of `n`, as vLLM's `ParentRequest` builds it: n=1, and a seed of its own."""
    child = params.clone()
    child.n = 1
    if params.seed is not None:
        child.seed = params.seed + index
    return child


@dataclass
class Choice:
    """One choice's output so far (for `FINAL_ONLY`, and to know when every choice has finished)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = list(chunk.prompt_logprobs)
        self.cumulative_logprob = chunk.cumulative_logprob
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason

    def delta(self, chunk: GenerationChunk) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=chunk.text, token_ids=list(chunk.token_ids),
                                cumulative_logprob=chunk.cumulative_logprob,
                                logprobs=list(chunk.logprobs) if chunk.logprobs is not None else None,
                                finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason)

    def whole(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=self.token_ids,
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)


def request_output(request_id: str, prompt_ids: tuple[int, ...], outputs: list[CompletionOutput],
                    num_cached: int, finished: bool, prompt_logprobs: Any) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=list(prompt_ids),
                         prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
                         outputs=outputs, finished=finished, num_cached_tokens=num_cached)
