"""Messages that cross deployment boundaries (ingress <-> engine replicas), frozen and documented.

- `SamplingSpec`: pdserve's own short form of sampling (warm-up, prefill's one token, the two-step API).
- `GenerateRequest`: one tokenised request as the ingress hands it to an engine replica; its sampling is
  a `SamplingSpec` or vLLM's own `SamplingParams` (what vLLM's request models build from an OpenAI body);
  `BusTarget`: where its chunks after the first go (the ingress's token bus).
- `GenerationChunk`: what an engine replica streams back, one per engine step that produced output.
- `KVReport`: what a response reports about where its prompt ran and where its KV came from.
- `PrefillResult`: a prefill replica's report once a request's KV was sent.
- `ParkResult`, `ParkedPrompt`: the two-step API's replies (`prefill_only`, and the claim of parked KV).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

# transfer: moved from prefill; prefix_cache: decode had it; local: placed on decode by the router (not a
# fallback); recomputed: a fallback, its reason in `fallback_reason`
KVSource = Literal["transfer", "prefix_cache", "local", "recomputed"]


@dataclass(frozen=True)
class SamplingSpec:
    """A short form of vLLM's `SamplingParams` for pdserve's own requests."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class BusTarget:
    """Where an engine replica sends a request's chunks after the first (app/token_bus.py)."""

    endpoint: str  # tcp://host:port of the ingress's PULL socket
    secret: bytes  # the bus's secret: the ingress drops messages without it
    key: int  # the request's key on that bus


@dataclass(frozen=True)
class GenerateRequest:
    """A validated, tokenised request; `cache_salt` keeps prefix-cache reuse inside one tenant."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec | Any  # Any: vllm.SamplingParams (n == 1; the ingress fans `n` out)
    cache_salt: str | None = None
    remote_prefill: bool = False  # disaggregated: prefill on a prefill replica whatever the placement policy says
    reply_to: BusTarget | None = None  # chunks after the first go there, not through the streaming call
    rerun_after_lost_kv: bool = False  # prefill's KV never reached decode: this run prefills on decode, no transfer

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs need the whole prompt computed by the engine that answers (not loaded as KV)."""
        return not isinstance(self.sampling, SamplingSpec) and self.sampling.prompt_logprobs is not None


@dataclass(frozen=True)
class KVReport:
    """Where a request's prompt ran and where its KV came from: the response's `pdserve` field and the
    `x-pdserve-*` headers. Fallbacks are never silent, and neither is placement.

    Disaggregated requests always report the placement group (`mode` .. `num_cached_tokens`); the other
    fields appear only when they say something."""

    mode: Literal["disaggregated"] | None = None
    prefill_replica: str | None = None
    decode_replica: str | None = None
    kv_source: KVSource | None = None  # "recomputed" comes with fallback_reason
    fallback_reason: str | None = None
    num_cached_tokens: int | None = None  # prompt tokens decode did not compute
    fallback: str | None = None  # a fallback the orchestrator took: retried_other_prefill, no_prefill_replica
    prefix_cache_hit_tokens: int | None = None  # prompt tokens found in the tenant's prefix cache
    retried_after: str | None = None  # why the ingress ran a non-streaming request a second time
    placement_reason: str | None = None  # why the router ran the prompt on the decode replica (kv_source "local")

    _PLACEMENT = ("mode", "prefill_replica", "decode_replica", "kv_source", "fallback_reason", "num_cached_tokens")

    def merged(self, later: KVReport | None) -> KVReport:
        """This report with every field `later` sets."""
        if later is None:
            return self
        return replace(self, **{name: value for name, value in asdict(later).items() if value is not None})

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items()
                if value is not None or (self.mode is not None and name in self._PLACEMENT)}

    @property
    def fallback_kind(self) -> str | None:
        """The fallback this request took, for headers and the fallbacks metric."""
        return self.fallback or ("recomputed" if self.kv_source == "recomputed" else None)


@dataclass(frozen=True)
class GenerationChunk:
    """New output of one request since its previous chunk."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    report: KVReport | None = None  # set on the first chunk (and on the last, if it learnt more since)
    # Only when the request asked for them (vLLM's types: per token {token_id: Logprob}):
    logprobs: tuple[dict, ...] | None = None  # one per token of `token_ids`
    cumulative_logprob: float | None = None
    prompt_logprobs: tuple[dict | None, ...] | None = None  # first chunk only
    stop_reason: int | str | None = None  # the stop string or token id that ended it (last chunk)
    # decode's first chunk: the token its run continued after (prefill's first token, as the KV's header named it);
    # the ingress checks it is the one the client got (app/serving/handoff.py)
    continues_after: int | None = None

    def with_report(self, report: KVReport | None) -> GenerationChunk:
        return self if report is None else replace(self, report=(self.report or KVReport()).merged(report))

    def joined(self, then: GenerationChunk) -> GenerationChunk:
        """This delta and the next one of the same request, as one."""
        logprobs = self.logprobs + then.logprobs if self.logprobs is not None and then.logprobs is not None else None
        return replace(self, text=self.text + then.text, token_ids=self.token_ids + then.token_ids,
                       finish_reason=then.finish_reason, logprobs=logprobs,
                       cumulative_logprob=then.cumulative_logprob, stop_reason=then.stop_reason)


def pop_joined(items: deque) -> Any:
    """The oldest of `items` (chunks of one request, oldest first, maybe other markers), joined with the deltas
    that wait behind it: a consumer that fell behind catches up in one chunk, and the last chunk ends a join."""
    item = items.popleft()
    while (isinstance(item, GenerationChunk) and item.finish_reason is None and items
           and isinstance(items[0], GenerationChunk)):
        item = item.joined(items.popleft())
    return item


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill replica reports once a request's KV has been sent to its decode replica."""

    xfer_id: str
    num_prompt_tokens: int
    num_bytes: int
    prefill_s: float  # engine time for the prompt, submit to gathered KV
    send_s: float  # header + payload on the pair's channel
    num_cached_tokens: int = 0  # prompt tokens prefill found in its (tenant-salted) prefix cache


@dataclass(frozen=True)
class ParkResult:
    """`prefill_only`: the first token, and the id under which the prompt's KV waits."""

    kv_cache_id: str
    expires_at: float  # wall clock
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class ParkedPrompt:
    """What a claimed kv_cache_id tells the ingress: the prompt its KV belongs to, and the tenant's salt."""

    prompt_token_ids: tuple[int, ...]
    cache_salt: str | None
