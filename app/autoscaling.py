"""Autoscaling policies: Prefill and Decode each scale on their own signal; a joint policy keeps them in a band.

Life cycle: every engine replica's `record_autoscaling_stats` reports its signal (below) to Serve's
controller, which averages each over `look_back_period_s` and, every control-loop tick, calls the
deployment's policy with an `AutoscalingContext`. The policy returns a replica count; Serve then
applies min/max_replicas and the up/down-scale delays.

Signals (per replica):
- Prefill: `queued_prompt_tokens` (prompt tokens waiting or partly computed, batch window included)
  and `oldest_wait_s` (age of the oldest prompt without its first token). Compute-bound work queues as
  tokens, so tokens, not requests, say how far behind prefill is.
- Decode: `running_requests` (sequences in the engine; requests still waiting for their KV are
  prefill's backlog and are left out) and
  `kv_usage` (0-1). Decode is bound by memory bandwidth and KV capacity, so running sequences and KV
  pressure are its load.

`PDJointPolicy` is an application-level policy (`autoscaling_policy:` of the application in
serve_config.yaml): it takes both phases' own decisions and then raises the smaller side so that
prefill replicas / decode replicas stays within [min_ratio, max_ratio]. It only ever adds replicas:
a band is a floor on the lagging phase, never a cap that would starve the busy one.

The decision functions are plain arithmetic on plain numbers (unit-tested on synthetic metrics); the
policy classes only read the context. This module is shipped to Serve's controller by value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

PREFILL_DEPLOYMENT = "Prefill"
DECODE_DEPLOYMENT = "Decode"


def prefill_replicas(num_current: int, queued_prompt_tokens: Iterable[float], oldest_wait_s: Iterable[float],
                     target_queued_prompt_tokens: float, target_queue_wait_s: float) -> int:
    """Replicas that bring queued prompt tokens per replica to the target and the oldest wait under its target."""
    by_tokens = sum(queued_prompt_tokens) / target_queued_prompt_tokens
    worst_wait = max(oldest_wait_s, default=0.0)
    by_wait = max(num_current, 1) * worst_wait / target_queue_wait_s if worst_wait > target_queue_wait_s else 0.0
    return math.ceil(max(by_tokens, by_wait))


def decode_replicas(num_current: int, running_requests: Iterable[float], kv_usage: Iterable[float],
                    target_running_requests: float, target_kv_usage: float) -> int:
    """Replicas that bring running sequences per replica and mean KV usage to their targets."""
    by_running = sum(running_requests) / target_running_requests
    usage = list(kv_usage)
    by_kv = num_current * (sum(usage) / len(usage)) / target_kv_usage if usage and num_current else 0.0
    return math.ceil(max(by_running, by_kv))


def joint_replicas(num_prefill: int, num_decode: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """Raise the lagging phase so that num_prefill / num_decode lies in [min_ratio, max_ratio]."""
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio ({min_ratio}) > max_ratio ({max_ratio})")
    if num_decode == 0 and num_prefill > 0:
        num_decode = 1  # prefill without decode serves nothing
    if num_decode and num_prefill < min_ratio * num_decode:
        num_prefill = math.ceil(min_ratio * num_decode - 1e-9)
    if max_ratio > 0 and num_prefill > max_ratio * num_decode:
        num_decode = math.ceil(num_prefill / max_ratio - 1e-9)
    return num_prefill, num_decode


def _signal(ctx: Any, name: str) -> list[float]:
    metrics = ctx.aggregated_metrics or {}
    return [float(v) for v in (metrics.get(name) or {}).values() if v is not None]


def _kwargs(ctx: Any) -> dict[str, Any]:
    policy = getattr(ctx.config, "policy", None)
    return dict(getattr(policy, "policy_kwargs", None) or {})


class PrefillPolicy:
    """Deployment policy of Prefill (policy_kwargs: target_queued_prompt_tokens, target_queue_wait_s)."""

    def __init__(self, target_queued_prompt_tokens: float = 4096, target_queue_wait_s: float = 1.0, **_: Any):
        self.target_queued_prompt_tokens = target_queued_prompt_tokens
        self.target_queue_wait_s = target_queue_wait_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        desired = prefill_replicas(ctx.current_num_replicas, _signal(ctx, "queued_prompt_tokens"),
                                   _signal(ctx, "oldest_wait_s"), self.target_queued_prompt_tokens,
                                   self.target_queue_wait_s)
        # Requests queued at callers' handles while no replica runs: a cold start needs at least one.
        if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
            desired = max(desired, 1)
        return desired, {}


class DecodePolicy:
    """Deployment policy of Decode (policy_kwargs: target_running_requests, target_kv_usage)."""

    def __init__(self, target_running_requests: float = 16, target_kv_usage: float = 0.7, **_: Any):
        self.target_running_requests = target_running_requests
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        desired = decode_replicas(ctx.current_num_replicas, _signal(ctx, "running_requests"),
                                  _signal(ctx, "kv_usage"), self.target_running_requests, self.target_kv_usage)
        if ctx.total_num_requests > 0:
            desired = max(desired, 1)  # never below one while conversations run or wait
        return desired, {}


class PDJointPolicy:
    """Application policy: each phase's own decision, then the prefill:decode band (policy_kwargs:
    min_ratio, max_ratio; each phase's targets are read from its own deployment policy's kwargs)."""

    def __init__(self, min_ratio: float = 0.0, max_ratio: float = 4.0, **_: Any):
        joint_replicas(0, 1, min_ratio, max_ratio)  # validates the band at deploy time
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        by_name = {ctx.deployment_name: (dep_id, ctx) for dep_id, ctx in contexts.items()}
        decisions: dict[Any, int] = {}
        if PREFILL_DEPLOYMENT in by_name:
            dep_id, ctx = by_name[PREFILL_DEPLOYMENT]
            decisions[dep_id] = PrefillPolicy(**_kwargs(ctx))(ctx)[0]
        if DECODE_DEPLOYMENT in by_name:
            dep_id, ctx = by_name[DECODE_DEPLOYMENT]
            decisions[dep_id] = DecodePolicy(**_kwargs(ctx))(ctx)[0]
        if PREFILL_DEPLOYMENT in by_name and DECODE_DEPLOYMENT in by_name:
            prefill_id, decode_id = by_name[PREFILL_DEPLOYMENT][0], by_name[DECODE_DEPLOYMENT][0]
            decisions[prefill_id], decisions[decode_id] = joint_replicas(
                decisions[prefill_id], decisions[decode_id], self.min_ratio, self.max_ratio)
        return decisions, {}


def policy_for(deployment: str, targets: Any) -> dict[str, Any]:
    """The `autoscaling_config.policy` of an engine deployment, from `AppConfig.autoscaling`."""
    if deployment == PREFILL_DEPLOYMENT:
        return {"policy_function": "app.autoscaling:PrefillPolicy", "policy_kwargs": {
            "target_queued_prompt_tokens": targets.prefill.target_queued_prompt_tokens,
            "target_queue_wait_s": targets.prefill.target_queue_wait_s}}
    return {"policy_function": "app.autoscaling:DecodePolicy", "policy_kwargs": {
        "target_running_requests": targets.decode.target_running_requests,
        "target_kv_usage": targets.decode.target_kv_usage}}
