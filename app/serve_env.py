"""The Ray Serve settings pdserve is run with: environment variables read by Ray's own processes.

Ray Serve reads some settings from the environment of the process that starts the cluster (`serve run`,
`ray start`, `ray.init`), which every Ray process (the HTTP proxy included) inherits; a Serve config or a
deployment's runtime_env cannot set them for the proxy. Life cycle: whoever starts a cluster for pdserve calls
`apply()` first (the test suite, the benchmarks, the notebook) or puts `SERVE_ENV` in the cluster's environment
(`make run` on `serve run`'s command line, KubeRay in the containers' `env`); the ingress calls `log_missing()` at
start, which logs what an operator left out, since nothing fails without it, it is only slower.

- `RAY_SERVE_PROXY_USE_GRPC=1`: the HTTP proxy talks to the ingress over Serve's inter-deployment gRPC instead of
  Ray actor calls. Every streamed token crosses that hop, and each one costs about half the CPU over gRPC: measured
  with 16 streams on 2 cores, proxy 0.49 -> 0.25 and ingress 0.61 -> 0.42 ms of CPU per output token, output
  tokens/s x1.17, TTFT p50 x0.74 (README, "Ray Serve settings"). It changes nothing else: handle calls from
  other Ray apps and between pdserve's deployments keep Ray actor calls.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply() -> None:
    """Set pdserve's Serve settings in this process's environment (before it starts a Ray cluster), unless the
    environment already says otherwise."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def missing() -> list[str]:
    """The settings this process's environment (inherited from the cluster's) does not have as pdserve runs them."""
    return [f"{key}={value}" for key, value in SERVE_ENV.items() if os.environ.get(key) != value]


def log_missing() -> None:
    """Warn (once, at the ingress's start) about the settings the cluster was started without."""
    if names := missing():
        logger.warning("this Ray cluster was started without %s: every streamed token costs about twice the CPU in "
                       "Serve's HTTP proxy (README, 'Ray Serve settings'; `make run` sets it)", ", ".join(names))
