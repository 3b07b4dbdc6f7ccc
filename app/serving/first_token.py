"""The first token from prefill: a remotely prefilled request's first token goes to the client as soon as prefill
sampled it, not after its KV has moved and decode has run one step.

Why: prefill computes the logits of the first new token anyway (the prompt's last position). Decode then used to
load all but the last prompt token, compute that token again and sample the first token itself, so the KV
handoff and a decode step sat in every remote request's time to first token. Now prefill samples the first token
with the request's own sampling, the ingress streams it at once, and decode continues from the prompt plus that
token: it loads the KV of the whole prompt and computes the first token's KV in its first step, which samples the
second token (no more compute than before, and greedy output stays token for token the collocated one).

Life cycle of one request (the ingress decides with `can_continue`):
1. The ingress dispatches prefill's streaming call (`Prefill.prefill_first`) and decode's call together. Prefill
   runs the prompt with `prefill_sampling` (the request's sampling, one token); the KV is gathered in the step as
   always, but its send waits for the token. The moment the engine gives it, prefill releases the send (the KV's
   header names the token, `KVHeader.first_token`) and yields the token's chunk; once the KV was sent, its
   `PrefillResult`.
2. The ingress streams the chunk at once (the request ends there if it is final: `ends_request`, and decode's
   call is cancelled). Client and decode learn the token from the same place, prefill, so they always agree.
3. Decode waits for the KV, then runs `continued(request, (token,))`: the prompt plus the token, one token fewer
   to generate, the KV of the transferred prompt loaded (`num_kv_tokens`). A payload that fails its checks still
   has its header: decode recomputes the prompt plus the token.
4. If prefill fails before its token, the retry and fallbacks work as before (a retried prefill leaves the first
   token to decode). If no header ever reaches decode (prefill died or failed after the token, the deadline
   passed), decode cannot tell whether the client got a token and answers `FirstTokenUnknown`; the ingress then
   runs the request again as a continuation after what it sent (app/api/vllm_engine.py), reported as
   `retried_after`.

The same continuation lets a stream whose engine replica died after some tokens resume on another replica
(app/api/vllm_engine.py). Requests whose tokens cannot be taken out of one run's hands without changing what the
next run samples keep the old path: several choices, a seed (its generator would restart), presence or frequency
penalties (they count output tokens only), stop strings (they match text across the first token), bad words,
structured output, logprobs and prompt logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from app.messages import GenerateRequest, GenerationChunk, SamplingSpec


def can_continue(request: GenerateRequest) -> bool:
    """Whether `request` may continue after tokens another run sampled (prefill's first token, or a stream's tokens
    before its replica died) and sample what it would have sampled (the module docstring says what does not)."""
    sampling = request.sampling
    if sampling.max_tokens is None:
        return False
    if isinstance(sampling, SamplingSpec):
        return (sampling.seed is None and not sampling.stop and not sampling.presence_penalty
                and not sampling.frequency_penalty)
    return (sampling.n == 1 and sampling.seed is None and not sampling.presence_penalty
            and not sampling.frequency_penalty and not sampling.stop and not sampling.bad_words
            and sampling.structured_outputs is None
            and sampling.logprobs is None and sampling.prompt_logprobs is None)


def prefill_sampling(sampling: SamplingSpec | Any) -> SamplingSpec | Any:
    """The request's sampling for one token (prefill's share)."""
    if isinstance(sampling, SamplingSpec):
        return replace(sampling, max_tokens=1)
    one = sampling.clone()
    one.max_tokens, one.min_tokens = 1, min(sampling.min_tokens, 1)
    return one


def ends_request(chunk: GenerationChunk, sampling: SamplingSpec | Any) -> bool:
    """Whether prefill's first token is the request's last: a stop token (EOS included), or one token asked for.
    Prefill always stops with "length" after one token; that ends the request only if it wanted one."""
    return chunk.finish_reason not in (None, "length") or sampling.max_tokens == 1


def first_chunk(chunk: GenerationChunk, sampling: SamplingSpec | Any) -> GenerationChunk:
    """Prefill's chunk as the client's first: not finished unless it ends the request."""
    return chunk if ends_request(chunk, sampling) else replace(chunk, finish_reason=None, stop_reason=None)


def continued(request: GenerateRequest, token_ids: Sequence[int], request_id: str | None = None) -> GenerateRequest:
    """`request` after the client got `token_ids` (prefill's first token, or what a stream got before its replica
    died): the prompt plus those tokens, as many fewer to go. Only for requests `can_continue` accepts: for
    them the rest is sampled as if the tokens had been generated in the same run."""
    num_done, sampling = len(token_ids), request.sampling
    if isinstance(sampling, SamplingSpec):
        rest = replace(sampling, max_tokens=sampling.max_tokens - num_done)
    else:
        rest = sampling.clone()
        rest.max_tokens, rest.min_tokens = sampling.max_tokens - num_done, max(0, sampling.min_tokens - num_done)
    return replace(request, request_id=request_id or request.request_id,
                   prompt_token_ids=(*request.prompt_token_ids, *token_ids), sampling=rest)

