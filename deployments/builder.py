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

from app.config import AppConfig, DeploymentOptions, EngineSpec, engine_env, parse_app_config


def _engine_options(options: DeploymentOptions) -> dict[str, Any]:
    serve_options = options.serve_options()
    serve_options["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env()}
    return serve_options


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    from deployments.collocated import Collocated
    from deployments.ingress import Ingress

    config = args if isinstance(args, AppConfig) else parse_app_config(args)
    spec = EngineSpec.from_config(config)
    if config.mode == "collocated":
        engines = {"collocated": Collocated.options(**_engine_options(config.collocated)).bind(spec)}
    else:
        from deployments.decode import Decode
        from deployments.prefill import Prefill

        # Calls about one transfer or parked KV cache go to the replica that holds it (replica_pin=...).
        pinnable = {"request_router_config": {"request_router_class": "app.routing:PinnableRouter"}}
        engines = {
            "prefill": Prefill.options(**_engine_options(config.prefill), **pinnable).bind(
                spec, config.kv_transfer, config.two_step),
            "decode": Decode.options(**_engine_options(config.decode), **pinnable).bind(spec, config.kv_transfer),
        }
    return Ingress.options(**config.ingress.serve_options()).bind(config.model_dump(), engines)
