"""`build_app`: the application builder `serve_config.yaml` points at.

`serve run serve_config.yaml` calls `build_app(args)` with the YAML's `args`; they are validated first
(a wrong key or value stops start-up with a message naming it), then the graph for the configured
mode is bound, each deployment with its own frozen slice of the config (`app/specs.py`):
    collocated:     Ingress -> Collocated
    disaggregated:  Ingress -> Prefill, Decode   (KV moves Prefill -> Decode over a collective group)
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from app.autoscaling import policy_for
from app.config import AppConfig, parse_app_config
from app.specs import CollocatedSpec, DecodeSpec, IngressSpec, PrefillSpec
from deployments.options import engine_options, serve_options

# Calls about one transfer or parked KV cache, and requests sent ahead to a replica's inbox, go to that replica
# (replica_pin=...).
PINNABLE = {"request_router_config": {"request_router_class": "app.serving.replica_router:PinnableRouter"}}


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    from deployments.collocated import Collocated
    from deployments.ingress import Ingress

    config = args if isinstance(args, AppConfig) else parse_app_config(args)
    if config.mode == "collocated":
        engines = {"collocated": Collocated.options(**engine_options(config.collocated), **PINNABLE).bind(
            CollocatedSpec.from_config(config))}
    else:
        from deployments.decode import Decode
        from deployments.prefill import Prefill

        # Each phase autoscales on its own signal (app/autoscaling.py) when its num_replicas is auto.
        prefill_policy = policy_for("Prefill", config.autoscaling)
        decode_policy = policy_for("Decode", config.autoscaling)
        engines = {
            "prefill": Prefill.options(**engine_options(config.prefill, prefill_policy), **PINNABLE).bind(
                PrefillSpec.from_config(config)),
            "decode": Decode.options(**engine_options(config.decode, decode_policy), **PINNABLE).bind(
                DecodeSpec.from_config(config)),
        }
    return Ingress.options(**serve_options(config.ingress)).bind(IngressSpec.from_config(config), engines)
