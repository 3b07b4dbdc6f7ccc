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
4. adaptive: prompts of at most `placement.local_max_prompt_tokens` local, longer ones remote.
Not yet used (issue 13): the tokens the decode replica already has cached, the prefill backlog, and
decode pressure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.messages import GenerateRequest

Policy = Literal["adaptive", "always_remote", "always_local"]
Reason = Literal["prompt_logprobs", "forced", "policy", "short_prompt", "long_prompt"]


@dataclass(frozen=True)
class Placement:
    local: bool
    reason: Reason
    detail: str

    @property
    def where(self) -> str:
        return "local" if self.local else "remote"


def place(request: GenerateRequest, policy: Policy, local_max_prompt_tokens: int) -> Placement:
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
    if num_prompt <= local_max_prompt_tokens:
        return Placement(True, "short_prompt", f"prompt of {num_prompt} tokens <= placement.local_max_prompt_tokens "
                         f"({local_max_prompt_tokens})")
    return Placement(False, "long_prompt", f"prompt of {num_prompt} tokens > placement.local_max_prompt_tokens "
                     f"({local_max_prompt_tokens})")
