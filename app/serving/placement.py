"""Placement: where a disaggregated request's prompt prefills, decided once per request.

Life cycle: the orchestrator has a request and has not chosen a prefill replica yet. `place` answers with a
`Placement`: `local` (prefill on the decode replica chosen for it: no second hop, no KV transfer, but that
replica's running replies wait while the prompt runs) or remote (prefill replica, KV moved over), with a
`reason` (the metrics label) and a `detail` (the response's `placement_reason`). A local placement is not a
fallback: fallbacks are for failures and are counted apart.

Rules, first match wins:
1. `prompt_logprobs` asked for: local (vLLM computes prompt logprobs only for tokens it runs itself).
2. The caller asked for a remote prefill (the ingress's warm path, which must warm the transfer path).
3. `placement.policy` always_local / always_remote.
4. adaptive, with L = `placement.local_max_prompt_tokens` (the prompt length a decode replica prefills within
   its stall budget): a prompt of more than L tokens runs remotely. One of at most L tokens runs locally when
   the decode replica chosen for it holds no other request of this ingress (no reply there to stall: no hop
   and no transfer for nothing), or while the prefill backlog is at least L tokens (there it would wait at
   least as long as its local prefill stalls decode); otherwise remote.
   The backlog is what this ingress has dispatched to prefill replicas and not seen finish
   (`PrefillBacklog`); the decode replica's requests are the ones this ingress has on it (waiting for KV or
   generating): both exact with one ingress replica, lower bounds with several.
Not yet used (issue 13): the tokens the decode replica already has cached, and its KV usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.messages import GenerateRequest

Policy = Literal["adaptive", "always_remote", "always_local"]
Reason = Literal["prompt_logprobs", "forced", "policy", "decode_idle", "prefill_busy", "prefill_idle",
                 "long_prompt"]


@dataclass(frozen=True)
class Placement:
    local: bool
    reason: Reason
    detail: str

    @property
    def where(self) -> str:
        return "local" if self.local else "remote"


class PrefillBacklog:
    """Prompt tokens this ingress has on prefill replicas: added at dispatch, removed once prefill answered."""

    def __init__(self) -> None:
        self.num_tokens = 0
        self.num_requests = 0

    def add(self, num_tokens: int) -> None:
        self.num_tokens += num_tokens
        self.num_requests += 1

    def remove(self, num_tokens: int) -> None:
        self.num_tokens -= num_tokens
        self.num_requests -= 1


def place(request: GenerateRequest, policy: Policy, local_max_prompt_tokens: int, backlog_tokens: int = 0,
          decode_requests: int = 1) -> Placement:
    """Where `request` prefills; `decode_requests`: what this ingress has on the decode replica chosen for it."""
    num_prompt = len(request.prompt_token_ids)
    if request.wants_prompt_logprobs:
        return Placement(True, "prompt_logprobs", "prompt_logprobs: the decode replica computes the prompt to give "
                         "its logprobs")
    if request.remote_prefill:
        return Placement(False, "forced", "the caller asked for a prefill replica")
    if policy == "always_local":
        return Placement(True, "policy", "placement.policy: always_local")
    if policy == "always_remote":
        return Placement(False, "policy", "placement.policy: always_remote")
    limit = local_max_prompt_tokens
    if num_prompt > limit:
        return Placement(False, "long_prompt", f"prompt of {num_prompt} tokens > placement.local_max_prompt_tokens "
                         f"({limit})")
    if decode_requests == 0:
        return Placement(True, "decode_idle", f"prompt of {num_prompt} tokens <= {limit}, and its decode replica "
                         "holds no other request: no reply to stall")
    if backlog_tokens < limit:
        return Placement(False, "prefill_idle", f"prompt of {num_prompt} tokens, {backlog_tokens} prompt tokens "
                         f"queued at prefill < {limit}: prefill is free enough")
    return Placement(True, "prefill_busy", f"prompt of {num_prompt} tokens <= {limit}, and {backlog_tokens} prompt "
                     f"tokens queued at prefill >= {limit}: it would wait longer there than it stalls decode")
