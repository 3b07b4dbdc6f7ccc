"""Messages that cross deployment boundaries (ingress -> engine replicas), frozen and documented.

- `SamplingSpec`: the sampling parameters pdserve supports, engine-neutral.
- `GenerateRequest`: one tokenised request as the ingress hands it to an engine replica.
- `GenerationChunk`: what an engine replica streams back, one per engine step that produced output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling parameters pdserve supports, in engine-neutral form."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    """New output of one request since its previous chunk."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # pdserve's own facts (path taken, fallbacks), shown to clients

    def with_metadata(self, **extra: Any) -> GenerationChunk:
        return replace(self, metadata={**(self.metadata or {}), **extra})


@dataclass(frozen=True)
class GenerateRequest:
    """A validated, tokenised request; `cache_salt` keeps prefix-cache reuse inside one tenant."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    cache_salt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill replica reports once a request's KV has been sent to its decode replica."""

    xfer_id: str
    num_prompt_tokens: int
    num_bytes: int
    prefill_s: float  # engine time for the prompt, submit to gathered KV
    send_s: float  # header + payload on the pair's channel
    first_token_id: int | None
    num_cached_tokens: int = 0  # prompt tokens prefill found in its (tenant-salted) prefix cache
