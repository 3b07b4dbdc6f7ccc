"""Configuration of where and in what order prompts run: placement (which engine prefills a prompt) and the
prefill replica's step (how many prompt tokens one step computes, which waiting prompt goes first).

Same rules as `app/config.py` (pydantic, `extra="forbid"`, frozen; the README's table is generated from them);
`AppConfig` holds them as `placement` and `prefill_batching`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PlacementConfig(BaseModel, extra="forbid", frozen=True):
    """Disaggregated mode: where each prompt runs. The decode replica is chosen first; then the prompt prefills
    on a prefill replica (its KV moved over) or on that decode replica itself (no hop, no transfer, but its
    running replies wait for the prefill)."""

    policy: Literal["adaptive", "always_remote", "always_local"] = Field(
        "adaptive", description="adaptive: short prompts prefill on their decode replica, longer ones on a prefill "
        "replica; always_remote: every prompt on a prefill replica; always_local: every prompt on its decode replica.")
    local_max_prompt_tokens: int = Field(
        224, ge=0, description="adaptive: a prompt with at most this many tokens not cached on its decode replica "
        "prefills there when that replica is idle, holds much more of it than prefill, or prefill is backlogged. "
        "`pdserve plan` prints the length whose prefill stalls decode two steps (226 here; 224 is the block below).")
    idle_local_max_prompt_tokens: int = Field(
        1024, ge=0, description="adaptive: a prompt with at most this many tokens not cached on its decode replica "
        "prefills there when that replica holds no other request (nothing to stall; no hop, no transfer). It bounds "
        "how long a request arriving meanwhile finds that replica busy prefilling; below local_max_prompt_tokens it "
        "counts as local_max_prompt_tokens.")
    local_chunk_tokens: int | None = Field(
        128, ge=16, description="adaptive: the most prompt tokens a decode replica computes in one step beside its "
        "replies' one token each (the rest in later steps; a reply whose KV arrived starts beside them), which bounds "
        "how long one step of a prompt placed there stalls its replies (a replica with no reply running or KV waiting "
        "computes it whole: nothing to stall); with it, longer prompts (up to busy_local_max_prompt_tokens) also run "
        "there while prefill's queue is longer (docs/placement.md). `pdserve plan` prints one decode step's worth. "
        "None: whole prompts, and only prompts up to local_max_prompt_tokens beside running replies.")
    busy_local_max_prompt_tokens: int | None = Field(
        None, ge=0, description="adaptive, with local_chunk_tokens: the longest prompt (tokens not cached on its "
        "decode replica) that prefills there beside running replies, which it does while the prompt tokens queued at "
        "prefill are at least those already placed on that replica without a first token plus its own (it would wait "
        "longer at prefill). None: no limit but the model's context (no step stalls the replies for more than "
        "local_chunk_tokens prompt tokens); below local_max_prompt_tokens it counts as local_max_prompt_tokens.")
    local_short_first_ms_per_token: float = Field(
        2.0, ge=0, le=1000, description="The decode replica's waiting work goes shortest first, within a "
        "bound, as prefill_batching.short_first_ms_per_token does at prefill: a request whose KV arrived (one token "
        "left to compute) or a short local prompt passes a longer local prompt that arrived less than this many ms per "
        "token of difference before it. 0: arrival order (a reply whose first token came from prefill then waits for "
        "every local prompt queued before its KV arrived).")
    first_token_from_prefill: bool = Field(
        True, description="A prompt that prefills on a prefill replica gets its first token from there, streamed as "
        "soon as it is sampled (with the request's sampling), and decode continues after it: its KV handoff and a "
        "decode step leave the time to first token. Requests with n > 1, a seed, presence or frequency penalties, "
        "stop strings, bad words, structured output or logprobs keep decode sampling every token.")
    prefix_routing_slack: int = Field(
        4, ge=-1, description="Prefix-aware routing (both phases): the replica that probably holds the longest cached "
        "prefix of the prompt is chosen unless it has more than this many requests above the least busy replica; -1: "
        "off (Serve's power-of-two choice).")


class PrefillBatchingConfig(BaseModel, extra="forbid", frozen=True):
    """How prompts are batched and ordered on a prefill replica (decode keeps `engine.max_num_seqs`)."""

    max_batched_tokens: int | None = Field(
        1024, ge=16, description="Most prompt tokens one prefill step computes; a longer prompt runs in chunks over "
        "several steps and its KV is sent after the last (None: engine.max_num_batched_tokens, at least "
        "model.max_model_len: no chunking). Smaller steps let a short prompt start sooner (docs/placement.md).")
    max_batch_size: int | None = Field(None, ge=1, description="Most prompts in one prefill step (None: max_num_seqs).")
    short_first_ms_per_token: float = Field(
        2.0, ge=0, le=1000, description="Waiting prompts go shortest first, within a bound: a prompt of N tokens is "
        "passed only by shorter ones that arrived less than this many ms per token of difference after it, so it "
        "waits at most N times this for later arrivals. 0: arrival order.")
    window_ms: float = Field(0.0, ge=0, le=1000, description="Hold arriving prompts up to this long so they enter "
                             "the engine together (0: no window). Trades TTFT for bigger batches.")
    window_max_requests: int = Field(32, ge=1, description="Release the window early once this many prompts wait.")
