"""Placement: where a disaggregated request's prompt prefills, decided once per request.

Life cycle: the orchestrator has a request and has not chosen a prefill replica yet. `place` answers with a
`Placement`: `local` (prefill on the decode replica chosen for it: no second hop, no KV transfer, but that
replica's running replies wait while the prompt runs) or remote (prefill replica, KV moved over), with a
`reason` (the metrics label) and a `detail` (the response's `placement_reason`). A local placement is not a
fallback: fallbacks are for failures and are counted apart.

Rules, first match wins:
1. `prompt_logprobs` asked for: local (vLLM computes prompt logprobs only for tokens it runs itself).
2. A rerun after the request's KV was lost on the way (app/serving/first_token.py): local. The caller asked for
   a remote prefill (the ingress's warm path, which must warm the transfer path): remote.
3. `placement.policy` always_local / always_remote.
4. adaptive, with L = `placement.local_max_prompt_tokens` (the prompt tokens a decode replica computes within
   its stall budget), I = `placement.idle_local_max_prompt_tokens` and a prompt's uncached tokens (its length
   minus the prefix the replica probably holds in its prefix cache, `prefix_index.py`): a prompt with at most I
   tokens uncached runs locally when its decode replica holds no other request of this ingress (no reply there
   to stall, so the hop and the transfer would buy nothing; I bounds how long a request arriving meanwhile can
   find that replica busy with the prompt). Otherwise a prompt with at most L tokens uncached runs locally when
   the decode replica holds at least L tokens of it and no prefill replica holds more (a conversation's earlier
   turns: a remote prefill would compute no less and send again the KV the decode replica has), or while the
   prefill backlog is at least L tokens (there it would wait at least as long as its local prefill stalls
   decode). Where decode computes local prompts in chunks (`placement.local_chunk_tokens`: no step then stalls
   its replies for more than that many prompt tokens, however long the prompt), a longer prompt (up to B =
   `placement.busy_local_max_prompt_tokens`, by default the model's context) also runs locally while the prefill
   backlog is at least its own length (it would wait there at least as long as it computes here). Both backlog
   rules weigh the queue a local prompt joins too: the prompt tokens placed locally on that decode replica still
   without their first token (`DecodeBacklog`). A prompt runs
   locally for the backlog only while prefill's queue is at least that queue plus its own length; otherwise
   decode is the busier end (`decode_busy`: remote).
   Every other prompt runs remotely.
   The backlog is what this ingress has placed on prefill replicas and not seen finish (`PrefillBacklog`: from
   the placement on, so that prompts arriving together see each other); the decode replica's requests are the
   ones this ingress has on it (waiting for KV or generating): both exact with one ingress replica, lower bounds
   with several.
Not yet used (issue 13): decode's KV usage.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal

from app.messages import GenerateRequest, GenerationChunk

Policy = Literal["adaptive", "always_remote", "always_local"]
Reason = Literal["prompt_logprobs", "forced", "policy", "decode_idle", "prefix_cached", "prefill_busy",
                 "prefill_idle", "decode_busy", "long_prompt"]


@dataclass(frozen=True)
class Placement:
    local: bool
    reason: Reason
    detail: str

    @property
    def where(self) -> str:
        return "local" if self.local else "remote"


class PrefillBacklog:
    """Prompt tokens this ingress has placed on prefill replicas: counted from the placement (`waiting`, while a
    prefill replica is chosen: prompts that arrive together, or wait for a free replica, see each other), then
    from dispatch (`add`) until prefill answered (`remove`)."""

    def __init__(self) -> None:
        self.num_tokens = 0
        self.num_requests = 0
        self.by_replica: Counter[str] = Counter()  # requests per prefill replica (prefix routing's load)

    @contextlib.contextmanager
    def waiting(self, num_tokens: int) -> Iterator[None]:
        """Count a prompt placed on prefill whose replica is not chosen yet (until it is dispatched or given up)."""
        self.num_tokens += num_tokens
        self.num_requests += 1
        try:
            yield
        finally:
            self.num_tokens -= num_tokens
            self.num_requests -= 1

    def add(self, num_tokens: int, replica_id: str) -> None:
        self.num_tokens += num_tokens
        self.num_requests += 1
        self.by_replica[replica_id] += 1

    def remove(self, num_tokens: int, replica_id: str) -> None:
        self.num_tokens -= num_tokens
        self.num_requests -= 1
        self.by_replica[replica_id] -= 1
        if not self.by_replica[replica_id]:
            del self.by_replica[replica_id]


class DecodeBacklog:
    """Prompt tokens placed on each decode replica (local placements) that have not given their first token yet:
    the queue a prompt placed there joins, as `PrefillBacklog` is the one at prefill."""

    def __init__(self) -> None:
        self.by_replica: Counter[str] = Counter()

    async def until_first_token(self, replica_id: str, num_tokens: int, stream: AsyncIterator[GenerationChunk]
                                ) -> AsyncIterator[GenerationChunk]:
        """Pass `stream` through, counting `num_tokens` on `replica_id` until its first token (or its end)."""
        self.by_replica[replica_id] += num_tokens
        counted = True
        try:
            async for chunk in stream:
                if counted and chunk.token_ids:
                    self._remove(replica_id, num_tokens)
                    counted = False
                yield chunk
        finally:
            if counted:
                self._remove(replica_id, num_tokens)

    def _remove(self, replica_id: str, num_tokens: int) -> None:
        self.by_replica[replica_id] -= num_tokens
        if not self.by_replica[replica_id]:
            del self.by_replica[replica_id]


def uncached_tokens(num_prompt: int, cached_local: int) -> int:
    """Prompt tokens a decode replica computes for a prompt of which it holds `cached_local` (vLLM always computes
    the last prompt token)."""
    return num_prompt - min(cached_local, num_prompt - 1)


@dataclass(frozen=True)
class PlacementLimits:
    """The most uncached prompt tokens a decode replica takes (adaptive): `local` (L, its stall budget) beside
    running replies; `idle` when it holds no other request; `busy` beside running replies while at least as many
    prompt tokens are queued at prefill (above L only where decode computes local prompts in chunks,
    `placement.local_chunk_tokens`). A limit below L counts as L."""

    local: int
    idle: int = 0
    busy: int = 0


def place(request: GenerateRequest, policy: Policy, limits: PlacementLimits, backlog_tokens: int = 0,
          decode_requests: int = 1, cached_local: int = 0, cached_remote: int = 0, decode_backlog: int = 0
          ) -> Placement:
    """Where `request` prefills. `decode_requests`: what this ingress has on the decode replica chosen for it;
    `cached_local` / `cached_remote`: prompt tokens that replica / the best prefill replica probably has cached;
    `decode_backlog`: prompt tokens placed on that replica still without their first token (`DecodeBacklog`)."""
    num_prompt = len(request.prompt_token_ids)
    if request.wants_prompt_logprobs:
        return Placement(True, "prompt_logprobs", "prompt_logprobs: the decode replica computes the prompt to give "
                         "its logprobs")
    if request.rerun_after_lost_kv:
        return Placement(True, "forced", "a rerun after its KV was lost on the way: the prompt runs on the decode "
                         "replica")
    if request.remote_prefill:
        return Placement(False, "forced", "the caller asked for a prefill replica")
    if policy == "always_local":
        return Placement(True, "policy", "placement.policy: always_local")
    if policy == "always_remote":
        return Placement(False, "policy", "placement.policy: always_remote")
    limit = limits.local
    idle_limit, busy_limit = max(limit, limits.idle), max(limit, limits.busy)
    uncached = uncached_tokens(num_prompt, cached_local)
    prompt = f"prompt of {num_prompt} tokens"
    if cached_local:
        prompt += f" ({uncached} not cached on its decode replica)"
    if decode_requests == 0 and uncached <= idle_limit:
        return Placement(True, "decode_idle", f"{prompt} <= {idle_limit}, and its decode replica holds no other "
                         "request: no reply to stall")
    if uncached <= limit:
        if num_prompt - uncached >= max(limit, cached_remote):
            return Placement(True, "prefix_cached", f"{prompt}: its decode replica holds at least {limit} of them and "
                             "no prefill replica more; remotely they would be sent again")
        if backlog_tokens < limit:
            return Placement(False, "prefill_idle", f"{prompt}, {backlog_tokens} prompt tokens queued at prefill < "
                             f"{limit}: prefill is free enough")
        if backlog_tokens < decode_backlog + uncached:
            return _decode_busy(prompt, backlog_tokens, decode_backlog)
        return Placement(True, "prefill_busy", f"{prompt} <= {limit}, and {backlog_tokens} prompt tokens queued at "
                         f"prefill >= {limit}: it would wait longer there than it stalls decode")
    if uncached <= busy_limit and backlog_tokens >= uncached:
        if backlog_tokens < decode_backlog + uncached:
            return _decode_busy(prompt, backlog_tokens, decode_backlog)
        return Placement(True, "prefill_busy", f"{prompt} <= {busy_limit}, and {backlog_tokens} prompt tokens "
                         "queued at prefill, at least its own: it would wait longer there than it takes here, in "
                         "chunks between decode steps")
    why = ""
    if uncached <= busy_limit:
        why = f", its decode replica holds other requests and only {backlog_tokens} prompt tokens are queued at prefill"
    elif uncached <= idle_limit:
        why = " and its decode replica holds other requests"
    return Placement(False, "long_prompt", f"{prompt} > placement.local_max_prompt_tokens ({limit}){why}")


def _decode_busy(prompt: str, backlog_tokens: int, decode_backlog: int) -> Placement:
    return Placement(False, "decode_busy", f"{prompt}: {decode_backlog} prompt tokens placed on its decode replica "
                     f"wait for their first token, and with its own more than the {backlog_tokens} queued at "
                     "prefill: it would wait longer there")
