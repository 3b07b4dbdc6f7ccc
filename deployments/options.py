"""Configuration -> Serve: a deployment's `DeploymentOptions` as `Deployment.options(...)` keywords, and the
process environment its engine replicas need (in-process vLLM, project-owned caches)."""

from __future__ import annotations

from typing import Any

from app.config import DeploymentOptions
from app.engine import engine_env


def serve_options(options: DeploymentOptions, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `Deployment.options(...)` keywords for `options`; `policy` is the autoscaling policy
    (`{"policy_function": ..., "policy_kwargs": ...}`), Serve's queue-length policy if None."""
    result: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                              **({"resources": dict(options.resources)} if options.resources else {})},
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
    }
    if options.num_replicas != "auto":
        result["num_replicas"] = options.num_replicas
        return result
    result["autoscaling_config"] = {
        "min_replicas": options.min_replicas,
        "max_replicas": options.max_replicas,
        "initial_replicas": options.initial_replicas,
        "target_ongoing_requests": max(1, options.max_ongoing_requests // 2),
        "look_back_period_s": options.look_back_period_s,
        "upscale_delay_s": options.upscale_delay_s,
        "downscale_delay_s": options.downscale_delay_s,
    }
    if policy is not None:
        result["autoscaling_config"]["policy"] = policy
    return result


def engine_options(options: DeploymentOptions, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """`serve_options` for an engine deployment: its replicas also get the engine's environment."""
    result = serve_options(options, policy)
    result["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env()}
    return result
