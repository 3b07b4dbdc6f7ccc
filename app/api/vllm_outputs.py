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
    """Choice `index` of `n`, as vLLM's `ParentRequest` builds it (n=1, a seed of its own), without any
    `kv_transfer_params` a client sent: those steer pdserve's connector, and only pdserve may set them."""
    child = params if params.n == 1 else params.clone()  # vLLM built `params` for this request alone
    if params.n > 1:
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index
    if child.extra_args and "kv_transfer_params" in child.extra_args:
        child.extra_args = {k: v for k, v in child.extra_args.items() if k != "kv_transfer_params"} or None
    return child


@dataclass
class Choice:
    """One choice's output so far (for `FINAL_ONLY`, and to know when every choice has finished)."""

    index: int
    keep: bool = True  # accumulate text, tokens and logprobs (FINAL_ONLY); streams only need the counts
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.num_tokens += len(chunk.token_ids)
        if self.keep:
            self.text += chunk.text
            self.token_ids.extend(chunk.token_ids)
            if chunk.logprobs is not None:
                self.logprobs = self.logprobs or []
                self.logprobs.extend(chunk.logprobs)
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


def request_output(request_id: str, prompt_ids: list[int], outputs: list[CompletionOutput],
                    num_cached: int, finished: bool, prompt_logprobs: Any) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                         prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
                         outputs=outputs, finished=finished, num_cached_tokens=num_cached)
