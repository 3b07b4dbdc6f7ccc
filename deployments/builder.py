"""`build_app`: the application builder `serve_config.yaml` points at.

`serve run serve_config.yaml` calls `build_app(args)` with the YAML's `args`; they are validated first
(a wrong key or value stops start-up with a message naming it), then the graph for the configured
mode is bound:
    collocated:     Ingress -> Collocated
    disaggregated:  Ingress -> Prefill, Decode   (KV moves Prefill -> Decode over a collective group)
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from app.autoscaling import policy_for
from app.config import AppConfig, DeploymentOptions, EngineSpec, engine_env, parse_app_config


def _engine_options(options: DeploymentOptions, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    serve_options = options.serve_options(policy)
    serve_options["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env()}
    return serve_options


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    from deployments.collocated import Collocated
    from deployments.ingress import Ingress

    config = args if isinstance(args, AppConfig) else parse_app_config(args)
    spec = EngineSpec.from_config(config)
    if config.mode == "collocated":
        engines = {"collocated": Collocated.options(**_engine_options(config.collocated)).bind(spec, config.warmup)}
    else:
        from deployments.decode import Decode
        from deployments.prefill import Prefill

        # Calls about one transfer or parked KV cache go to the replica that holds it (replica_pin=...).
        pinnable = {"request_router_config": {"request_router_class": "app.routing:PinnableRouter"}}
        # Each phase autoscales on its own signal (app/autoscaling.py) when its num_replicas is auto.
        prefill_policy = policy_for("Prefill", config.autoscaling)
        decode_policy = policy_for("Decode", config.autoscaling)
        engines = {
            "prefill": Prefill.options(**_engine_options(config.prefill, prefill_policy), **pinnable).bind(
                EngineSpec.for_prefill(config), config.kv_transfer, config.two_step, config.warmup,
                config.prefill_batching),
            "decode": Decode.options(**_engine_options(config.decode, decode_policy), **pinnable).bind(
                spec, config.kv_transfer, config.warmup),
        }
    return Ingress.options(**config.ingress.serve_options()).bind(config.model_dump(), engines)
